#!/usr/bin/env bash
# One device call: install, GPU tests, benchmark. Usage (on the device machine, from the repo root):
#   bash tools/device_run.sh [parts] [seqs]
# Writes logs and bench.{json,md} under $OUT (or out/ when $OUT is unset).
set -uo pipefail
OUT=${OUT:-out}
PARTS=${1:-sweep,attention,gemm,pooled}
SEQS=${2:-4608,16896}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 240 python3 -m pytest -q -x tests/test_ops_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 -m omni_compile.bench --out "$OUT" --parts "$PARTS" --seqs "$SEQS" 2> "$OUT/bench_stderr.log" | tee "$OUT/bench.log" | grep -v '^  '
tail -5 "$OUT/bench_stderr.log"
