#!/usr/bin/env bash
# Profile a torchrun job of driffusion_rt.generate under Nsight Systems, with an NVTX range per round and per phase
# (draft, model, comm, refine, check). Ranges exist only when DRIFFUSION_NVTX=1, which this script sets: an
# unprofiled run pays nothing for them.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then cat <<'HELP'
perf/nsys.sh [generate flags...]        e.g. perf/nsys.sh --model DIR --prompt "a cat" --mode aggressive --steps 30
Variables:
  NPROC   ranks (default: visible CUDA devices)
  OUT     report path without extension (default perf/results/nsys/driffusion)
  NSYS    the nsys binary (default: nsys on PATH)
  PYTHON  the Python interpreter (default: python)
Writes OUT.nsys-rep (open it in the Nsight Systems GUI) and prints the NVTX range summary (`nsys stats`).
HELP
exit 0; fi
NSYS=${NSYS:-nsys}
PYTHON=${PYTHON:-python}
command -v "$NSYS" >/dev/null || { echo "nsys not found: install Nsight Systems or set NSYS=/path/to/nsys" >&2; exit 1; }
NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
OUT=${OUT:-perf/results/nsys/driffusion}
mkdir -p "$(dirname "$OUT")"
export DRIFFUSION_NVTX=1
cmd=("$NSYS" profile --trace=cuda,nvtx,osrt --sample=none --force-overwrite=true --output="$OUT"
     "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m driffusion_rt.generate "$@")
echo "profile: ${cmd[*]}"
"${cmd[@]}"
"$NSYS" stats --report nvtx_sum --format table "$OUT.nsys-rep"
