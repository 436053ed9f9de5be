#!/usr/bin/env bash
# Builds llama.cpp's own llama-imatrix, llama-quantize and llama-bench from the sources vendored in the pinned
# llama-cpp-python sdist (the same llama.cpp edgekit's runtime links), for bench_quality.py's comparison
# and bench_speed.py's rows. Idempotent: does nothing when the binaries exist. About 25 minutes on 2 cores.
set -euo pipefail
DEST=${1:-out/llama-tools}
PY=${PY:-.venv/bin/python}
LLAMA=${LLAMA:-llama-cpp-python==0.3.36}
if [ -x "$DEST/build/bin/llama-quantize" ] && [ -x "$DEST/build/bin/llama-imatrix" ] && [ -x "$DEST/build/bin/llama-bench" ]; then
  echo "$DEST/build/bin"; exit 0
fi
mkdir -p "$DEST"
if [ ! -d "$DEST/src" ]; then
  "$PY" -m pip download --no-deps --no-binary :all: "$LLAMA" -d "$DEST/sdist" >&2
  mkdir -p "$DEST/src" && tar -xzf "$DEST"/sdist/*.tar.gz -C "$DEST/src" --strip-components=1
fi
AMX_OFF="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # as the Makefile: ggml's AMX kernels SIGILL on VMs without AMX state
cmake -S "$DEST/src/vendor/llama.cpp" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DCMAKE_C_FLAGS="$AMX_OFF" -DCMAKE_CXX_FLAGS="$AMX_OFF" >&2
cmake --build "$DEST/build" -j"$(nproc)" --target llama-imatrix llama-quantize llama-bench >&2
echo "$DEST/build/bin"
