"""Guidance-parallel layouts (cfg x draft ranks): the split of a guided call, the choices and their errors, and
2 / 4 gloo ranks against in-rank guidance."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import tiny_pipelines as tp
from driffusion_rt.layout import Layout, denoisers, guided, resolve
from driffusion_rt.evaluator import ModelCall

HERE = os.path.dirname(os.path.abspath(__file__))


def torchrun(nproc, *args, timeout=420):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))


@pytest.mark.parametrize("value,world,is_guided,expect", [
    ("1", 2, True, 1), ("2", 2, True, 2), ("2", 4, True, 2), ("auto", 4, True, 2), ("auto", 3, True, 1),
    ("auto", 2, False, 1), (2, 8, True, 2)])
def test_resolve(value, world, is_guided, expect):
    assert resolve(value, world, is_guided) == expect


@pytest.mark.parametrize("value,world,is_guided,message", [
    ("2", 3, True, "--cfg-parallel 2 needs a number of ranks divisible by 2; this job has 3 ranks"),
    ("2", 1, True, "this job has 1 rank$"),
    ("2", 2, False, "--cfg-parallel 2 splits classifier-free guidance across ranks, but this request's model calls "
                    "are not guided"),
    ("4", 4, True, "cfg_parallel must be one of 1, 2, auto, got '4'"),
])
def test_bad_choices_are_refused_clearly(value, world, is_guided, message):
    with pytest.raises(ValueError, match=message):
        resolve(value, world, is_guided)


def test_a_pair_must_share_a_node(monkeypatch):
    """Pairs are consecutive ranks: on 2 nodes of 3 ranks, ranks 2 and 3 would straddle the nodes."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"the ranks per node \(--nproc_per_node, here 3\) must be divisible by 2"):
        resolve("2", 6, True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resolve("2", 8, True) == 2


def test_guided_follows_each_model():
    from driffusion_rt.fixed_cost import FixedCostModel
    from driffusion_rt.pipelines.flux import FluxAdapter
    from driffusion_rt.pipelines.sd import UNetAdapter
    unet = UNetAdapter(torch.nn.Identity())
    assert guided(unet, {"negative_prompt_embeds": 1}) and not guided(unet, {"prompt_embeds": 1})
    assert guided(FluxAdapter(None), {"negative_prompt_embeds": 1, "batched_cfg": True})
    assert not guided(FluxAdapter(None), {"negative_prompt_embeds": 1, "batched_cfg": False})  # two separate calls
    assert guided(FixedCostModel(0.0, guidance=2.0), {}) and not guided(FixedCostModel(0.0), {})


def test_denoisers_are_found_once():
    from driffusion_rt.fixed_cost import FixedCostModel
    model = FixedCostModel(0.0, guidance=2.0)
    assert denoisers(model, None) == [model.denoiser]

    class Pipe:
        unet = torch.nn.Linear(2, 2)
        controlnet = torch.nn.Linear(2, 2)
    assert denoisers(type("Adapter", (), {"unet": Pipe.unet})(), Pipe()) == [Pipe.unet, Pipe.controlnet]


def test_the_pre_hook_hands_each_rank_its_half_of_a_doubled_call_only():
    """Inside a runtime call of N rows, a denoiser call on 2N rows is cut to this rank's half (every tensor argument
    with 2N rows, nested ones too); a call that is not doubled runs whole."""
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x, t, cond=None):
            seen.append((x.clone(), t.clone(), {k: v.clone() for k, v in (cond or {}).items()}))
            return x

    net = Net()
    layout = Layout(cfg=2, draft=1, cfg_rank=1, draft_rank=0)
    pre, post = layout.apply(net)
    post.remove()  # (the exchange needs a process group: the torchrun tests cover it)

    def model(x, t):  # an adapter: uncond and cond stacked, as every family's adapter does
        net(torch.cat([x, x + 100]), torch.cat([t, t]), cond={"emb": torch.arange(2.0 * len(x)), "pooled": torch.ones(3)})
        net(x, t)  # not doubled: whole
        return x

    traj = type("Traj", (), {"input_divisor": torch.ones(1), "timesteps": torch.tensor([7])})()
    x = torch.randn(3, 2)
    ModelCall(model, traj, x, None)(x[None], (0,), torch.empty(1, 3, 2))
    (half_x, half_t, half_cond), (whole_x, _, _) = seen
    assert torch.equal(half_x, x + 100) and half_t.shape == (3,)  # cfg rank 1: the cond half
    assert torch.equal(half_cond["emb"], torch.arange(3.0, 6.0)) and half_cond["pooled"].shape == (3,)
    assert torch.equal(whole_x, x)
    net(torch.randn(6, 2), torch.zeros(6))  # outside a runtime call: whole
    assert seen[-1][0].shape == (6, 2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg_pipelines")
    return {kind: tp.build(kind, str(root / kind)) for kind in ("sd15", "sdxl", "flux")}


@pytest.mark.slow
def test_two_ranks_split_guidance_and_equal_in_rank_guidance(tiny, tmp_path):
    out = tmp_path / "pairs.json"
    r = torchrun(2, os.path.join(HERE, "cfg_worker.py"), "pairs", str(out), tiny["sd15"], tiny["sdxl"], tiny["flux"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert sorted((row["family"], row["rank"]) for row in rows) == [(f, k) for f in ("flux", "sd", "sdxl") for k in (0, 1)]
    for row in rows:
        print(f"\ncfg 2 x draft 1, {row['family']} rank {row['rank']}: rel err {row['rel_err']:.2e}")
        assert row["guided"] and row["rel_err"] <= 1e-6 and row["ranks_agree"], row
        assert row["layout"]["cfg"] == 2 and row["layout"]["draft_ranks"] == 1 and row["parallel"] == 1
        assert row["layout"]["cfg_rank"] == row["rank"]


@pytest.mark.slow
def test_four_ranks_as_two_by_two_equal_the_local_evaluator(tiny, tmp_path):
    out = tmp_path / "grid.json"
    r = torchrun(4, os.path.join(HERE, "cfg_worker.py"), "grid", str(out), tiny["sd15"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 4 * 5  # ranks x (aggressive, conservative, extrapolated drafts, picard, parasolver)
    for row in rows:
        assert row["rel_err"] <= 1e-6 and row["ranks_agree"] and row["parallel"] == 2, row
        assert (row["layout"]["cfg_rank"], row["layout"]["draft_rank"]) == (row["rank"] % 2, row["rank"] // 2)


def test_cli_refuses_a_world_the_layout_cannot_divide_before_loading(tmp_path, monkeypatch):
    from driffusion_rt import generate, services
    loaded = []
    monkeypatch.setattr(services, "load_service", lambda *a, **k: loaded.append(1))
    with pytest.raises(SystemExit) as e:
        generate.main(["--cfg-parallel", "2", "--steps", "4", "--out", str(tmp_path)])
    assert e.value.code == 2 and not loaded and not any(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_under_two_ranks_records_the_layout_and_equals_one_process(tmp_path):
    common = ["--steps", "8", "--prompt", "07", "--mode", "aggressive", "--warmup", "0"]
    r = torchrun(2, "-m", "driffusion_rt.generate", *common, "--cfg-parallel", "2", "--out", str(tmp_path / "pair"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layout: cfg 2 x draft ranks 1, parallel n = 1" in r.stdout and r.stdout.count("layout:") == 1
    (run,) = [json.loads(p.read_text()) for p in (tmp_path / "pair").glob("*.json")]
    assert run["layout"] == {"cfg": 2, "draft_ranks": 1, "ulysses": 1, "ring": 1, "parallel": 1} and run["ranks"] == 2
    one = subprocess.run([sys.executable, "-m", "driffusion_rt.generate", *common, "--parallel", "1",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    from PIL import Image
    import numpy as np
    (a,), (b,) = (list((tmp_path / d).glob("*.png")) for d in ("pair", "one"))
    assert np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max() <= 1
    # guidance off with a pair: one clear message, exit 2, nothing written
    off = torchrun(2, "-m", "driffusion_rt.generate", *common, "--cfg-parallel", "2", "--guidance-scale", "1",
                   "--out", str(tmp_path / "off"))
    assert off.returncode != 0 and not (tmp_path / "off").exists() or not any((tmp_path / "off").iterdir())
    text = off.stdout + off.stderr
    assert len(re.findall(r"splits classifier-free guidance across ranks", text)) == 1, text[-2000:]


@pytest.mark.slow
def test_an_engine_with_a_guidance_pair_serves_guided_requests_and_refuses_others(tmp_path):
    out = tmp_path / "engine.json"
    r = torchrun(2, os.path.join(HERE, "cfg_worker.py"), "engine", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    guided_a, unguided, guided_b = json.loads(out.read_text())
    assert not unguided["ok"] and unguided["status"] == 422
    assert "splits classifier-free guidance across ranks (--cfg-parallel 2)" in unguided["error"]
    from driffusion_rt import services
    from driffusion_rt.engine import Engine
    local = Engine(services.load_service("digits", torch.device("cpu")))  # one process, guidance in the call
    for row in (guided_a, guided_b):
        assert row["ok"] and row["stats"]["cfg_parallel"] == 2 and row["stats"]["parallel"] == 1, row
        ref = local.generate(row["spec"]).latent
        got = torch.tensor(row["latent"])
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-5
