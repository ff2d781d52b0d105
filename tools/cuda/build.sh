#!/usr/bin/env bash
# Builds `pretext` with CUDA on a machine without a GPU (and without a system CUDA toolkit), for
# carrying to a GPU machine: CUDA 13 from PyPI wheels (nvcc, cudart, nvrtc, cublas, curand) in a
# venv, a link-time stub for the driver library, and `cargo build --release --features cuda` into
# target-cuda/ (the CPU build in target/ is left alone). Prints the stripped binary's path and size.
#
# Settings: CUDA_VENV (default /tmp/cuda-venv), CUDA_COMPUTE_CAP (default 90: H100/H200).
# At run time the binary needs the GPU machine's libcuda.so.1 and CUDA 13's libcublas,
# libcublasLt, libcurand and libcudart on LD_LIBRARY_PATH (tools/cuda/device_check.sh sets it).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${CUDA_VENV:-/tmp/cuda-venv}
if [ ! -x "$VENV/bin/pip" ]; then python3 -m venv "$VENV"; fi
N=$("$VENV/bin/python" -c 'import sys; print(f"{sys.prefix}/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages/nvidia/cu13")')
if [ ! -x "$N/bin/nvcc" ]; then
  "$VENV/bin/pip" install -q "cuda-toolkit[nvcc,cudart,nvrtc,cublas,curand]==13.0.2" \
    "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-cccl==13.0.*"
fi
# The wheels ship versioned sonames only; the linker wants the plain names.
(cd "$N/lib" && for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done \
  && ln -sf libcurand.so.10 libcurand.so)
ln -sfn lib "$N/lib64"
# cudarc links libcuda; the real one comes with the GPU machine's driver. A stub with the same
# symbols satisfies the linker.
cargo fetch --quiet
mkdir -p "$N/lib/stubs"
stub=$(mktemp --suffix=.c)
grep -ohE "fn cu[A-Z][A-Za-z0-9_]*\(" ~/.cargo/registry/src/*/cudarc-*/src/driver/sys/mod.rs | sort -u \
  | sed -E 's/fn (cu[A-Za-z0-9_]*)\(/void \1(void) {}/' > "$stub"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$N/lib/stubs/libcuda.so" "$stub"
rm -f "$stub"
export PATH="$N/bin:$PATH" CUDA_HOME="$N" CUDA_ROOT="$N" CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH="$N/lib:$N/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda
mkdir -p target-cuda/carry
strip -o target-cuda/carry/pretext target-cuda/release/pretext
ls -l target-cuda/carry/pretext
