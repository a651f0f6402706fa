#!/usr/bin/env bash
# Every check that needs a GPU, in one run: each phase under its own time limit, its log in OUTDIR,
# a summary of exit codes and durations in OUTDIR/summary.txt. A phase that fails or runs out of time
# does not stop the others.
#
#   bash bench/gpu_checks.sh OUTDIR [PHASES]
#
# PHASES, comma-separated, in this order (default: all of them):
#   tests    the GPU-marked tests (lowered models in three dtypes, tuning, CUDA graphs, direct launches)   240 s
#   runtime  bench/runtime.py: host time per call of both call paths, kernel launches both ways             150 s
#   bench    bench/gpu.py: eager, torch.compile and graphopt per call, whole sampler, warm start          520 s
#   kernels  the kernel library's tests compiled for this GPU (every config family, three dtypes)          300 s
# On a machine with eight minutes to spare per run: `tests,runtime` in one, `bench` in another.
set -uo pipefail

usage="usage: bash bench/gpu_checks.sh OUTDIR [PHASES], PHASES comma-separated of tests,runtime,bench,kernels"
if [ $# -lt 1 ] || [ $# -gt 2 ] || [ -z "$1" ]; then
    echo "$usage" >&2
    exit 2
fi
out=$1
phases=${2:-tests,runtime,bench,kernels}
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

phase() {
    local name=$1 limit=$2
    shift 2
    case ",$phases," in *",$name,"*) ;; *) return 0 ;; esac
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

phase tests 240 "$python" -m pytest -q -m gpu -p no:cacheprovider tests
phase runtime 150 "$python" bench/runtime.py --models dit-s,unet
phase bench 520 "$python" bench/gpu.py --budget-s 420 --out "$out/RESULTS-gpu.md"
phase kernels 300 "$python" -m pytest -q -p no:cacheprovider tests/autotune/kernels
echo "logs in $out" | tee -a "$out/summary.txt"
