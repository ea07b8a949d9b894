#!/usr/bin/env bash
# One prepared run of the benchmark suite on a CUDA machine (fresh machine, torch with CUDA preinstalled, no
# internet; higher/torchopt may be missing: the suite then skips them and says so on the page).
#
#     bash benchmarks/gpu_check.sh            # from anywhere; results go to $OUT (default runs/gpu)
#
# Budget: well under 6 minutes in all. Each part has its own time limit, so that one that runs long cannot
# lose the others' results; its log ($OUT/*.log) keeps the lines it printed. Two pages, because each
# invocation writes its page only when it ends:
#   part 1: method comparison + checkpointed unroll at K = 100 (conv)   -> $OUT/benchmarks_cuda.{md,json,log}
#   part 2: truncated unrolls, K = 20 and 100, both models             -> $OUT/benchmarks_cuda_truncation.{md,json,log}
#   part 3: Stacked MNIST, X = 1/2, K = 0 and 10, 2 seeds               -> $OUT/stacked_mnist_cuda/
# Limits in seconds can be changed from the environment: PART1_LIMIT, PART2_LIMIT, PART3_LIMIT.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/examples${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's unroll, installed or not
export OMP_NUM_THREADS=1                             # the suite runs one CPU thread on CUDA
PART1_LIMIT="${PART1_LIMIT:-130}"
PART2_LIMIT="${PART2_LIMIT:-100}"
status=0

echo "== nvidia-smi -L"
nvidia-smi -L || status=1
python -c "import torch, unroll; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available',
torch.cuda.is_available(), '| unroll from', unroll.__file__)" || exit 1

run_part() {  # run_part NAME LIMIT ARGS...: one suite invocation with its own limit and log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): python -m benchmarks.unrolled_gradient $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" python -m benchmarks.unrolled_gradient "$@" \
        --out "$OUT/$name.md" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

# Part 1: every method at K = 1..20 (5 timed repetitions), in-process CUDA peak memory, and the checkpointed
# vs plain unroll at K = 100 on the conv model. The vmap-seeds comparison is CPU-only (the page says why).
run_part benchmarks_cuda "$PART1_LIMIT" --device cuda --ks 1 5 10 20 --reps 5 --only comparison checkpoint seeds

# Part 2: truncate T in {1, K/2, K}, checkpoint, checkpoint + T = K/2, at K = 20 and 100, 3 repetitions.
run_part benchmarks_cuda_truncation "$PART2_LIMIT" --device cuda --only truncation --truncation-reps 3

# ---------------------------------------------------------------------------------------------------------
# Part 3: one image experiment on CUDA, Stacked MNIST (Sec. 3.3.1) at X = 1/2, K = 0 and 10, the reduced default
# otherwise (1,500 iterations at lr 1e-3, 2,560 evaluation samples). MNIST comes from UNROLL_MNIST_DIR (the caller
# carries the files); finished runs are written as they end, so a time-out keeps them.
# ---------------------------------------------------------------------------------------------------------
PART3_LIMIT="${PART3_LIMIT:-200}"
echo "== stacked_mnist (limit ${PART3_LIMIT} s)"
start=$SECONDS
timeout --signal=INT --kill-after=10 "$PART3_LIMIT" python examples/gan/stacked_mnist.py --device cuda \
    --K 0 10 --sizes 1/2 --seeds 0 1 --no-progress --out "$OUT/stacked_mnist_cuda" 2>&1 | tee "$OUT/stacked_mnist_cuda.log"
echo "== stacked_mnist: exit $? after $((SECONDS - start)) s"

echo "== done in $SECONDS s; files in $OUT:"
ls -l "$OUT"
exit $status
