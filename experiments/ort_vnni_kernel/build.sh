#!/usr/bin/env bash
# Builds the experiment's ONNX Runtime custom-op library for any x86-64 CPU with AVX-512 VNNI.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/libmmx_vnni.so}"
gcc -O3 -march=x86-64-v4 -mavx512vnni -shared -fPIC -Wall -Wextra "$here/matmul_nbits.c" -o "$out"
echo "$out"
