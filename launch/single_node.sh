#!/usr/bin/env bash
# One node: one rank per visible GPU (NCCL), or 2 CPU ranks (gloo) when there is no GPU.
# Usage: launch/single_node.sh [generate flags...]      e.g. launch/single_node.sh --mode conservative --steps 30
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then cat <<'HELP'
launch/single_node.sh [generate flags...]
Runs `torchrun --standalone --nproc_per_node=N -m driffusion_rt.generate [flags]` on this machine.
Variables:
  NPROC      ranks to start (default: the number of visible CUDA devices, or 2 on a CPU-only machine)
  PYTHON     the Python interpreter, for this script's device count and torchrun alike (default: python3)
  DRY_RUN=1  print the command and exit without running it
  CUDA_VISIBLE_DEVICES  restricts which GPUs are used (and so the default NPROC)
Flags after the script name are passed to driffusion_rt.generate (see `python -m driffusion_rt.generate --help`);
e.g. `launch/single_node.sh --cfg-parallel 2` on 8 GPUs runs 4 draft ranks x 2 guidance ranks.
HELP
exit 0; fi
PYTHON=${PYTHON:-python3}
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
NPROC=${NPROC:-$([[ "$gpus" -gt 0 ]] && echo "$gpus" || echo 2)}
cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m driffusion_rt.generate "$@")
echo "launch: ${cmd[*]}  ($([[ "$gpus" -gt 0 ]] && echo "$gpus GPU(s): one rank per GPU, NCCL between ranks" || echo "no GPU, gloo on CPU"))"
[[ "${DRY_RUN:-0}" == "1" ]] && exit 0
exec "${cmd[@]}"
