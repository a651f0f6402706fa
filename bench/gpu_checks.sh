#!/usr/bin/env bash
# Every check that needs a GPU, in one run: each phase under its own time limit, its log in OUTDIR,
# a summary of exit codes and durations in OUTDIR/summary.txt. A phase that fails or runs out of time
# does not stop the others.
#
#   bash bench/gpu_checks.sh OUTDIR [PHASES [BUDGET_S]]
#
# PHASES, comma-separated, run in the order given (default: tests,runtime,bench,kernels); each has a limit:
#   tests    the GPU-marked tests (lowered models in three dtypes, tuning, CUDA graphs, direct launches)   240 s
#   runtime  bench/runtime.py: host time per call of both call paths, kernel launches both ways             150 s
#   bench    bench/gpu.py: eager, torch.compile and graphopt per call, whole sampler, warm start          520 s
#   kernels  the kernel library's tests compiled for this GPU (every config family, three dtypes)          300 s
# BUDGET_S bounds the whole run in seconds: a phase gets the smaller of its limit and what is left (bench
# gives bench/gpu.py its share less 100 s, so that it stops starting phases in time), and a phase left
# with under 60 s is skipped and listed. graphopt is installed first (without dependencies, from this
# checkout) unless it imports already. On a machine lent for 15 minutes, in two runs of under ten:
#   bash bench/gpu_checks.sh OUTDIR bench 480
#   bash bench/gpu_checks.sh OUTDIR2 tests,runtime 240
set -uo pipefail

usage="usage: bash bench/gpu_checks.sh OUTDIR [PHASES [BUDGET_S]], PHASES comma-separated of \
tests,runtime,bench,kernels, BUDGET_S whole seconds"
if [ $# -lt 1 ] || [ $# -gt 3 ] || [ -z "$1" ]; then
    echo "$usage" >&2
    exit 2
fi
out=$1
phases=${2:-tests,runtime,bench,kernels}
budget=${3:-}
if [ -n "$budget" ] && ! [[ "$budget" =~ ^[0-9]+$ ]]; then
    echo "BUDGET_S must be whole seconds, got '$budget'; $usage" >&2
    exit 2
fi
IFS=, read -r -a asked <<<"$phases"
for name in "${asked[@]}"; do
    case "$name" in
        tests | runtime | bench | kernels) ;;
        *)
            echo "unknown phase '$name'; $usage" >&2
            exit 2
            ;;
    esac
done
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
export TRITON_INTERPRET=0
started=$SECONDS

phase() {
    local name=$1 limit=$2
    shift 2
    if [ -n "$budget" ]; then
        local left=$((budget - (SECONDS - started)))
        if [ "$left" -lt 60 ]; then
            echo "== $name: skipped, ${left} s of the ${budget} s budget left" | tee -a "$out/summary.txt"
            return 0
        fi
        if [ "$left" -lt "$limit" ]; then limit=$left; fi
    fi
    if [ "$name" = bench ]; then set -- "$@" --budget-s "$((limit > 200 ? limit - 100 : limit / 2))"; fi
    echo "== $name (at most ${limit} s): $*" | tee -a "$out/summary.txt"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    local why=""
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why=" (time limit)"; fi
    echo "   exit $rc$why after $((SECONDS - start)) s; last lines:" | tee -a "$out/summary.txt"
    tail -n 4 "$out/$name.log" | sed 's/^/   | /' | tee -a "$out/summary.txt"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$python" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'triton', triton.__version__, 'GPU', torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1
} | tee "$out/summary.txt"

if ! "$python" -c "import graphopt.autotune" >/dev/null 2>&1; then
    echo "== install: $python -m pip install --no-deps --no-build-isolation -e ." | tee -a "$out/summary.txt"
    "$python" -m pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 ||
        { tail -n 4 "$out/install.log" | sed 's/^/   | /' | tee -a "$out/summary.txt"; exit 1; }
fi

for name in "${asked[@]}"; do
    case "$name" in
        tests) phase tests 240 "$python" -m pytest -q -m gpu -p no:cacheprovider tests/autotune/test_lower_gpu.py \
            tests/autotune/test_tuner.py tests/test_readme.py ;;
        runtime) phase runtime 150 "$python" bench/runtime.py --models dit-s,unet ;;
        bench) phase bench 520 "$python" bench/gpu.py --out "$out/RESULTS-gpu.md" ;;
        kernels) phase kernels 300 "$python" -m pytest -q -p no:cacheprovider tests/autotune/kernels ;;
    esac
done
echo "logs in $out" | tee -a "$out/summary.txt"
