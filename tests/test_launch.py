"""launch/ scripts: --help documents the variables, and a dry run prints the torchrun command it would run."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, **env):
    return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable, **env), timeout=60)


@pytest.mark.parametrize("script,variables", [
    ("single_node.sh", ["NPROC", "PYTHON", "DRY_RUN", "CUDA_VISIBLE_DEVICES"]),
    ("multi_node.sh", ["NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG"]),
    ("slurm.sbatch", ["GPUS_PER_NODE", "MASTER_PORT", "REPO", "SLURM_NODEID"]),
])
def test_help_explains_every_variable(script, variables):
    r = run(script, "--help")
    assert r.returncode == 0 and all(v in r.stdout for v in variables)


def test_single_node_dry_run_on_cpu_uses_two_gloo_ranks():
    r = run("single_node.sh", "--steps", "10", DRY_RUN="1")
    assert r.returncode == 0
    assert "--standalone --nproc_per_node=2 -m driffusion_rt.generate --steps 10" in r.stdout and "gloo" in r.stdout


def test_multi_node_dry_run_and_missing_variables():
    r = run("multi_node.sh", "--mode", "conservative", DRY_RUN="1", NNODES="2", NODE_RANK="1",
            MASTER_ADDR="10.0.0.1", NPROC="4")
    assert r.returncode == 0
    assert "--nnodes=2 --node_rank=1 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29500" in r.stdout
    r = run("multi_node.sh", NNODES="2")
    assert r.returncode != 0 and "NODE_RANK" in r.stderr
