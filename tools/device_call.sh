#!/usr/bin/env bash
# One device call (on the device machine, from the repo root, with .whl/ carried):
#   bash tools/device_call.sh "quality demo e2e:flux:--steps~50~--configs~dense,aggressive (~ = space) bench:PARTS:SEQS gputests py:SCRIPT.py:ARGS"
#   speedtable:flux / speedtable:hunyuan: the quality-and-speed table's rows timed at that size as recorded-density
#   replays (omni_compile.bench.table --run; one 10-minute call each), the merged table in $OUT/table/speed_quality.md
# Each item runs in order with its output under $OUT; a short summary is printed last.
# .whl/ (git-ignored) is filled on a machine with the package registry, for the device's Python 3.12:
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl diffusers==0.42.1 importlib_metadata pillow
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl .whl/importlib_metadata-*.whl > "$OUT/install.log" 2>&1
export PYTHONPATH=/tmp/site
# the figures need Pillow: the device's own if it has one, else the carried wheel
python3 -c "import PIL" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/pillow-*.whl >> "$OUT/install.log" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader | tee "$OUT/gpu.txt"
summary=()
for item in $1; do
  IFS=: read -r what a b <<< "$item"
  t0=$(date +%s)
  case $what in
    quality) timeout "${QUALITY_S:-420}" python3 -m omni_compile.bench.quality --out "$OUT/zoo" --device cuda ${a//\~/ } \
               > "$OUT/quality.log" 2>&1; rc=$?
             tail -25 "$OUT/quality.log" ;;
    demo) python3 -m omni_compile.zoo.demo --out "$OUT/demo.png" > "$OUT/demo.log" 2>&1; rc=$?; tail -8 "$OUT/demo.log" ;;
    # the ops' kernels on the GPU, and the CUDA-graph loop (the rest of test_graphs.py is CPU-only and quick)
    gputests) timeout "${GPUTESTS_S:-300}" python3 -m pytest -q --maxfail=3 --durations=5 tests/test_ops_gpu.py tests/test_graphs.py \
                ${a:+-k "${a//\~/ }"} > "$OUT/gpu_tests.log" 2>&1; rc=$?; tail -3 "$OUT/gpu_tests.log" ;;
    e2e) python3 -m omni_compile.bench.e2e --out "$OUT" --model "$a" ${b//\~/ } > "$OUT/e2e_$a.log" 2>&1; rc=$?
         grep -v "^ \|Warning\|warn" "$OUT/e2e_$a.log" | tail -30 ;;
    speedtable) python3 -m omni_compile.bench.table --run "$a" --out "$OUT/table" ${b//\~/ } > "$OUT/speedtable_$a.log" 2>&1; rc=$?
                grep -v "^ \|Warning\|warn" "$OUT/speedtable_$a.log" | tail -40 ;;
    hostlaunch) python3 tools/host_launch.py --out "$OUT/host" > "$OUT/host_launch.log" 2>&1; rc=$?
                tail -14 "$OUT/host_launch.log" ;;
    host) python3 tools/profile_host.py --out "$OUT/host" --model "$a" ${b//\~/ } > "$OUT/host_$a.log" 2>&1; rc=$?
          tail -14 "$OUT/host_$a.log" ;;
    bench) python3 -m omni_compile.bench --out "$OUT/bench" --parts "$a" --seqs "$b" > "$OUT/bench.log" 2> "$OUT/bench_stderr.log"; rc=$?
           grep -v '^  ' "$OUT/bench.log" | tail -60 ;;
    tune) timeout "${TUNE_S:-240}" python3 -m omni_compile.bench.tuning --out "$OUT/tune" ${a//\~/ } > "$OUT/tune.log" 2>&1; rc=$?
          tail -25 "$OUT/tune.log" ;;
    py) python3 "tools/$a" ${b//\~/ } > "$OUT/py_$a.log" 2>&1; rc=$?; tail -60 "$OUT/py_$a.log" ;;
    *) echo "unknown item $what"; rc=2 ;;
  esac
  summary+=("$what:$a rc=$rc $(( $(date +%s) - t0 ))s")
done
printf '%s\n' "${summary[@]}"
