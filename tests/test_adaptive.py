"""Error-controlled sampling (mode="adaptive"): exact at tolerance 0, the aggressive plan at an unbounded tolerance,
calibrated in between (the final sample's mean relative deviation from sequential stays within the tolerance on the
Gaussian mixture, the digits model and a tiny SD pipeline), stochastic spread kept, the same on two gloo ranks."""
import json
import math
import os
import re
import warnings

import pytest
import torch
import tiny_pipelines as tp
from test_distributed import torchrun

from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler, sample
from driffusion_rt import digits as dg
from driffusion_rt import generate
from driffusion_rt import schedulers as named
from driffusion_rt.pipelines import DRiffusionPipeline, load_pipeline, text_to_image
from driffusion_rt.windows import sensitivities, width, window
from driffusion_rt.trajectory import Trajectory

F64 = torch.float64
MIX = GaussianMixture.random(8, shape=(4, 8, 8), seed=0)
TOLERANCES = (1e-2, 1e-3, 1e-4)
HERE = os.path.dirname(os.path.abspath(__file__))


def scheduler(name):
    return named.toy(name) if name in named.TOY else named.build(name, named.toy("ddim").config)


def rel_dev(x, ref) -> float:
    """Mean over samples of |x - ref| / |ref| (perf/quality.py's measure)."""
    x, ref = x.reshape(len(x), -1).double(), ref.reshape(len(ref), -1).double()
    return float(((x - ref).norm(dim=1) / ref.norm(dim=1)).mean())


def gen():
    return torch.Generator().manual_seed(3)


def noise(batch, shape=(4, 8, 8)):
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0), dtype=F64)


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "euler"])
def test_tolerance_zero_reproduces_sequential(name):
    sched, S = scheduler(name), 20
    model, x = GaussianMixtureModel.for_scheduler(MIX, sched, S), noise(3)
    seq = sample(model, sched, x, steps=S, mode="sequential").sample
    for n in (2, 4):
        out = sample(model, sched, x, steps=S, mode="adaptive", parallel=n, tolerance=0.0)
        assert rel_dev(out.sample, seq) <= 1e-12, n
        st = out.stats
        assert sum(st.accepted) == S and st.estimate == 0.0
        assert [a for a, *_ in st.trace] == [sum(st.accepted[:r]) for r in range(len(st.accepted))]
        assert st.batch_widths == [k for _, k, _ in st.trace] and st.model_evals == sum(st.batch_widths)
        assert st.serial_rounds == len(st.trace) <= S and max(st.batch_widths) == n


@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "ddpm"])
def test_an_unbounded_tolerance_is_the_aggressive_plan_with_extrapolated_drafts(name):
    """Every guess accepted: the same drafts, refines, serial rounds and evaluations as aggressive mode."""
    sched, S = scheduler(name), 20
    model, x = GaussianMixtureModel.for_scheduler(MIX, sched, S), noise(2)
    for n in (2, 4):
        agg = sample(model, sched, x, steps=S, mode="aggressive", parallel=n, drafts="extrapolate", generator=gen())
        out = sample(model, sched, x, steps=S, mode="adaptive", parallel=n, tolerance=math.inf, generator=gen())
        assert rel_dev(out.sample, agg.sample) <= 1e-12, n
        assert (out.stats.serial_rounds, out.stats.model_evals) == (agg.stats.serial_rounds, agg.stats.model_evals)
        assert out.stats.accepted == [1] + [width(Trajectory.from_scheduler(sched, S), a, n)
                                             for a, *_ in out.stats.trace[1:]]


def test_window_rows_are_the_scheduler_chain():
    """A window's refined rows are express() with the window's outputs; the first guesses beyond them hold or
    extrapolate the last output; sensitivities are positive and finite."""
    traj = Trajectory.from_scheduler(scheduler("dpm++2m"), 12)
    w = window(traj, 3, 4)
    assert (w.anchor, w.width, len(w.rows), len(w.registers)) == (3, 4, 4 + 3 + 1, 4)
    (r6,), _ = traj.express(3, [6], output=lambda l: {("d", l): 1.0})
    assert w.rows[6 - 3 - 1] == {("x" if k == ("x", 3) else ("d", k[1] - 3) if k[0] == "d" else k): v
                                 for k, v in r6.items() if v}
    assert all(0 < v < math.inf for v in sensitivities(traj))


def check_calibration(runs, seq, label):
    """Per tolerance: deviation within it, the run's own estimate within it, fewer rounds for looser ones."""
    rounds = []
    for tol, out in runs:
        dev = rel_dev(out.sample, seq)
        print(f"\n{label} tolerance {tol:g}: deviation {dev:.3e}, estimate {out.stats.estimate:.3e}, "
              f"{out.stats.serial_rounds} serial rounds, {out.stats.model_evals} evaluations")
        assert dev <= tol and out.stats.estimate <= tol, (tol, dev)
        rounds.append(out.stats.serial_rounds)
    assert rounds == sorted(rounds) and rounds[0] < runs[0][1].stats.steps // 2, rounds


def test_calibration_on_the_gaussian_mixture():
    sched, S = scheduler("ddim"), 50
    model, x = GaussianMixtureModel.for_scheduler(MIX, sched, S), noise(16)
    seq = sample(model, sched, x, steps=S, mode="sequential").sample
    check_calibration([(t, sample(model, sched, x, steps=S, mode="adaptive", parallel=4, tolerance=t))
                       for t in TOLERANCES], seq, "gmm DDIM n=4")


def test_calibration_on_the_digits_model():
    unet, sched = dg.load_digits_model(dtype=F64)
    model, S = dg.DigitsModel(unet), 50
    smp = Sampler(model)
    x = noise(4, (1, 8, 8))
    kw = {"labels": torch.tensor([0, 3, 7, 8]), "guidance_scale": dg.DEFAULT_GUIDANCE}
    seq = smp(sched, x, steps=S, mode="sequential", model_kwargs=kw).sample
    check_calibration([(t, smp(sched, x, steps=S, mode="adaptive", parallel=4, tolerance=t, model_kwargs=kw))
                       for t in TOLERANCES], seq, "digits DDIM n=4")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    pipe = load_pipeline(tp.build_sd(str(tmp_path_factory.mktemp("sd")), scheduler="ddim"), dtype=F64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_calibration_on_a_tiny_sd_pipeline_through_the_pipeline_forms(tiny_sd):
    kw = dict(steps=50, guidance_scale=7.5, seed=0, height=32, width=32, output_type="latent")
    prompt = ["a red cat", "a blue dog"]
    seq, _ = text_to_image(tiny_sd, prompt, mode="sequential", **kw)
    runs = []
    for t in TOLERANCES:
        lat, stats = text_to_image(tiny_sd, prompt, mode="adaptive", parallel=4, tolerance=t, **kw)
        runs.append((t, type("Out", (), {"sample": lat, "stats": stats})))
    check_calibration(runs, seq, "tiny SD DDIM n=4")
    wrapped = DRiffusionPipeline(tiny_sd, mode="adaptive", parallel=4, tolerance=TOLERANCES[1])
    lat = wrapped(prompt, num_inference_steps=50, guidance_scale=7.5, height=32, width=32, output_type="latent",
                  generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(lat, runs[1][1].sample) and wrapped.last_stats.accepted == runs[1][1].stats.accepted


@pytest.mark.parametrize("name", ["ddpm", "euler-a", "dpm++2m-sde"])
def test_stochastic_schedulers_keep_their_spread(name):
    """Exact Gaussian data (perf/bench_spread.py's): std(sample - mean) within 5% of the sequential sampler's, also
    at 2.5 model calls per parallel evaluation, where aggressive mode's spread grows several times."""
    mix = GaussianMixture.random(1, shape=(4, 8, 8), seed=0, std=0.5)
    mean = mix.means.view(1, 4, 8, 8)
    x = noise(32)
    sched = scheduler(name)
    for S, n in ((50, 4), (20, 8)):
        smp = Sampler(GaussianMixtureModel.for_scheduler(mix, sched, S))
        ref = (smp(sched, x, steps=S, mode="sequential", generator=gen()).sample - mean).std()
        out = smp(sched, x, steps=S, mode="adaptive", parallel=n, tolerance=1e-2, generator=gen())  # the loosest
        spread = float((out.sample - mean).std() / ref)
        print(f"\n{name} S={S} n={n} tolerance 0.01: spread {spread:.4f}, {out.stats.serial_rounds} rounds")
        assert abs(spread - 1) <= 0.05 and out.stats.serial_rounds < S, (S, n, spread)


@pytest.mark.parametrize("kwargs,message", [
    (dict(tolerance=-1e-3), "tolerance must be a number >= 0, got -0.001"),
    (dict(drafts="extrapolate"), "drafts='extrapolate' applies to modes aggressive and conservative"),
    (dict(window=2), r"\['window'\] apply to modes picard and parasolver only, not mode='adaptive'"),
    (dict(blend=lambda states, idx: None), "a blend .* not mode='adaptive'"),
])
def test_bad_options_fail_before_any_model_call(kwargs, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        sample(lambda x, t: calls.append(1) or x, scheduler("ddim"), torch.randn(1, 2, 2), steps=10,
               mode="adaptive", **kwargs)
    assert not calls


def test_conservative_with_a_multistep_scheduler_warns_below_five_calls_per_n():
    """UniPC (bh2 with its corrector) conservative at 10 steps and n = 4 drifts (perf/results/spread_multistep.md):
    a warning names what to use; at 5 calls per n and for DDIM (no registers) there is none."""
    sched = scheduler("unipc")
    model, x = GaussianMixtureModel.for_scheduler(MIX, sched, 10), noise(1)
    with pytest.warns(UserWarning, match=r"mode='conservative' with UniPCMultistepScheduler .* at least 5 model "
                                         r"calls .* Use mode='adaptive'.*parallel <= 2, or steps >= 20"):
        sample(model, sched, x, steps=10, mode="conservative", parallel=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(model, sched, x, steps=10, mode="conservative", parallel=2)
        sample(model, sched, x, steps=10, mode="aggressive", parallel=4)
        ddim = scheduler("ddim")
        sample(GaussianMixtureModel.for_scheduler(MIX, ddim, 10), ddim, x, steps=10, mode="conservative", parallel=4)


def test_the_command_line_reports_accepted_states_per_round(tmp_path, capsys):
    assert generate.main(["--model", "gmm", "--mode", "adaptive", "--parallel", "4", "--tolerance", "1e-3",
                          "--steps", "20", "--out", str(tmp_path), "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    run = json.loads(next(tmp_path.glob("gmm-adaptive-n4-s20-ddim-float32-seed0-*.json")).read_text())
    t = run["table"]
    assert sum(t["accepted"]) == 20 and len(t["accepted"]) == t["serial_rounds"] == run["serial_rounds"] < 20
    assert run["sampling"] == {"mode": "adaptive", "parallel": 4, "tolerance": 1e-3} and 0 < t["estimate"] <= 1e-3
    assert re.search(r"\naccepted states per round +" + " ".join(map(str, t["accepted"])) + "\n", out), out


def test_the_engine_serves_adaptive_requests_and_answers_422_to_bad_ones():
    """What the HTTP front queues: request fields in, stats out; bad values and refused combinations are 422."""
    from driffusion_rt import services
    from driffusion_rt.engine import Engine
    engine = Engine(services.load_service("digits", torch.device("cpu")))
    ok = engine.generate({"prompt": "37", "steps": 20, "mode": "adaptive", "parallel": 4, "tolerance": 1e-3})
    assert ok.ok and ok.stats["mode"] == "adaptive" and 1 < ok.stats["serial_rounds"] < 20, ok
    for spec, message in (({"mode": "adaptive", "tolerance": -1}, "tolerance must be a number >= 0"),
                          ({"mode": "adaptive", "window": 3}, "['window'] apply to modes picard and parasolver")):
        bad = engine.generate({"prompt": "3", "steps": 12, **spec})
        assert not bad.ok and bad.status == 422 and message in bad.error, (spec, bad)


@pytest.mark.slow
def test_two_gloo_ranks_equal_the_local_evaluator(tmp_path):
    out = tmp_path / "adaptive.json"
    r, _ = torchrun(2, os.path.join(HERE, "adaptive_worker.py"), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 6
    for row in rows:
        assert row["bitwise"] and row["trace"] == row["local_trace"], row
        assert row["serial_rounds"] < 16, row
