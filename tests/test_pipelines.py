"""Text-to-image through the runtime with tiny random-weight pipelines of every family, saved and loaded by path.

Parity: mode="sequential" equals the plain diffusers pipeline call (same seed, same scheduler, guidance on).
Parallel modes: aggressive / conservative with n = 2 give finite decoded images of the requested size, close to
sequential. Errors: unknown family, bad sizes, missing / incomplete directories, unsupported schedulers.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import tiny_pipelines as tp

from driffusion_rt import make_plan
from driffusion_rt.pipelines import (DRiffusionPipeline, check_size, decode, family_of, load_pipeline,
                                     make_scheduler, prepare, run, text_to_image)

PROMPT = "a photo of a red cat"
STEPS = 4
PAR_STEPS = 6  # with S = 4 and n = 2 both parallel modes happen to compute the same states
SEQ = {"max_sequence_length": tp.T5_MAX_LEN}  # T5 families: keep the text sequence tiny
FAMILY = {"sd15": "sd", "sd21": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over tensors or arrays."""
    a, b = (v.double() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v), dtype=torch.float64)
            for v in (a, b))
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """kind -> saved pipeline directory, built once per session."""
    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {kind: tp.build(kind, str(root / kind)) for kind in tp.BUILDERS}


@pytest.fixture(scope="session")
def pipes(tiny_dirs):
    """kind -> pipeline loaded back by path with load_pipeline (shared; tests restore what they change)."""
    out = {}
    for kind, path in tiny_dirs.items():
        pipe = load_pipeline(path)
        pipe.set_progress_bar_config(disable=True)
        out[kind] = pipe
    return out


def plain_call(pipe, scheduler, **kw):
    """The reference: the diffusers pipeline's own __call__ with `scheduler` swapped in."""
    own = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        return pipe(**kw)
    finally:
        pipe.scheduler = own


# (id, kind, runtime/pipeline options, scheduler name or None = the pipeline's own, overrides that must change the
# result: they show the comparison is sensitive to that part of the conditioning path)
PARITY = [
    ("sd15-ddim-neg-rescale-2per", "sd15", dict(negative_prompt="blurry ugly painting", guidance_rescale=0.7,
                                                num_images=2), "ddim", dict(guidance_rescale=0.0)),
    ("sd15-euler", "sd15", {}, "euler", dict(guidance_scale=1.5)),
    ("sd15-ddpm", "sd15", {}, "ddpm", None),                 # stochastic: per-step noise from the same generator
    ("sd15-ddim-eta", "sd15", dict(eta=0.6), "ddim", None),  # stochastic DDIM
    ("sd15-own-pndm", "sd15", {}, None, dict(guidance_scale=1.5)),  # as SD 1.5 ships: PNDM, a repeated timestep
    ("sd15-dpm++2m-karras", "sd15", {}, "dpm++2m-karras", None),
    ("sd15-unipc", "sd15", {}, "unipc", None),
    ("sd15-euler-a", "sd15", {}, "euler-a", None),          # ancestral: noise at every step
    ("sdxl-dpm++2m-sde", "sdxl", {}, "dpm++2m-sde", None),
    ("sd3-flow-unipc", "sd3", dict(**SEQ), "flow-unipc", None),
    ("sd21-vpred-own-ddim-neg", "sd21", dict(negative_prompt="blurry"), None, dict(negative_prompt="a red car")),
    ("sd21-vpred-euler", "sd21", {}, "euler", dict(guidance_scale=1.5)),
    ("sdxl-own-euler-neg", "sdxl", dict(negative_prompt="blurry ugly"), None, dict(negative_prompt=None)),
    ("sdxl-ddim-rescale", "sdxl", dict(guidance_rescale=0.5), "ddim", None),
    ("sd3-neg", "sd3", dict(negative_prompt="ugly", **SEQ), None, dict(negative_prompt=None)),
    ("flux-guidance-embed", "flux", dict(**SEQ), None, dict(guidance_scale=1.5)),
    ("flux-true-cfg-neg", "flux", dict(negative_prompt="ugly", true_cfg_scale=3.0, **SEQ), None,
     dict(true_cfg_scale=1.0)),
]


@pytest.mark.parametrize("case,kind,opts,sched,alt", PARITY, ids=[c[0] for c in PARITY])
def test_sequential_matches_diffusers(pipes, case, kind, opts, sched, alt):
    """Guidance on (scale 4) in every case; two prompts per request (a negative prompt per prompt)."""
    pipe = pipes[kind]
    prompts = [PROMPT, "a blue house"]
    opts = dict(opts)
    per = opts.pop("num_images", 1)

    def negatives(o):
        if o.get("negative_prompt") is not None:
            o["negative_prompt"] = [o["negative_prompt"], "a photo of a dog"]
        return o

    common = dict(guidance_scale=4.0, height=32, width=32, output_type="latent")
    lat, stats = text_to_image(pipe, prompts, steps=STEPS, num_images=per, seed=11, scheduler=sched,
                               mode="sequential", **{**common, **negatives(opts)})
    scheduler = make_scheduler(pipe, sched)
    ref = plain_call(pipe, scheduler, prompt=prompts, num_inference_steps=STEPS, num_images_per_prompt=per,
                     generator=torch.Generator().manual_seed(11), **{**common, **opts}).images
    assert lat.shape == ref.shape and lat.shape[0] == 2 * per
    err = rel_err(lat, ref)
    print(f"\n[parity] {case}: max rel err {err:.2e} ({type(scheduler).__name__})")
    assert err <= 1e-5, case
    calls = len(scheduler.timesteps) if scheduler.timesteps is not None else STEPS  # PNDM: one more call
    assert stats.serial_rounds == stats.model_evals == calls
    if alt is not None:
        other, _ = text_to_image(pipe, prompts, steps=STEPS, num_images=per, seed=11, scheduler=sched,
                                 mode="sequential", **{**common, **negatives({**opts, **alt})})
        assert rel_err(other, ref) > 1e-3, alt


def test_scheduler_resolution(pipes):
    # Every family keeps its own scheduler as shipped: SD 1.5's PNDM, SD 2.1's DDIM v-prediction, SDXL's Euler.
    for kind in ("sd15", "sd21", "sdxl", "flux"):
        assert make_scheduler(pipes[kind]) is pipes[kind].scheduler
    # Short names are built from the checkpoint's config: its betas, prediction type and spacing are kept.
    assert make_scheduler(pipes["sd21"], "euler").config.prediction_type == "v_prediction"
    ddpm = make_scheduler(pipes["sdxl"], "ddpm")
    assert type(ddpm).__name__ == "DDPMScheduler" and not ddpm.config.clip_sample
    karras = make_scheduler(pipes["sd15"], "dpm++2m-karras")
    assert type(karras).__name__ == "DPMSolverMultistepScheduler" and karras.config.use_karras_sigmas
    assert karras.config.beta_schedule == "scaled_linear" and karras.config.steps_offset == 1
    assert make_scheduler(pipes["sd15"], "dpm++3m").config.solver_order == 3
    assert type(make_scheduler(pipes["flux"], "flow")).__name__ == "FlowMatchEulerDiscreteScheduler"
    unipc = make_scheduler(pipes["sd3"], "flow-unipc")
    assert unipc.config.use_flow_sigmas and unipc.config.flow_shift == 3.0


def test_a_shipped_scheduler_the_runtime_cannot_run_is_replaced_with_a_warning(pipes):
    from diffusers import DDPMScheduler
    pipe = pipes["sd15"]
    own = pipe.scheduler
    pipe.scheduler = DDPMScheduler.from_config(own.config, variance_type="learned_range")
    try:
        with pytest.warns(UserWarning, match="cannot run through the runtime .*variance_type='learned_range'.*"
                                             "using 'ddim' instead"):
            req = prepare(pipe, PROMPT, steps=STEPS, height=32, width=32, seed=0)
        assert req.trajectory.scheduler_name == "DDIMScheduler"
        with pytest.raises(ValueError, match="eta is an option of DDIM-type schedulers; the scheduler is "
                                             "EulerDiscreteScheduler"):
            prepare(pipe, PROMPT, steps=STEPS, height=32, width=32, seed=0, scheduler="euler", eta=1.0)
    finally:
        pipe.scheduler = own


@pytest.mark.parametrize("kind,output_type", [("sd15", "np"), ("sd15", "pil"), ("flux", "pt")])
def test_wrapper_returns_what_the_pipeline_returns(pipes, kind, output_type):
    pipe = pipes[kind]
    extra = SEQ if kind == "flux" else dict(negative_prompt="blurry")
    kw = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=5.0, height=32, width=48,
              num_images_per_prompt=2, output_type=output_type, **extra)
    wrapped = DRiffusionPipeline(pipe, mode="sequential")
    out = wrapped(generator=torch.Generator().manual_seed(3), **kw)
    ref = plain_call(pipe, make_scheduler(pipe), generator=torch.Generator().manual_seed(3), **kw)
    assert type(out) is type(ref) and len(out.images) == len(ref.images) == 2
    if output_type == "pil":
        assert [im.size for im in out.images] == [(48, 32)] * 2
        assert max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
                   for a, b in zip(out.images, ref.images)) <= 1
    else:
        err = rel_err(out.images, ref.images)
        print(f"\n[wrapper parity] {kind} {output_type}: max rel err {err:.2e}")
        assert err <= 1e-5
    if kind == "sd15":
        assert out.nsfw_content_detected is None and ref.nsfw_content_detected is None
    calls = 5 if kind == "sd15" else 4  # SD 1.5's own PNDM evaluates one timestep twice
    assert wrapped.last_stats.serial_rounds == calls and wrapped.last_stats.mode == "sequential"
    assert wrapped.vae is pipe.vae  # other attributes are the wrapped pipeline's
    again = wrapped(generator=torch.Generator().manual_seed(3), **kw)  # the wrapper's persistent Sampler, reused
    if output_type != "pil":
        assert rel_err(again.images, out.images) == 0
    if kind == "flux":
        tup = DRiffusionPipeline(pipe, mode="aggressive", parallel=2)(
            generator=torch.Generator().manual_seed(3), return_dict=False, **kw)
        assert isinstance(tup, tuple) and len(tup) == 1 and tup[0].shape == (2, 3, 32, 48)


@pytest.mark.parametrize("kind", list(tp.BUILDERS))
def test_parallel_modes_give_finite_images_close_to_sequential(pipes, kind):
    pipe = pipes[kind]
    opts = dict(SEQ) if FAMILY[kind] in ("sd3", "flux") else {}
    if kind == "flux":
        opts.update(negative_prompt="ugly", true_cfg_scale=2.0)
    elif kind in ("sd15", "sdxl"):
        opts.update(negative_prompt="blurry")
    req = prepare(pipe, PROMPT, steps=PAR_STEPS, guidance_scale=4.0, height=32, width=48, num_images=2, seed=5,
                  **opts)
    seq = run(pipe, req, mode="sequential").sample
    devs, lats = {}, {}
    for mode in ("aggressive", "conservative"):
        out = run(pipe, req, mode=mode, parallel=2)
        plan, stats = make_plan(mode, req.trajectory.steps, 2), out.stats  # SD 1.5's PNDM: one call more
        assert stats.serial_rounds == plan.serial_rounds < PAR_STEPS and stats.model_evals == plan.model_evals
        assert 2 in stats.batch_widths  # two drafts (x 2 images, x 2 for guidance) in one denoiser call
        devs[mode], lats[mode] = rel_err(out.sample, seq), out.sample
        assert 0 < devs[mode] < 0.1, (mode, devs[mode])  # drafts were used, and they are close
        images = decode(pipe, out.sample, height=32, width=48, output_type="pt").images
        assert images.shape == (2, 3, 32, 48) and torch.isfinite(images).all()
        assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    assert rel_err(lats["aggressive"], lats["conservative"]) > 0
    print(f"\n[parallel n=2, S={PAR_STEPS}] {kind}: rel deviation from sequential " +
          ", ".join(f"{m} {d:.2e}" for m, d in devs.items()))


@pytest.mark.parametrize("kind", ["sdxl", "flux"])
def test_draft_batches_keep_requests_aligned(pipes, kind):
    """Two prompts in one aggressive request equal each prompt alone: the runtime's tiling of the prompt
    embeddings (negative and positive, pooled, time ids; Flux's shared ids) matches the draft rows."""
    pipe = pipes[kind]
    opts = dict(SEQ, negative_prompt="ugly", true_cfg_scale=2.0) if kind == "flux" else dict(negative_prompt="ugly")
    prompts = [PROMPT, "a big green tree at night"]
    x = torch.randn(2, *((4, 16, 16) if kind == "sdxl" else (64, 16)), generator=torch.Generator().manual_seed(0))
    common = dict(steps=STEPS, guidance_scale=4.0, height=32, width=32, mode="aggressive", parallel=3,
                  output_type="latent", **opts)
    both, _ = text_to_image(pipe, prompts, latents=x, **common)
    for r, p in enumerate(prompts):
        alone, _ = text_to_image(pipe, p, latents=x[r: r + 1], **common)
        assert rel_err(both[r: r + 1], alone) <= 1e-5
    assert rel_err(both[0], both[1]) > 1e-2


def test_flux_ids_are_not_tiled_when_the_batch_equals_a_token_count(pipes):
    """Flux's txt_ids [tokens, 3] are per-shape constants: with B == tokens the runtime's tiling by first dim
    must still leave them alone (they are wrapped in Shared)."""
    pipe = pipes["flux"]
    common = dict(steps=3, guidance_scale=4.0, height=32, width=32, num_images=4, max_sequence_length=4, seed=1,
                  output_type="latent")
    seq, _ = text_to_image(pipe, PROMPT, mode="sequential", **common)
    lat, stats = text_to_image(pipe, PROMPT, mode="aggressive", parallel=2, **common)
    assert lat.shape == seq.shape == (4, 64, 16) and 2 in stats.batch_widths
    assert 0 < rel_err(lat, seq) < 0.1


def test_flux_adapter_batched_and_two_call_guidance_agree(pipes):
    """True CFG batches uncond + cond in one call when they share text ids (decided once per request), else two."""
    from driffusion_rt.evaluator import tile
    from driffusion_rt.pipelines import FluxAdapter
    pipe = pipes["flux"]
    req = prepare(pipe, PROMPT, steps=2, guidance_scale=3.0, height=32, width=32, seed=0, negative_prompt="ugly",
                  true_cfg_scale=2.5, **SEQ)
    kw = tile(req.model_kwargs, len(req.latents), 1)  # what the runtime passes for one point per call
    assert kw["batched_cfg"] is True
    calls = []
    adapter = FluxAdapter(pipe.transformer)
    run_ = adapter._run
    adapter._run = lambda *a: calls.append(len(a[0])) or run_(*a)
    t = req.trajectory.timesteps[:1].repeat(len(req.latents))
    batched = adapter(req.latents, t, **kw)
    two = adapter(req.latents, t, **(kw | {"batched_cfg": False}))
    assert calls == [2, 1, 1] and rel_err(two, batched) <= 1e-5


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_family(tmp_path, pipes):
    path = tp.build_unsupported(str(tmp_path / "ddpm"))
    with pytest.raises(ValueError, match=r"unsupported pipeline family: .*'DDPMPipeline'.*StableDiffusionPipeline"):
        load_pipeline(path)
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "model_index.json").write_text(json.dumps({"_class_name": "NotARealPipeline",
                                                        "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ValueError, match=r"'NotARealPipeline'; supported: sd \(StableDiffusionPipeline\)"):
        load_pipeline(str(bogus))
    (bogus / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON model index"):
        load_pipeline(str(bogus))
    from diffusers import DDPMPipeline
    with pytest.raises(ValueError, match="'DDPMPipeline'"):
        DRiffusionPipeline(DDPMPipeline.from_pretrained(path))


def test_missing_or_incomplete_model_directory(tmp_path, tiny_dirs):
    with pytest.raises(FileNotFoundError, match=r"model directory '.*/nowhere' does not exist"):
        load_pipeline(str(tmp_path / "nowhere"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is a file, not a pipeline directory"):
        load_pipeline(str(tmp_path / "file.bin"))
    copy = tmp_path / "sd15"
    shutil.copytree(tiny_dirs["sd15"], copy)
    weights = [f for f in os.listdir(copy / "unet") if f.endswith(".safetensors")]
    assert weights
    for f in weights:
        os.remove(copy / "unet" / f)
    with pytest.raises(FileNotFoundError, match=r"could not load the pipeline in '.*sd15'"):
        load_pipeline(str(copy))
    shutil.rmtree(copy / "unet")
    with pytest.raises(FileNotFoundError, match=r"incomplete: component folder\(s\) unet listed in model_index.json"):
        load_pipeline(str(copy))
    os.remove(copy / "model_index.json")
    with pytest.raises(FileNotFoundError, match="incomplete: it has no model_index.json"):
        load_pipeline(str(copy))
    with pytest.raises(ValueError, match="dtype must be a torch.dtype or one of"):
        load_pipeline(tiny_dirs["sd15"], dtype="float8")


def test_load_with_dtype_and_sample_in_bfloat16(tiny_dirs):
    pipe = load_pipeline(tiny_dirs["sd15"], dtype="bf16")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    images, stats = text_to_image(pipe, PROMPT, steps=STEPS, guidance_scale=4.0, height=32, width=32, seed=0,
                                  mode="aggressive", parallel=2, output_type="np")
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all() and stats.serial_rounds < STEPS


def test_hub_id_offline_is_a_clear_error():
    from huggingface_hub import constants
    if not constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 (tests/conftest.py sets it)")
    with pytest.raises(FileNotFoundError, match="'no-such-org/no-such-model' is not a local directory and could not "
                                                "be fetched as a hub id"):
        load_pipeline("no-such-org/no-such-model")


@pytest.mark.parametrize("kind,height,width,message", [
    ("sd15", 36, 32, r"height=36 is not a multiple of 8, which the sd pipeline needs .*use e.g. 32 or 40"),
    ("sdxl", 32, 20, r"width=20 is not a multiple of 8"),
    ("sd3", 32, 34, r"width=34 is not a multiple of 4, .*VAE scale factor 2 x transformer patch size 2"),
    ("flux", 30, 32, r"height=30 is not a multiple of 4, .*2 x 2 latent packing\); use e.g. 28 or 32"),
    ("flux", 2, 32, r"height=2 is not a multiple of 4, .*use e.g. 4$"),
    ("sd15", 0, 32, r"height must be a positive integer number of pixels, got 0"),
    ("sd3", 32, 32.0, r"width must be a positive integer number of pixels, got 32.0"),
])
def test_bad_sizes(pipes, kind, height, width, message):
    with pytest.raises(ValueError, match=message):
        text_to_image(pipes[kind], PROMPT, steps=2, height=height, width=width)
    assert check_size(pipes[kind], 32, 32) == (32, 32)


VP_NAMES = "ddim, ddpm, euler, euler-a, dpm\\+\\+2m, dpm\\+\\+2m-karras, dpm\\+\\+3m, dpm\\+\\+2m-sde, unipc, pndm, deis, lms, heun, kdpm2, kdpm2-a"


@pytest.mark.parametrize("kind,name,allowed", [
    ("sd15", "flow", VP_NAMES),
    ("sdxl", "dpm", VP_NAMES),
    ("sd3", "ddim", "flow, flow-unipc, flow-dpm\\+\\+2m"),
    ("flux", "euler", "flow"),
])
def test_unsupported_scheduler(pipes, kind, name, allowed):
    fam = family_of(pipes[kind])
    with pytest.raises(ValueError, match=f"scheduler '{name}' is not supported for the {fam} family; "
                                         f"supported: {allowed}"):
        text_to_image(pipes[kind], PROMPT, steps=2, height=32, width=32, scheduler=name)
    with pytest.raises(ValueError, match="not supported"):
        DRiffusionPipeline(pipes[kind], scheduler=name)(PROMPT, num_inference_steps=2, height=32, width=32)


def test_option_errors(pipes):
    with pytest.raises(ValueError, match="guidance_rescale is not supported by the flux pipeline"):
        text_to_image(pipes["flux"], PROMPT, steps=2, height=32, width=32, guidance_rescale=0.5)
    with pytest.raises(ValueError, match="eta is an option of DDIM-type schedulers; the scheduler is EulerDiscreteScheduler"):
        text_to_image(pipes["sdxl"], PROMPT, steps=2, height=32, width=32, eta=0.5)
    with pytest.raises(ValueError, match="a list of generators works only with deterministic schedulers"):
        text_to_image(pipes["sd15"], PROMPT, steps=2, height=32, width=32, scheduler="ddpm", num_images=2,
                      generator=[torch.Generator().manual_seed(i) for i in range(2)])
    with pytest.raises(ValueError, match="output_type must be one of latent, pt, np, pil"):
        text_to_image(pipes["sd15"], PROMPT, steps=2, height=32, width=32, output_type="jpeg")
    with pytest.raises(ValueError, match="mode"):
        text_to_image(pipes["sd15"], PROMPT, steps=2, height=32, width=32, mode="fast")


def test_family_registry(pipes):
    """Families register themselves; bad registrations fail before changing the tables; an option a family does
    not take names the families that do."""
    from driffusion_rt.pipelines import FAMILIES, REGISTRY, SCHEDULERS, get_family, register
    from driffusion_rt.pipelines.sd import StableDiffusion
    assert list(REGISTRY) == ["sd", "sdxl", "sd3", "flux", "flux2", "qwen-image", "qwen-image-edit", "z-image", "wan",
                              "hunyuan-video-1.5", "ltx"]
    assert get_family(pipes["sd21"]) is REGISTRY["sd"]
    assert SCHEDULERS["sdxl"] == REGISTRY["sdxl"].schedulers and FAMILIES["FluxPipeline"] == "flux"

    class Twice(StableDiffusion):
        pipeline_classes = ("OtherPipeline",)

    class UnknownScheduler(StableDiffusion):
        name, pipeline_classes, schedulers = "sd-dpm", ("OtherPipeline",), ("ddim", "dpm")

    with pytest.raises(ValueError, match="family 'sd' is registered twice"):
        register(Twice())
    with pytest.raises(ValueError, match=r"schedulers \['dpm'\]"):
        register(UnknownScheduler())
    assert "OtherPipeline" not in FAMILIES and "sd-dpm" not in REGISTRY
    with pytest.raises(ValueError, match=r"max_sequence_length is not supported by the sdxl pipeline \(only sd3, "
                                         r"flux, flux2, qwen-image, qwen-image-edit, z-image, wan, ltx\)"):
        prepare(pipes["sdxl"], PROMPT, steps=2, height=32, width=32, max_sequence_length=8)
    with pytest.raises(ValueError, match=r"clip_skip is not supported by the flux pipeline \(only sd, sdxl, sd3\)"):
        prepare(pipes["flux"], PROMPT, steps=2, height=32, width=32, clip_skip=1)
