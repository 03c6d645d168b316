"""Sequence-parallel layouts (draft x cfg x ulysses x ring): diffusers' context parallelism under the runtime's ranks.

The checks of a layout and of a model before anything loads, the families' token rules against the tokens their
transformers really see, and torchrun jobs on gloo: 2 ranks as 1 draft x Ulysses 2 against the unsplit model
(Flux, Wan 2.1 / 2.2, LTX, Flux.2, Qwen-Image, Qwen-Image-Edit; guidance in the call, img2img, LoRA; and the
engine), 4 ranks as 2 drafts x Ulysses 2 and as a guidance pair x Ulysses 2, and the command line's run JSON and its
refusals."""
import base64
import io
import json
import os
import re

import pytest
import torch

import tiny_families as tf
import tiny_pipelines as tp
import tiny_video as tv
from driffusion_rt import generate, serve, services
from driffusion_rt.fixed_cost import FixedCostModel
from driffusion_rt.layout import check_world, parallelize, resolve
from driffusion_rt.model_ref import inspect_model
from driffusion_rt.pipelines import (REGISTRY, check_sequence, component_configs, prepare, prepare_video)
from driffusion_rt.requests import RequestError, parse
from driffusion_rt.sequence import SequenceGroup
from serving import torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5  # float32, relative to the largest value of the unsplit result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq_pipelines")
    built = {kind: tp.build(kind, str(root / kind)) for kind in ("flux", "sd15")}
    built.update({kind: tv.build(kind, str(root / kind)) for kind in ("wan21", "wan22", "ltx", "wan22-5b",
                                                                       "wan21-i2v")})
    built.update({kind: tf.build(kind, str(root / kind)) for kind in ("flux2", "qwen", "qwen-edit")})
    return built


# ------------------------------------------------------------------------------------------ checks, in-process


@pytest.mark.parametrize("cfg,world,ulysses,ring,local,message", [
    ("1", 3, 2, 1, None, "--ulysses 2 needs a number of ranks divisible by 2; this job has 3 ranks"),
    ("2", 6, 2, 1, None, "--cfg-parallel 2 x --ulysses 2 needs a number of ranks divisible by 4; this job has 6"),
    ("1", 1, 1, 2, None, "--ring 2 needs an attention backend"),
    ("1", 4, 0, 1, None, "--ulysses must be an integer >= 1"),
    ("1", 8, 4, 1, "2", r"--ulysses 4 keeps a sequence group on one node: the ranks per node \(--nproc_per_node, "
                        r"here 2\) must be divisible by 4"),
])
def test_layouts_the_job_cannot_take_are_refused(monkeypatch, cfg, world, ulysses, ring, local, message):
    monkeypatch.delenv("DIFFUSERS_ATTN_BACKEND", raising=False)
    if local:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=message):
        check_world(cfg, world, ulysses, ring)


def test_ring_is_accepted_with_a_backend_that_returns_the_log_sum_exp(monkeypatch):
    monkeypatch.setenv("DIFFUSERS_ATTN_BACKEND", "_native_cudnn")
    check_world("1", 4, 2, 2)


@pytest.mark.parametrize("value,world,ulysses,expect", [("auto", 4, 2, 2), ("auto", 2, 2, 1), ("auto", 6, 2, 1),
                                                        ("1", 4, 2, 1), ("2", 8, 2, 2)])
def test_auto_pairs_only_whole_sequence_groups(value, world, ulysses, expect):
    assert resolve(value, world, True, ulysses) == expect


def test_a_sequence_split_outside_torchrun_is_refused_and_the_unsplit_layout_records_its_dims():
    model = FixedCostModel(0.0)
    with pytest.raises(ValueError, match="--ulysses 2 needs a number of ranks divisible by 2; this job has 1 rank$"):
        parallelize(model, info=None, ulysses=2)
    lay = parallelize(model, info=None).layout
    assert lay.describe()["ulysses"] == 1 and lay.describe()["ring"] == 1 and not lay.splits
    assert lay.summary() == "cfg 1 x draft ranks 1"


def test_the_fixed_cost_model_models_the_split():
    """Per rank: its share of the per-row cost plus the exchange's per-call cost (bench_latency's sequence axis)."""
    model = FixedCostModel(0.01, per_row=0.04, sequence_comm=0.005)
    assert model.denoiser.cost(2) == pytest.approx(0.01 + 0.08)
    model.context_parallel(SequenceGroup(2, 2, None))
    assert model.denoiser.cost(2) == pytest.approx(0.01 + 0.08 / 4 + 0.005)


def test_the_families_token_rules_count_what_their_transformers_see(tiny):
    """Exact: each family's rule (from the configs, before loading) gives the token count of the prepared latents,
    which the context-parallel plan splits (Flux, Flux.2, Qwen-Image: packed tokens; Wan: latent frames x patched
    rows x columns; LTX: packed tokens), and the configs read before loading equal the loaded pipeline's.
    (Qwen-Image-Edit's count, output and image tokens together, against its transformer's: the 2-rank job.)"""
    cases = [("flux", dict(height=48, width=32, max_sequence_length=tp.T5_MAX_LEN)),
             ("flux2", dict(height=48, width=32, max_sequence_length=128)),
             ("qwen", dict(height=48, width=32)),
             ("wan21", dict(height=48, width=32, num_frames=9, max_sequence_length=tv.T5_MAX_LEN)),
             ("ltx", dict(height=32, width=64, num_frames=17, max_sequence_length=tv.T5_MAX_LEN))]
    families = {"wan21": "wan", "qwen": "qwen-image"}
    for kind, kw in cases:
        pipe = tv.load(tiny[kind])
        family = REGISTRY[families.get(kind, kind)]
        image = kind in ("flux", "flux2", "qwen")
        req = (prepare if image else prepare_video)(pipe, "a cat", steps=2, seed=0, **kw)
        x = req.latents
        seen = x.shape[1] if kind != "wan21" else x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
        counts = family.sequence_tokens(component_configs(pipe), kw)
        video = [v for k, v in counts.items() if not k.startswith("text")]
        assert video == [seen], (kind, counts, tuple(x.shape))
        if kind in ("flux", "flux2"):
            assert counts["text tokens (max_sequence_length)"] == req.model_kwargs["prompt_embeds"].shape[1]
        before = inspect_model(tiny[kind]).configs
        assert family.sequence_tokens(before, kw) == counts
    # an edit: 64 x 32 is 2 x 1 output tokens; an image of 40 x 56 (height x width) is resized to 864 x 1216, 27 x 38
    # tokens (VAE 16)
    edit, resolved = REGISTRY["qwen-image-edit"], {"height": 64, "width": 32, "image": {"height": 40, "width": 56}}
    counts = edit.sequence_tokens(inspect_model(tiny["qwen-edit"]).configs, resolved)
    assert list(counts.values()) == [2 + 27 * 38], counts
    assert edit.sequence_tokens(component_configs(tv.load(tiny["qwen-edit"])), resolved) == counts
    assert edit.sequence_tokens({}, {"height": 64, "width": 32}) == {}  # no image yet: nothing to count


def test_a_model_the_split_cannot_take_is_refused_before_loading(tiny):
    flux = inspect_model(tiny["flux"])
    flux.check_sequence({"height": 32, "width": 32}, 2, 1)  # 64 image tokens, 512 text tokens, 2 heads
    edit = {"height": 32, "width": 32, "image": {"height": 40, "width": 56}}  # 1 output token, 27 x 38 of the image
    rules = [(tiny["sd15"], None, 2, "the sd family's denoiser does not have .*families with it: flux, flux2, "
                                     "qwen-image, qwen-image-edit, wan, ltx$"),
             (tiny["flux"], None, 4, r"--ulysses 4 gives each rank .* 1/4 of the transformer's attention heads, but "
                                     r"it has 2"),
             (tiny["flux"], {"height": 36, "width": 36}, 2, r"this request has 81 image tokens \(height / 4 x width "
                                                            r"/ 4\), not divisible by the sequence degree"),
             (tiny["wan21"], {"height": 48, "width": 48, "num_frames": 9}, 2, "this request has 27 video tokens"),
             (tiny["flux2"], {"height": 36, "width": 36}, 2, r"this request has 81 image tokens \(height / 4 x width "
                                                             r"/ 4\), not divisible"),
             (tiny["flux2"], {"max_sequence_length": 255}, 2, r"this request has 255 text tokens \(max_sequence"),
             (tiny["qwen"], {"height": 40, "width": 40}, 2, r"this request has 25 image tokens \(height / 8 x width "
                                                           r"/ 8\), not divisible"),
             (tiny["qwen-edit"], edit, 2, r"this request has 1027 image tokens \(height / 32 x width / 32 of the "
                                          r"output and of the edited image resized to 864 x 1216\)"),
             ("digits", None, 2, "--model digits is a built-in model")]
    for model, resolved, ulysses, message in rules:
        with pytest.raises(ValueError, match=message):
            inspect_model(model).check_sequence(resolved, ulysses, 1)
    inspect_model(tiny["qwen"]).check_sequence({"height": 32, "width": 48}, 2, 1)  # the prompt's tokens: no rule
    inspect_model(tiny["qwen-edit"]).check_sequence(dict(edit, height=64), 2, 1)  # 2 + 1026 tokens
    for name in ("hunyuan-video-1.5", "z-image"):  # no context-parallel plan in diffusers 0.42.1
        with pytest.raises(ValueError, match=f"the {name} family's denoiser does not have"):
            check_sequence(REGISTRY[name], {}, None, 1, 2)


def test_the_loaded_model_refuses_a_request_it_cannot_split(tiny):
    """What the configs could not tell before loading (a video's default frame count), per request: RequestError,
    which the engine answers with 422 and the command line with exit status 2."""
    service = services.load_service(tiny["wan21"], torch.device("cpu"))
    ok = service.admit(parse({"prompt": "a cat", "height": 32, "width": 32, "num_frames": 9}, service))
    services.check_sequence(service, ok, 2, 1)
    odd = service.admit(parse({"prompt": "a cat", "height": 48, "width": 48, "num_frames": 9}, service))
    with pytest.raises(RequestError, match="27 video tokens"):
        services.check_sequence(service, odd, 2, 1)
    # an edit's tokens: the output's (its size from the image once loaded, or given) and the image's
    edit = services.load_service(tiny["qwen-edit"], torch.device("cpu"))
    spec = {"prompt": "a cat", "image": _png(tp.image(0, 40, 56))}
    services.check_sequence(edit, edit.admit(parse(spec, edit)), 2, 1)  # 864 x 1216 out: 2 x 27 x 38 tokens
    with pytest.raises(RequestError, match="1027 image tokens"):
        services.check_sequence(edit, edit.admit(parse(dict(spec, height=32, width=32), edit)), 2, 1)


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _no_load(monkeypatch):
    loaded = []
    monkeypatch.setattr(services, "load_service", lambda *a, **k: loaded.append(1))
    monkeypatch.setattr(generate, "load_service", lambda *a, **k: loaded.append(1))
    monkeypatch.setattr(serve, "load_service", lambda *a, **k: loaded.append(1))
    return loaded


def test_the_command_line_and_the_server_refuse_bad_layouts_before_loading(tiny, tmp_path, monkeypatch, capsys):
    loaded = _no_load(monkeypatch)
    for main, argv, message in [
            (generate.main, ["--ulysses", "2", "--steps", "4", "--out", str(tmp_path)], "this job has 1 rank"),
            (serve.main, ["--model", tiny["flux"], "--ulysses", "2", "--port", "0"], "this job has 1 rank"),
            (generate.main, ["--ring", "0", "--out", str(tmp_path)], "--ring must be an integer >= 1")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("driffusion_rt: error:") == 1 and message in err, err
    assert not loaded and not any(tmp_path.iterdir())
    # the rules of the model, as rank 0 checks them for a job of 2 ranks before loading
    args = generate.parser().parse_args(["--model", tiny["flux"], "--prompt", "a cat", "--height", "36",
                                         "--width", "36", "--ulysses", "2", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="81 image tokens"):
        generate.preflight(args, generate.check_args(args), 2)
    assert not loaded and not any(tmp_path.iterdir())
    # an edit: the image's tokens count too (1 output token and 27 x 38 of the image, resized to 864 x 1216)
    image = tmp_path.parent / "edit-in.png"
    tp.image(0, 40, 56).save(image)
    args = generate.parser().parse_args(["--model", tiny["qwen-edit"], "--prompt", "a cat", "--image", str(image),
                                         "--height", "32", "--width", "32", "--ulysses", "2", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="1027 image tokens"):
        generate.preflight(args, generate.check_args(args), 2)
    assert not loaded and not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ torchrun jobs


def _rows(r, path):
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(open(path).read())


@pytest.mark.slow
def test_two_ranks_ulysses_2_equal_ulysses_1_for_flux_wan_ltx_flux2_and_qwen(tiny, tmp_path):
    out = str(tmp_path / "pairs.json")
    r, took = torchrun(os.path.join(HERE, "seq_worker.py"), "pairs", out, tiny["flux"], tiny["wan21"],
                       tiny["wan22"], tiny["ltx"], tiny["wan22-5b"], tiny["wan21-i2v"], tiny["flux2"], tiny["qwen"],
                       tiny["qwen-edit"])
    rows = _rows(r, out)
    cases = {row["case"] for row in rows}
    assert cases == {"flux true CFG", "flux LoRA", "flux img2img", "flux img2img (image_to_image)", "wan 2.1",
                     "wan 2.2", "ltx", "ltx (DRiffusionPipeline)", "wan 2.2 TI2V-5B", "wan 2.1 I2V", "flux2",
                     "qwen-image", "qwen-image-edit"}, cases
    modes = {(row["case"], row["mode"]) for row in rows}
    for case in ("flux true CFG", "wan 2.1", "wan 2.2", "ltx", "flux2", "qwen-image", "qwen-image-edit"):
        assert {(case, "sequential"), (case, "aggressive")} <= modes
    for row in rows:
        print(f"\n1 draft x ulysses 2, {row['case']} {row['mode']} rank {row['rank']}: rel err {row['rel_err']:.2e}")
        assert row["rel_err"] <= TOL and row["ranks_agree"], row
        assert row["layout"]["ulysses"] == 2 and row["layout"]["draft_ranks"] == 1 and row["layout"]["cfg"] == 1
        if "tokens" in row:  # the split really happened: each rank's transformer saw half the tokens
            assert row["tokens_split"][1] * 2 == row["tokens"][1], row
        if row["case"].startswith("qwen"):  # a prompt of an odd token count, padded by one for the split
            (n,), (padded,) = row["text"], row["text_split"]
            assert n % 2 == 1 and padded == n + 1, row
    # Qwen-Image-Edit's image tokens are the output's and the image's (what its rule counts), and a request of an
    # odd count is refused by the rule before a model call
    edit = [row for row in rows if row["case"] == "qwen-image-edit"]
    assert all(row["tokens"][1] == 2 + 27 * 38 for row in edit), edit
    assert any(row.get("refused") and "1027 image tokens" in row["refused"] for row in edit), edit
    print(f"(job: {took:.1f} s)")
    # the engine with --ulysses 2: requests answered, the one the split cannot take refused with 422
    good_a, bad, good_b = json.loads(open(out + ".engine").read())
    assert not bad["ok"] and bad["status"] == 422 and "81 image tokens" in bad["error"], bad
    local = services.load_service(tiny["flux"], torch.device("cpu"))
    for row in (good_a, good_b):
        assert row["ok"] and row["stats"]["ulysses"] == 2 and row["stats"]["ring"] == 1, row
        spec = row["spec"]
        req = local.prepare(local.admit(parse(spec, local)))
        sampler = parallelize(local.model, info=None)
        ref = sampler.apply(req, parse(spec, local).options).sample
        got = torch.tensor(row["latent"])
        assert ((got - ref).abs().max() / ref.abs().max()).item() <= TOL


@pytest.mark.slow
def test_four_ranks_drafts_and_a_guidance_pair_over_ulysses_2_equal_one_process(tiny, tmp_path):
    """2 drafts x Ulysses 2 against the local evaluator (n = 2), and a guidance pair x Ulysses 2 against in-rank
    guidance (Flux true CFG), in one job."""
    out = str(tmp_path / "grid.json")
    r, took = torchrun(os.path.join(HERE, "seq_worker.py"), "grid", out, tiny["flux"], nproc=4)
    rows = _rows(r, out)
    assert len(rows) == 4 * 3, rows
    for row in rows:
        print(f"\n{row['case']} {row['mode']} rank {row['rank']}: rel err {row['rel_err']:.2e}")
        assert row["rel_err"] <= TOL and row["ranks_agree"] and row["parallel"] == 2, row
        lay, rank = row["layout"], row["rank"]
        assert row["tokens_split"][1] * 2 == row["tokens"][1] and row["tokens_split"][0] * 2 == row["tokens"][0]
        if row["case"].startswith("2 drafts"):
            assert (lay["draft_ranks"], lay["cfg"], lay["draft_rank"], lay["seq_rank"]) == (2, 1, rank // 2, rank % 2)
        else:
            assert (lay["draft_ranks"], lay["cfg"], lay["cfg_rank"], lay["seq_rank"]) == (1, 2, rank // 2, rank % 2)
    print(f"(job: {took:.1f} s)")


@pytest.mark.slow
def test_cli_under_two_ranks_records_the_layout_and_refuses_a_family_without_a_plan_once(tiny, tmp_path):
    common = ["--prompt", "a red cat", "--steps", "4", "--height", "32", "--width", "32", "--warmup", "0"]
    r, _ = torchrun("-m", "driffusion_rt.generate", "--model", tiny["flux"], *common, "--ulysses", "2",
                    "--out", str(tmp_path / "split"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("layout: cfg 1 x draft ranks 1 x ulysses 2 x ring 1, parallel n = 1") == 1, r.stdout
    (run,) = [json.loads(p.read_text()) for p in (tmp_path / "split").glob("*.json")]
    assert run["layout"] == {"cfg": 1, "draft_ranks": 1, "ulysses": 2, "ring": 1, "parallel": 1}
    assert run["args"]["ulysses"] == 2 and run["ranks"] == 2
    bad, _ = torchrun("-m", "driffusion_rt.generate", "--model", tiny["sd15"], *common, "--ulysses", "2",
                      "--out", str(tmp_path / "bad"))
    text = bad.stdout + bad.stderr
    assert bad.returncode != 0 and not (tmp_path / "bad").exists(), text[-2000:]
    assert len(re.findall(r"the sd family's denoiser does not have", text)) == 1, text[-2000:]
    assert "Loading pipeline components" not in text  # refused before any model loaded
    assert re.search(r"exitcode\s*:\s*2", text), text[-2000:]
