"""GPU-only paths: compiled Triton kernels, CUDA graphs, pinned staging, CUDA-event timing, NCCL, NVML.

On a machine without CUDA these tests skip and say why. perf/gpu_device_check.sh sets DRIFFUSION_TEST_GPU=1, which
turns a missing GPU into a failure: the device check must fail loudly when a GPU path cannot run. The proof's
sections (perf/gpu_proof.py) run here too, at small sizes; each must report no FAIL.
"""
import os
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from driffusion_rt import Sampler, kernels
from driffusion_rt.noise import PinnedStage, draw_noise

REQUIRED = os.environ.get("DRIFFUSION_TEST_GPU") == "1"
HAVE = torch.cuda.is_available()
if REQUIRED and not HAVE:
    raise RuntimeError("DRIFFUSION_TEST_GPU=1 but torch.cuda.is_available() is False: the GPU tests cannot run")
pytestmark = pytest.mark.skipif(not HAVE, reason="needs a CUDA GPU (run perf/gpu_device_check.sh on a GPU machine)")


def tiny_unet():
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval().cuda()
    return lambda x, t: unet(x, t).sample


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compiled_kernels_equal_the_fallback(dtype):
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "kernels must be compiled, not interpreted, here"
    g = torch.Generator(device="cuda").manual_seed(0)
    x, o, z = (torch.randn(2, 4, 96, 96, device="cuda", generator=g).to(dtype) for _ in range(3))
    coef = torch.randn(5, 3, device="cuda", generator=g)
    a = torch.empty(5, *x.shape, device="cuda", dtype=dtype)
    arena = torch.cat([x[None], o[None], z[None], a])
    rows = lambda r: torch.tensor(r, device="cuda")  # noqa: E731
    outs = []
    for name in ("triton", "torch"):
        buf = arena.clone()
        with kernels.backend(name):
            kernels.combine(buf, rows(range(3, 8)), rows([0, 1, 2]), coef)
        outs.append(buf[3:].float())
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item() <= tol


@pytest.mark.parametrize("sched", [DDIMScheduler(clip_sample=False), EulerDiscreteScheduler(),
                                   DDPMScheduler(clip_sample=False)], ids=["ddim", "euler", "ddpm"])
@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
def test_cuda_graphs_on_and_off_give_equal_results(sched, mode):
    model = tiny_unet()
    x = torch.randn(2, 4, 16, 16, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    outs = []
    with torch.no_grad():
        for graphs in (True, False):
            s = Sampler(model, cuda_graphs=graphs)
            for _ in range(2):  # the second request replays the captured graphs
                out = s(sched, x, steps=12, mode=mode, parallel=3, generator=torch.Generator().manual_seed(2))
            outs.append(out.sample)
            if graphs:
                assert len(s._graphs.graphs) >= 2
    assert ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item() <= 1e-5


def test_pinned_staging_draws_what_diffusers_draws():
    from diffusers.utils.torch_utils import randn_tensor
    latent = torch.empty(2, 4, 8, 8, device="cuda")
    stage = PinnedStage(2, latent.shape, latent.dtype)
    host = stage.take()
    assert host.is_pinned()
    out = draw_noise(torch.empty_like(latent), torch.Generator().manual_seed(5), None, host[0])
    stage.queued()
    ref = randn_tensor(latent.shape, generator=torch.Generator().manual_seed(5), device=torch.device("cuda"))
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


def test_phase_times_come_from_cuda_events():
    model = tiny_unet()
    x = torch.randn(1, 4, 16, 16, device="cuda")
    with torch.no_grad():
        out = Sampler(model)(DDIMScheduler(clip_sample=False), x, steps=10, mode="aggressive", parallel=2)
    st = out.stats
    assert st.phases["model"] > 0 and all(v >= 0 for v in st.phases.values())
    assert sum(st.phases.values()) <= st.wall_time * 1.05
    assert out.host is not None and out.host.is_pinned() and torch.equal(out.cpu(), out.sample.cpu())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs at least 2 visible GPUs")
def test_nccl_distributed_equals_local(tmp_path):
    n = torch.cuda.device_count()
    out = tmp_path / "equal.json"
    worker = os.path.join(os.path.dirname(__file__), "dist_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                        worker, "equal", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())
    assert rows and all(row["rel_err"] <= 1e-5 for row in rows)
    reused = [row for row in rows if "buffer_ptrs" in row]  # only the draft-and-refine rows record buffer reuse
    assert reused and all(row["buffer_ptrs"] == 1 for row in reused)


def test_nvtx_ranges_leave_results_unchanged(monkeypatch):
    import driffusion_rt.results as results_module
    model = tiny_unet()
    x = torch.randn(1, 4, 16, 16, device="cuda")
    sched = DDIMScheduler(clip_sample=False)
    with torch.no_grad():
        plain = Sampler(model)(sched, x, steps=8, mode="aggressive", parallel=2).sample
        monkeypatch.setattr(results_module, "NVTX", True)
        ranged = Sampler(model)(sched, x, steps=8, mode="aggressive", parallel=2).sample
    assert torch.equal(plain, ranged)


# ---------------------------------------------------------------------------------------------- the proof's checks


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "perf"))
    import gpu_proof
    args = gpu_proof.parser().parse_args(["--out", str(tmp_path_factory.mktemp("proof")), "--sd-size", "128",
                                          "--sd-steps", "8", "--widths", "1", "2", "--repeats", "1",
                                          "--big-elements", "2.4e9"])
    gpu_proof.quiet()
    return gpu_proof, args


@pytest.mark.parametrize("section", ["kernels", "pipelines", "staging", "models", "sd15", "nccl", "cli", "nvml"])
def test_proof_section_reports_no_failure(proof, section):
    gpu_proof, args = proof
    if section == "kernels" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would interpret the kernels on the GPU (set DRIFFUSION_TEST_GPU=1)")
    p = gpu_proof.Proof(args)
    with torch.no_grad() if section != "nccl" else __import__("contextlib").nullcontext():
        p.section(section, gpu_proof.RUN[section])
    assert p.checks, section
    assert not p.failed, p.failed
    if section == "nccl":  # two ranks on this one GPU: refused on every rank, status 2, one message
        assert any(c["name"] == "nccl.two_ranks_one_gpu_refused" and c["status"] == "PASS" for c in p.checks)


def test_staging_copies_queued_behind_a_device_sleep(proof):
    """The control must corrupt (the copies really queue behind the sleep) and the pinned stage must not."""
    gpu_proof, args = proof
    p = gpu_proof.Proof(args)
    with torch.no_grad():
        gpu_proof.staging_section(p)
    status = {c["name"]: c["status"] for c in p.checks}
    assert status == {"staging.race_is_observable": "PASS", "staging.pinned_rows_survive_queued_copies": "PASS",
                      "staging.ddpm_aggressive_n4_cpu_generator": "PASS"}, p.checks


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 visible GPUs: a latent on a non-current device")
def test_sampler_and_kernels_follow_the_latent_device(proof):
    gpu_proof, args = proof
    p = gpu_proof.Proof(args)
    with torch.no_grad():
        gpu_proof.scope_section(p)
    assert [c["status"] for c in p.checks] == ["PASS"], p.checks
    arena = torch.randn(3, 1000, device="cuda:1")
    ref = arena[0] * 2 + arena[1]
    with torch.cuda.device(0):
        kernels.combine(arena, torch.tensor([2], device="cuda:1"), torch.tensor([0, 1], device="cuda:1"),
                        torch.tensor([[2.0, 1.0]], device="cuda:1"))
    torch.testing.assert_close(arena[2], ref)
