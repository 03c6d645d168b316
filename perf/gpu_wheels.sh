#!/usr/bin/env bash
# Download the Python wheels a GPU machine without network lacks, into perf/wheels/ (git-ignored).
#   bash perf/gpu_wheels.sh [EXTRA_SPEC...]      (on a machine with network, from anywhere in the checkout)
# The device image has torch, triton, transformers, tokenizers, huggingface-hub, safetensors, numpy, pillow, regex,
# requests, filelock, nvidia-ml-py, pytest, scikit-learn, scipy, matplotlib, anyio, click and h11, but not:
#   diffusers           the runtime's model library. Of what it declares (importlib_metadata, filelock,
#                       huggingface-hub>=1.32, numpy, regex, requests, safetensors>=0.8, Pillow) the image lacks only
#                       importlib_metadata, which diffusers imports only on Python < 3.8: on the image's 3.12 it is
#                       never imported (tests/test_packaging.py checks that), so it is not carried (--no-deps
#                       installs skip declared needs; its own need, zipp, would be missing there too)
#   starlette, uvicorn  the HTTP server (driffusion_rt.serve; needs anyio, typing-extensions / click, h11: there)
# Versions are requirements-cpu.txt's. EXTRA_SPEC (e.g. transformers==5.23.0) adds wheels for another version of
# a package the image has. Then on the GPU machine, from the repository root: bash perf/gpu_device_check.sh
# (it installs them with pip install --no-index --no-deps perf/wheels/*.whl, then runs the proof and GPU tests).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-perf/wheels}
PY=${PY_VERSION:-3.12}    # the device image's Python
pin() { grep -E "^$1==" requirements-cpu.txt | head -1; }
specs=("$(pin diffusers)" "$(pin starlette)" "$(pin uvicorn)" "$@")
mkdir -p "$DEST"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$DEST" "${specs[@]}"
echo "gpu_wheels: ${specs[*]} -> $DEST ($(du -sh "$DEST" | cut -f1)):"
ls -1 "$DEST"
