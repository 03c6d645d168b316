#!/usr/bin/env bash
# Several nodes: run this script on every node with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then cat <<'HELP'
launch/multi_node.sh [generate flags...]     (run once on each node)
Runs torchrun with a c10d rendezvous so that NNODES x NPROC ranks form one job of driffusion_rt.generate.
Variables:
  NNODES       number of nodes (required)
  NODE_RANK    this node's index, 0 .. NNODES-1 (required)
  MASTER_ADDR  host name or IP of node 0, reachable from every node (required)
  MASTER_PORT  free TCP port on node 0 for the rendezvous (default 29500)
  NPROC        ranks per node (default: visible CUDA devices; even with --cfg-parallel 2, so that each guidance
               pair, two consecutive ranks, shares a node and its NVLink: the runtime refuses an odd NPROC)
  RDZV_ID      job id shared by all nodes (default driffusion)
  PYTHON       the Python interpreter (default: python)
  DRY_RUN=1    print the command and exit
NCCL knobs (exported as-is to every rank; see the NCCL documentation):
  NCCL_SOCKET_IFNAME  network interface for bootstrap/socket traffic, e.g. eth0 or ib0 (pin it on multi-homed hosts)
  NCCL_IB_DISABLE=1   disable InfiniBand/RoCE (debugging, or hosts without it)
  NCCL_IB_HCA         which InfiniBand adapters to use, e.g. mlx5_0,mlx5_1
  NCCL_DEBUG=INFO     print NCCL's topology and transport choices at start-up (WARN for failures only)
  NCCL_P2P_DISABLE=1  disable direct GPU peer-to-peer (debugging PCIe/NVLink issues)
Failure handling (docs/cli.md, "Failure handling"):
  generate's --load-timeout (default 1800 s) covers joining the job and loading the model: a rank that loads
  slowly does not fail the job. After a barrier, every collective waits at most --timeout (default 60 s): the
  rank blocks on it (Work.wait with that timeout, on NCCL too) and a hung peer is reported by the waiting ranks as
  "driffusion_rt: rank R failed: CollectiveTimeout: ... did not complete within 60 s: another rank is hung or has
  died", a dead one (its connection closed) at once as "... failed after 0.15 s: another rank has died"; then the
  job ends.
  The runtime's NCCL group has a timeout max(5 s, 10%) longer than --timeout, so that report comes first; NCCL's
  watchdog is the backstop:
  TORCH_NCCL_ASYNC_ERROR_HANDLING  what the watchdog does when a collective passes the group's timeout:
                      1 (torchrun's default) abort the communicators and the process, 3 abort without cleanup,
                      0 no action (the runtime's own wait still ends the job after --timeout)
  TORCH_NCCL_BLOCKING_WAIT=1  not needed: the runtime's waits already block with an explicit timeout
  TORCH_NCCL_ENABLE_MONITORING / TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC  abort a process whose watchdog itself hangs
  TORCH_NCCL_TRACE_BUFFER_SIZE=2000 TORCH_NCCL_DUMP_ON_TIMEOUT=1  flight-recorder dump of the last collectives
                      on a timeout, for debugging a hang
HELP
exit 0; fi
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
PYTHON=${PYTHON:-python}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-$("$PYTHON" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
cmd=("$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC"
     --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-driffusion}"
     -m driffusion_rt.generate "$@")
echo "launch (node $NODE_RANK of $NNODES): ${cmd[*]}"
[[ "${DRY_RUN:-0}" == "1" ]] && exit 0
exec "${cmd[@]}"
