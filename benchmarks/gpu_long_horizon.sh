#!/usr/bin/env bash
# One prepared run of the long-horizon benchmark on a CUDA machine (torch with CUDA preinstalled, no internet).
#
#     bash benchmarks/gpu_long_horizon.sh      # results in $OUT (default runs/gpu): page, figure, raw JSON, log
#
# The conv model at K = 100, 1,000 and 10,000: the plain unroll, checkpoint=True, checkpoint=8 and checkpoint=32,
# CUDA's allocator peak and the wall time of one gradient each. A cell predicted (from smaller K) to need more
# than 100 GiB or 200 s is not run and the page says what it would need. Cells are written as they finish, and a
# second call with RESUME=1 continues, so a time-out loses nothing. Budget: under 7 minutes.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/examples${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
nvidia-smi -L
python -c "import torch, unroll; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), unroll.__file__)"
timeout --signal=INT --kill-after=10 "${LIMIT:-420}" python -m benchmarks.long_horizon --device cuda --models conv \
    --ks 100 1000 10000 --budgets 8 32 --memory-limit-gib 100 --time-limit-s "${TIME_LIMIT:-200}" ${RESUME:+--resume} \
    --json "$OUT/long_horizon_cuda.json" --out "$OUT/benchmarks_long_horizon_cuda.md" 2>&1 | tee "$OUT/long_horizon_cuda.log"
echo "== exit $?"
