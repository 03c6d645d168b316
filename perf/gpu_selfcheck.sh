#!/usr/bin/env bash
# One command for a person with a CUDA machine: install (offline if need be), prove the GPU paths, test, benchmark.
#   bash perf/gpu_selfcheck.sh            (from anywhere in the checkout; uses the current Python environment)
# Offline: run `bash perf/gpu_wheels.sh` on a machine with network first and bring perf/wheels/ along; when
# perf/wheels/ holds wheels they are installed with --no-index --no-deps, then the project with
# --no-index --no-build-isolation --no-deps -e . (nothing is downloaded). Without perf/wheels/ the project is
# installed from the package index with its test and perf extras.
# Fails (non-zero exit, FAILED in the summary) if any GPU path is broken: perf/gpu_proof.py (compiled Triton kernels,
# CUDA graphs on vs off, pinned staging, CUDA-event timing, NCCL, NVML), the GPU tests, the kernel and sampler
# tests with compiled kernels, generate on every GPU, and the benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-perf/results/gpu_selfcheck}
WHEELS=${WHEELS:-perf/wheels}
declare -a summary
status=0
step() {  # step NAME COMMAND...: run, record PASS/FAILED
  local name=$1; shift
  echo "=== $name: $*"
  if "$@" 2>&1 | tee "$OUT/$(echo "$name" | tr ' /()' '____').log"; then summary+=("PASS    $name")
  else summary+=("FAILED  $name"); status=1; fi
}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "FAILED: torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)"; exit 1; }
nvidia-smi -L || true
mkdir -p "$OUT"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  step "install carried wheels (offline)" "$PYTHON" -m pip install --no-index --no-deps "$WHEELS"/*.whl
  step "install the project (offline)" "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -e .
else
  step "install" "$PYTHON" -m pip install -e ".[test,perf]"
fi
"$PYTHON" -c "import diffusers" 2>/dev/null || {
  echo "FAILED: diffusers is not importable: on a machine without network run perf/gpu_wheels.sh elsewhere and"
  echo "        bring $WHEELS/ along"; exit 1; }
export DRIFFUSION_TEST_GPU=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
step "gpu proof (perf/gpu_proof.py)" "$PYTHON" perf/gpu_proof.py --out "$OUT"
step "gpu tests" "$PYTHON" -m pytest -q -rs tests/test_gpu.py
step "kernel tests compiled on GPU" "$PYTHON" -m pytest -q tests/test_kernels.py
step "sampler tests" "$PYTHON" -m pytest -q tests/test_sampler.py tests/test_trajectory.py
step "generate on every GPU (NCCL)" bash launch/single_node.sh --steps 30 --out "$OUT/generate"
step "graphs off" bash launch/single_node.sh --steps 30 --no-cuda-graphs --out "$OUT/generate"
step "kernel benchmark" "$PYTHON" perf/bench_kernels.py --out "$OUT"
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [[ "$gpus" -gt 1 ]]; then
  step "latency benchmark" "$PYTHON" perf/bench_latency.py --out "$OUT"
else  # one GPU: draft-and-refine on the single device, a round's drafts batched
  step "latency benchmark (one GPU)" "$PYTHON" perf/bench_latency.py --ranks 1 --parallel 2 4 --out "$OUT"
fi
echo
echo "=== GPU self-check summary ($(date -u +%F))"
printf '%s\n' "${summary[@]}"
[[ $status -eq 0 ]] && echo "ALL PASSED" || echo "SOME CHECKS FAILED (logs in $OUT)"
exit $status
