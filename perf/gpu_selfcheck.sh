#!/usr/bin/env bash
# One command for a person with a CUDA machine: install, run the GPU paths for real, benchmark, summarise.
#   bash perf/gpu_selfcheck.sh            (from the repository root; uses the current Python environment)
# Fails (non-zero exit, FAILED in the summary) if any GPU path is broken: compiled Triton kernels, CUDA graphs on
# vs off, pinned staging, CUDA-event timing, NCCL across every visible GPU, and the latency benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-perf/results/gpu_selfcheck}
declare -a summary
status=0
step() {  # step NAME COMMAND...: run, record PASS/FAILED
  local name=$1; shift
  echo "=== $name: $*"
  if "$@" 2>&1 | tee "$OUT/$(echo "$name" | tr ' /' '__').log"; then summary+=("PASS    $name")
  else summary+=("FAILED  $name"); status=1; fi
}
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "FAILED: torch.cuda.is_available() is False (no GPU, or a CPU-only torch build)"; exit 1; }
nvidia-smi -L || true
mkdir -p "$OUT"
step "install" "$PYTHON" -m pip install -e ".[test,perf]"
export DRIFFUSION_TEST_GPU=1 PYTHONUNBUFFERED=1
step "gpu paths (kernels compiled, graphs, pinned, events, NCCL)" "$PYTHON" -m pytest -q -rs tests/test_gpu.py
step "kernel tests compiled on GPU" "$PYTHON" -m pytest -q tests/test_kernels.py
step "sampler tests" "$PYTHON" -m pytest -q tests/test_sampler.py tests/test_trajectory.py
step "generate on every GPU (NCCL)" bash launch/single_node.sh --steps 30 --out "$OUT/generate"
step "graphs off" bash launch/single_node.sh --steps 30 --no-cuda-graphs
step "kernel benchmark" "$PYTHON" perf/bench_kernels.py --out "$OUT"
if [[ -f perf/bench_latency.py ]]; then
  step "latency benchmark" "$PYTHON" perf/bench_latency.py --out "$OUT"
fi
echo
echo "=== GPU self-check summary ($(date -u +%F))"
printf '%s\n' "${summary[@]}"
[[ $status -eq 0 ]] && echo "ALL PASSED" || echo "SOME CHECKS FAILED (logs in $OUT)"
exit $status
