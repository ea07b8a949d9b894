#!/usr/bin/env bash
# The estimator comparison (compare.py) on a CUDA machine: time and peak memory per gradient of every estimator
# with --device cuda, and beside it the same problems on this host's CPU (one thread, no memory probe: the CPU's
# RSS peaks are in docs/results/estimators.md), started together on separate cores.
#
#   bash examples/estimators/gpu.sh        # from the repository root; results under $OUT (default runs/gpu)
#
# Small problems on a GPU are bound by kernel launches, so a gradient takes about as long as on a CPU: the run is
# cut to fit BUDGET_S seconds (default 360): 5 seeds per stochastic estimator, 3 timed gradients, no outer
# optimisation. Problems run one at a time, most informative first, each invocation adding one to the same
# folder with --resume, so a run stopped at the deadline still leaves the summary of the problems it finished.
# distillation needs the MNIST test split: $UNROLL_MNIST_DIR, else examples/estimators/data/mnist (ignored by git;
# it reaches a device machine only when named in `carry`), else what examples/unroll_examples/mnist_data.py finds; without
# it the run says so and skips that problem. The project needs no installing: the repository root goes on
# PYTHONPATH. Settings from the environment: BUDGET_S, OUT, PROBLEMS (space-separated, in order), EXTRA_FLAGS
# (appended to compare.py's), PYTHON, and DEVICE (default cuda; cpu only to try the script without a GPU).
set -euo pipefail

BUDGET_S="${BUDGET_S:-360}"
DEVICE="${DEVICE:-cuda}"   # another device only to try this script where there is no GPU
read -r -a extra_flags <<<"${EXTRA_FLAGS:-}"   # appended to compare.py's flags (e.g. --estimators exact,es)
OUT="${OUT:-runs/gpu}"
deadline=$(( $(date +%s) + BUDGET_S ))
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"  # python3 holds torch on the device machine
export PYTHONPATH="$PWD:$PWD/examples${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name --format=csv
"$PYTHON" -c "import torch; print(torch.__version__, torch.version.cuda)"
"$PYTHON" -c "import torch, unroll; print('cuda available:', torch.cuda.is_available(), '| unroll', unroll.__version__)"

if [ -z "${UNROLL_MNIST_DIR:-}" ] && [ -d examples/estimators/data/mnist ]; then
    export UNROLL_MNIST_DIR="$PWD/examples/estimators/data/mnist"
fi
read -r -a problems <<<"${PROBLEMS:-hyperparameter gan distillation hyperparameter_converged}"
if ! "$PYTHON" -c "import sys; from unroll_examples import mnist_data as md; \
sys.exit(0 if md.has_split('test') else 1)"; then
    echo "NOTE: no MNIST test split reaches this machine: distillation is skipped (it alone needs data)"
    read -r -a problems <<<"${problems[*]/distillation/}"
fi
echo "problems, in this order: ${problems[*]}; budget ${BUDGET_S} s"

mkdir -p "$OUT"
for name in estimators_cuda estimators_cpu estimators_runs.tar.gz compare_cpu_cuda.txt; do
    if [ -e "$OUT/$name" ] || [ -L "$OUT/$name" ]; then
        echo "error: $OUT/$name exists; give an empty OUT (this script writes nothing over what it did not make)" >&2
        exit 2
    fi
done
# The runs go to a scratch folder of the script's own; only the summaries and one archive go to $OUT.
WORK=$(mktemp -d)
flags=(--seeds 5 --timing-reps 3 --outer-problems "" --threads 1 "${extra_flags[@]}")

# run_all DEVICE FOLDER [FLAGS...]: the problems one invocation at a time, each adding one, until the deadline.
run_all() {
    local device=$1 folder=$2 chosen="" left log
    log="$WORK/log_$(basename "$2").txt"
    shift 2
    for problem in "${problems[@]}"; do
        left=$(( deadline - $(date +%s) ))
        if [ "$left" -lt 30 ]; then
            echo "[$device] out of time: not started: ${problem} and after"
            return 0
        fi
        chosen="${chosen:+$chosen,}$problem"
        if ! timeout -s INT -k 15 "$left" "$PYTHON" examples/estimators/compare.py --device "$device" \
                --problems "$chosen" "${flags[@]}" "$@" --out "$folder" --resume >>"$log" 2>&1; then
            echo "[$device] stopped in $problem at $(( BUDGET_S - deadline + $(date +%s) )) s (deadline or error," \
                 "see $log): the summary covers the problems before it"
            return 0
        fi
        echo "[$device] finished $chosen at $(( BUDGET_S - deadline + $(date +%s) )) s"
    done
}

run_all cpu "$WORK/estimators_cpu" --no-memory &
cpu_run=$!
run_all "$DEVICE" "$WORK/estimators_cuda"
wait "$cpu_run" || true
tail -n 15 "$WORK/log_estimators_cuda.txt" || true

# Per problem and estimator: ms per gradient on this CPU and on CUDA, CUDA's peak MiB, and how far each CUDA
# gradient of a deterministic estimator is from the CPU's (float64 on both: should be ~1e-12 or less).
"$PYTHON" - "$WORK/estimators_cpu" "$WORK/estimators_cuda" <<'EOF' | tee "$OUT/compare_cpu_cuda.txt" || echo "(the comparison failed)"
import json, math, sys
from pathlib import Path
cpu_dir, cuda_dir = map(Path, sys.argv[1:])

def load(folder):
    path = folder / "results.json"
    return json.loads(path.read_text())["problems"] if path.exists() else {}

def estimates(folder, problem, name):
    found = sorted((folder / "cells" / "gradients" / problem).glob(f"{name}-*.json"))
    return json.loads(found[0].read_text())["payload"]["estimates"] if found else None

cpu, cuda = load(cpu_dir), load(cuda_dir)
for problem, result in cuda.items():
    print(f"{problem}: estimator | ms CPU | ms CUDA | CUDA peak MiB | max rel. diff CUDA vs CPU (deterministic)")
    for name, row in result["estimators"].items():
        ms_cpu = 1000 * cpu[problem]["estimators"][name]["median_seconds"] if problem in cpu else math.nan
        peak = row["peak_bytes"]
        diff = "-"
        a, b = estimates(cuda_dir, problem, name), estimates(cpu_dir, problem, name)
        pairs = [(u, v) for u, v in zip(a or [], b or []) if None not in u and None not in v]
        if pairs and name not in ("es", "pes", "tes"):  # the stochastic ones draw other noise on CUDA
            diff = f"{max(max(abs(x - y) for x, y in zip(u, v)) / max(max(map(abs, v)), 1e-300) for u, v in pairs):.1e}"
        print(f"  {name:22s} | {ms_cpu:8.1f} | {1000 * row['median_seconds']:8.1f} | "
              f"{'-' if peak is None else f'{peak / 2**20:.3g}':>8s} | {diff}")
EOF

# What comes back from $OUT: at most 8 files, 2 folders down. Everything (cells, logs) goes into one archive;
# the summaries are copied beside it: 7 files.
made=()
for name in estimators_cuda estimators_cpu log_estimators_cuda.txt log_estimators_cpu.txt; do
    if [ -e "$WORK/$name" ]; then made+=("$name"); fi
done
if [ "${#made[@]}" -gt 0 ]; then
    tar czf "$OUT/estimators_runs.tar.gz" -C "$WORK" "${made[@]}"
fi
for run in estimators_cuda estimators_cpu; do
    summaries=(table.md results.json)
    if [ "$run" = estimators_cuda ]; then summaries+=(figure.png); fi
    for file in "${summaries[@]}"; do
        if [ -f "$WORK/$run/$file" ]; then mkdir -p "$OUT/$run" && cp "$WORK/$run/$file" "$OUT/$run/$file"; fi
    done
done
rm -rf "${WORK:?}"  # the scratch folder mktemp made above
ls -la "$OUT" "$OUT"/estimators_* || true
