#!/usr/bin/env bash
# To run (on a machine with a CUDA GPU; under 9 minutes):
#     bash experiments/device_check.sh [OUT_DIR]       # default OUT_DIR: experiments/out/device
#     bash experiments/device_check.sh --dry-run       # anywhere: checks that everything is ready
#
# Runs the CUDA tests (every test parametrised on the "cuda" device or named *gpu*), then the benchmark
# on the GPU in float32 and in bfloat16, and the DP step benchmark (per_sample, issue 13's GPU targets),
# and writes logs, JSON and Markdown tables to OUT_DIR.
# Each step has its own time limit so that the whole script stays under 9 minutes (520 s of limits).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT=experiments/out/device
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) OUT="$arg" ;;
  esac
done
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  [ $rc -eq 0 ] || { echo "!! $name failed (exit $rc)"; FAILED="$FAILED $name"; }
}

FAILED=""
"$PY" -c "import torch, torchderiv" || { echo "torch and torchderiv must be importable by $PY"; exit 2; }
if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: python $("$PY" -c 'import sys; print(sys.version.split()[0])'), torch $("$PY" -c 'import torch; print(torch.__version__)'), CUDA available: $("$PY" -c 'import torch; print(torch.cuda.is_available())')"
  "$PY" -m pytest -q --collect-only -k "cuda or gpu" tests --ignore=tests/opdb > /dev/null || { echo "pytest cannot collect the CUDA tests"; exit 1; }
  "$PY" experiments/benchmark.py --help > /dev/null || { echo "benchmark.py does not start"; exit 1; }
  "$PY" experiments/lce_memory.py --help > /dev/null || { echo "lce_memory.py does not start"; exit 1; }
  "$PY" experiments/dp_benchmark.py --help > /dev/null || { echo "dp_benchmark.py does not start"; exit 1; }
fi
if [ "$DRY_RUN" = 0 ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device: use --dry-run here"; exit 2; }
  mkdir -p "$OUT"
  (nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
fi

step tests 200 "$PY" -m pytest -q -rs -k "cuda or gpu" tests --ignore=tests/opdb
step bench_fp32 150 "$PY" experiments/benchmark.py --device cuda --dtype float32 --no-compile --out "$OUT/fp32"
step bench_bf16 90 "$PY" experiments/benchmark.py --device cuda --dtype bfloat16 --no-compile --no-lce --out "$OUT/bf16"
step dp 80 "$PY" experiments/dp_benchmark.py --device cuda --quick --out "$OUT/dp"

if [ "$DRY_RUN" = 1 ]; then echo "dry run: ready"; exit 0; fi
echo "results in $OUT"
[ -z "$FAILED" ] || { echo "failed steps:$FAILED"; exit 1; }
