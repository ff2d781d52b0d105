#!/usr/bin/env bash
# The device check, for a GPU machine lent for a few minutes (it has CUDA 13 and PyTorch, no
# Rust): run from the repository root with the CUDA build carried in target-cuda/carry/pretext
# (tools/cuda/build.sh makes it). One command, about 5 minutes on an H100:
#   1. every model's forward and backward on CUDA against the CPU (same weights, same batch);
#   2. training-step timings of candle on the GPU beside the same models in PyTorch on the GPU;
#   3. the main pipeline on the GPU, timed.
# Writes everything under $OUT (default /tmp/device-check) and prints a summary.
set -uo pipefail
BIN=${PRETEXT_BIN:-target-cuda/carry/pretext}
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "no CUDA build at $BIN: run tools/cuda/build.sh first" >&2; exit 2; }

# CUDA 13's libraries: the toolkit's, else the ones PyTorch's wheels bring.
libs=/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib
for d in $(python3 - <<'PY' 2>/dev/null
import glob, os, site
for base in site.getsitepackages():
    for lib in glob.glob(os.path.join(base, "nvidia", "**", "lib"), recursive=True):
        print(lib)
PY
); do libs="$libs:$d"; done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PRETEXT_PYTHON=${PRETEXT_PYTHON:-python3}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; } \
  | tee "$OUT/machine.txt"

status=0
echo "== 1. CUDA against the CPU (one forward + backward each)" | tee "$OUT/compare.txt"
for args in "--model mae --img 64 --patch 8" "--model vit --img 64 --patch 8" \
            "--model resnet --img 64" "--model densenet --img 64 --batch 8"; do
  echo "-- $args" | tee -a "$OUT/compare.txt"
  timeout 120 "$BIN" bench train $args --device cuda:0 --compare-cpu 1e-3 --steps 1 --no-torch \
    2>&1 | tee -a "$OUT/compare.txt" || status=1
done

echo "== 2. training steps, candle and PyTorch on the same GPU" | tee "$OUT/bench.txt"
for args in "--model mae --img 64 --patch 8" "--model mae --img 224 --patch 16" \
            "--model vit --img 224 --patch 16" "--model resnet --img 128"; do
  echo "-- $args" | tee -a "$OUT/bench.txt"
  timeout 150 "$BIN" bench train $args --device cuda:0 --steps 10 2>&1 | tee -a "$OUT/bench.txt" \
    || status=1
done

echo "== 3. the main pipeline on the GPU" | tee "$OUT/pipeline.txt"
start=$(date +%s.%N)
timeout 240 "$BIN" run pipelines/chest_mae_proxy_shoulder.yaml --device cuda:0 \
  --cache "$OUT/cache" 2>&1 | tail -n 12 | tee -a "$OUT/pipeline.txt" || status=1
echo "wall: $(echo "$(date +%s.%N) - $start" | bc) s" | tee -a "$OUT/pipeline.txt"
cp "$OUT"/cache/report/*/results.md "$OUT/" 2>/dev/null
exit $status
