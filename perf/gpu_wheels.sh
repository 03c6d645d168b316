#!/usr/bin/env bash
# Download the Python wheels a GPU machine without network lacks, into perf/wheels/ (git-ignored).
#   bash perf/gpu_wheels.sh [EXTRA_SPEC...]      (on a machine with network, from anywhere in the checkout)
# The device image has torch, triton, transformers, tokenizers, huggingface-hub, safetensors, numpy, pillow, regex,
# requests, filelock, nvidia-ml-py, pytest, scikit-learn, scipy, matplotlib, anyio, click and h11, but not:
#   diffusers           the runtime's model library (its needs: importlib_metadata, filelock, huggingface-hub>=1.32,
#                       numpy, regex, requests, safetensors>=0.8, Pillow; only importlib_metadata is missing there)
#   importlib_metadata  diffusers declares it (it imports it only on Python < 3.8); its own need, zipp, is there
#   starlette, uvicorn  the HTTP server (driffusion_rt.serve; needs anyio, typing-extensions / click, h11: there)
# Versions are requirements-cpu.txt's. EXTRA_SPEC (e.g. transformers==5.23.0) adds wheels for another version of
# a package the image has. Then on the GPU machine, from the repository root:
#   python3 -m pip install --no-index --no-deps perf/wheels/*.whl
#   python3 -m pip install --no-index --no-build-isolation --no-deps -e .
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-perf/wheels}
PY=${PY_VERSION:-3.12}    # the device image's Python
pin() { grep -E "^$1==" requirements-cpu.txt | head -1; }
specs=("$(pin diffusers)" "importlib_metadata==10.2.0" "$(pin starlette)" "$(pin uvicorn)" "$@")
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$DEST" "${specs[@]}"
echo "gpu_wheels: ${specs[*]} -> $DEST ($(du -sh "$DEST" | cut -f1)):"
ls -1 "$DEST"
