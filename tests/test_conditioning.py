"""Image tasks through the runtime with tiny random-weight pipelines: img2img (SD, SDXL, SD3, Flux), ControlNet
(SD, SDXL; one and two nets), LoRA (loaded with diffusers' load_lora_weights from weights built with peft here),
inpainting (SD, SDXL; 4- and 9-channel UNets).

Parity: mode="sequential" through DRiffusionPipeline equals the wrapped diffusers pipeline's own call (float32,
1e-5 relative, output_type="latent"), and each case also shows the comparison is sensitive to the input it
tests. Parallel modes at n = 2 give finite images of the requested size. Bad inputs fail before any work.
"""
import os

import numpy as np
import pytest
import torch
import tiny_pipelines as tp

from driffusion_rt import Sampler
from driffusion_rt.blend import MaskBlend
from driffusion_rt.evaluator import LocalEvaluator, PerStep
from driffusion_rt.pipelines import (DRiffusionPipeline, control_to_image, decode, for_task, image_to_image,
                                     inpaint, load_pipeline, make_scheduler, prepare, task_of, text_to_image)
from driffusion_rt.pipelines import conditioning as cond
from driffusion_rt.strength import kept_steps, noised, start_index

PROMPT = "a photo of a red cat"
SEQ = {"max_sequence_length": tp.T5_MAX_LEN}
STEPS = 10


def rel_err(a, b) -> float:
    a, b = (v.double() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v), dtype=torch.float64)
            for v in (a, b))
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditioning")
    dirs = {kind: tp.build(kind, str(root / kind)) for kind in ("sd15", "sdxl", "sd3", "flux")}
    dirs["sd-inpaint"] = tp.build_sd_inpaint(str(root / "sd-inpaint"))
    dirs["cn"] = tp.build_controlnet(str(root / "cn"), seed=0)
    dirs["cn2"] = tp.build_controlnet(str(root / "cn2"), seed=1)
    dirs["cn-xl"] = tp.build_controlnet(str(root / "cn-xl"), sdxl=True, seed=2)
    dirs["cn-xl2"] = tp.build_controlnet(str(root / "cn-xl2"), sdxl=True, seed=3)
    return dirs


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def pipes(built):
    return {k: quiet(load_pipeline(v)) for k, v in built.items() if not k.startswith("cn")}


def task_pipe(pipes, kind, task, **components):
    return quiet(for_task(pipes[kind], task, **components))


def controlnets(built, *names):
    from diffusers import ControlNetModel
    nets = [ControlNetModel.from_pretrained(built[n]) for n in names]
    return nets[0] if len(nets) == 1 else nets


def parity(pipe, kw, seed=3, scheduler=None):
    """(runtime latents, diffusers latents, wrapper) for the same call, sequential mode."""
    wrapped = DRiffusionPipeline(pipe, mode="sequential", scheduler=scheduler)
    out = wrapped(generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images
    own = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = make_scheduler(pipe, scheduler)
    try:
        ref = pipe(generator=torch.Generator().manual_seed(seed), output_type="latent", **kw).images
    finally:
        pipe.scheduler = own
    return out, ref, wrapped


# ---------------------------------------------------------------------------------------------- strength


@pytest.mark.parametrize("rule,steps,strength,expected", [
    ("truncate", 10, 0.3, (7, 3)), ("truncate", 10, 0.8, (2, 8)), ("truncate", 4, 0.3, (3, 1)),
    ("truncate", 10, 1.0, (0, 10)), ("float", 4, 0.3, (2, 2)), ("float", 28, 0.6, (11, 17)),
    ("float", 10, 1.0, (0, 10))])
def test_kept_steps_follow_the_pipelines_get_timesteps(rule, steps, strength, expected):
    assert kept_steps(steps, strength, rule) == expected


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_strength_outside_the_unit_interval_is_refused(strength):
    with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
        kept_steps(10, strength)


def test_a_strength_that_keeps_no_step_is_refused():
    with pytest.raises(ValueError, match=r"strength=0.05 with 10 steps keeps no step to run .*raise strength or steps"):
        kept_steps(10, 0.05)


def test_start_index_counts_scheduler_order_and_sample_reproduces_the_img2img_loop():
    """diffusers' img2img loop (add_noise at timesteps[t_start * order], set_begin_index, the loop over the rest)
    equals sample(start=start_index(...)) for first- and second-order schedulers, in every draft-and-refine
    mode with a model whose output does not depend on x (there every mode is exact)."""
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler
    from driffusion_rt import sample
    torch.manual_seed(0)
    init, noise, bias = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)

    def model(x, t, **_):
        return bias.repeat(len(t) // 2, 1, 1, 1) * (t.view(-1, 1, 1, 1).float() / 1000)  # the timestep only

    for sched in (EulerDiscreteScheduler(), HeunDiscreteScheduler()):
        start = start_index(sched, 10, 0.45)
        assert start == 6 * sched.order
        ref = type(sched).from_config(sched.config)
        ref.set_timesteps(10)
        ts = ref.timesteps[start:]
        ref.set_begin_index(start)
        x = ref.add_noise(init, noise, ts[:1].repeat(2))
        assert torch.equal(x, noised(sched, 10, start, init, noise))
        for t in ts:
            x = ref.step(model(ref.scale_model_input(x, t), t.expand(2)), t, x).prev_sample
        for mode in ("sequential", "aggressive", "conservative"):
            out = sample(model, sched, noised(sched, 10, start, init, noise), steps=10, start=start, mode=mode,
                         parallel=2)
            assert rel_err(out.sample, x) <= 1e-5, (type(sched).__name__, mode)
            assert out.stats.model_evals == len(ts)


# ---------------------------------------------------------------------------------------------- img2img


IMG2IMG = [  # (id, kind, strength, call options, scheduler)
    ("sd15-0.3", "sd15", 0.3, dict(negative_prompt=["blurry", "ugly"]), None),
    ("sd15-0.8", "sd15", 0.8, {}, None),
    ("sd15-0.8-ddpm", "sd15", 0.8, {}, "ddpm"),  # stochastic: the VAE sample, the noise and every step draw
    ("sdxl-0.3", "sdxl", 0.3, dict(negative_prompt=["ugly", "blurry"]), None),
    ("sdxl-0.8", "sdxl", 0.8, {}, None),
    ("sdxl-1.0", "sdxl", 1.0, {}, None),  # start 0: the noised image is the state as is (no init_noise_sigma)
    ("sd3-0.6", "sd3", 0.6, dict(negative_prompt=["ugly", "blurry"], **SEQ), None),
    ("flux-0.6", "flux", 0.6, dict(**SEQ), None),
    ("flux-1.0", "flux", 1.0, dict(**SEQ), None),
]


@pytest.mark.parametrize("case,kind,strength,opts,sched", IMG2IMG, ids=[c[0] for c in IMG2IMG])
def test_img2img_sequential_matches_diffusers(pipes, case, kind, strength, opts, sched):
    pipe = task_pipe(pipes, kind, "img2img")
    size = {} if kind in ("sd15", "sdxl") else dict(height=32, width=48)  # SD / SDXL: the image's own size
    kw = dict(prompt=[PROMPT, "a blue house"], image=tp.image(0, 32, 48), strength=strength,
              num_inference_steps=STEPS, guidance_scale=4.0, **size, **opts)
    out, ref, wrapped = parity(pipe, kw, scheduler=sched)
    assert out.shape == ref.shape
    err = rel_err(out, ref)
    print(f"\n[img2img parity] {case}: max rel err {err:.2e}, {wrapped.last_stats.model_evals} model calls")
    assert err <= 1e-5, case
    t_start, kept = kept_steps(STEPS, strength, "float" if kind in ("sd3", "flux") else "truncate")
    assert wrapped.last_stats.model_evals == wrapped.last_stats.serial_rounds == kept + (kind == "sd15" and not sched)
    other = wrapped(generator=torch.Generator().manual_seed(3), output_type="latent",
                    **{**kw, "image": tp.image(1, 32, 48)}).images
    if strength < 1:  # the image matters (flow matching at strength 1 starts from sigma 1: pure noise)
        assert rel_err(other, ref) > 1e-3


def test_img2img_with_one_generator_per_image_matches_diffusers(pipes):
    """A list of generators: the pipelines expand the images first and encode image i with generator i."""
    pipe = task_pipe(pipes, "sd15", "img2img")
    kw = dict(prompt=PROMPT, image=tp.image(5, 32, 32), strength=0.6, num_inference_steps=STEPS, guidance_scale=4.0,
              num_images_per_prompt=2, output_type="latent")
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    out = DRiffusionPipeline(pipe, mode="sequential")(generator=gens(), **kw).images
    ref = pipe(generator=gens(), **kw).images
    assert rel_err(out, ref) <= 1e-5 and rel_err(out[0], out[1]) > 1e-3


def test_img2img_functional_form_on_a_text_to_image_pipeline(pipes):
    """image_to_image works on the text-to-image pipeline too (the Img2Img semantics, its default strength)."""
    pipe = pipes["sdxl"]
    img = tp.image(2, 32, 32)
    lat, stats = image_to_image(pipe, PROMPT, img, steps=STEPS, guidance_scale=4.0, seed=1, mode="sequential",
                                output_type="latent")
    ref = task_pipe(pipes, "sdxl", "img2img")(PROMPT, image=img, num_inference_steps=STEPS, guidance_scale=4.0,
                                              generator=torch.Generator().manual_seed(1), output_type="latent").images
    assert rel_err(lat, ref) <= 1e-5 and stats.model_evals == 3  # SDXL img2img's default strength 0.3


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_img2img_parallel_modes_give_finite_images_of_the_size(pipes, kind):
    opts = dict(SEQ) if kind in ("sd3", "flux") else {}
    img = tp.image(4, 32, 48)
    size = dict(height=32, width=48)
    seq, _ = image_to_image(pipes[kind], PROMPT, img, strength=0.8, steps=STEPS, guidance_scale=4.0, seed=2,
                            mode="sequential", output_type="latent", **size, **opts)
    for mode in ("aggressive", "conservative"):
        lat, stats = image_to_image(pipes[kind], PROMPT, img, strength=0.8, steps=STEPS, guidance_scale=4.0, seed=2,
                                    mode=mode, parallel=2, output_type="latent", **size, **opts)
        assert 2 in stats.batch_widths and stats.serial_rounds < stats.model_evals
        assert 0 < rel_err(lat, seq) < 0.2, mode
        images = decode(pipes[kind], lat, height=32, width=48, output_type="pt").images
        assert images.shape == (1, 3, 32, 48) and torch.isfinite(images).all()


# ---------------------------------------------------------------------------------------------- ControlNet


CONTROL = [  # (id, kind, nets, call options)
    ("sd-one", "sd15", ("cn",), dict(negative_prompt=["blurry", "ugly"], control_guidance_end=0.6)),
    ("sd-one-guess", "sd15", ("cn",), dict(guess_mode=True, controlnet_conditioning_scale=0.7)),
    ("sd-two", "sd15", ("cn", "cn2"), dict(controlnet_conditioning_scale=[0.8, 1.3], control_guidance_start=[0.0, 0.3],
                                           control_guidance_end=[0.7, 1.0])),
    ("sdxl-one", "sdxl", ("cn-xl",), dict(control_guidance_end=0.5)),
    ("sdxl-two-guess", "sdxl", ("cn-xl", "cn-xl2"), dict(guess_mode=True, control_guidance_end=[1.0, 0.6])),
]


@pytest.mark.parametrize("case,kind,nets,opts", CONTROL, ids=[c[0] for c in CONTROL])
def test_controlnet_sequential_matches_diffusers(pipes, built, case, kind, nets, opts):
    pipe = task_pipe(pipes, kind, "controlnet", controlnet=controlnets(built, *nets))
    images = [tp.image(10 + k, 32, 48) for k in range(len(nets))]
    kw = dict(prompt=[PROMPT, "a blue house"], image=images if len(nets) > 1 else images[0],
              num_inference_steps=STEPS, guidance_scale=4.0, **opts)
    out, ref, wrapped = parity(pipe, kw)
    err = rel_err(out, ref)
    print(f"\n[controlnet parity] {case}: max rel err {err:.2e}")
    assert out.shape == ref.shape == (2, 4, 16, 24) and err <= 1e-5, case
    without = dict(kw, controlnet_conditioning_scale=0.0)
    assert rel_err(wrapped(generator=torch.Generator().manual_seed(3), output_type="latent", **without).images,
                   ref) > 1e-3  # the nets' residuals matter


def test_controlnet_rows_of_one_call_follow_their_own_step():
    """The keep schedule is a PerStep kwarg: rows of one call at different trajectory indices get their own scale."""
    from driffusion_rt.evaluator import ModelCall
    from driffusion_rt.trajectory import Trajectory
    from diffusers import DDIMScheduler
    seen = []
    traj = Trajectory.from_scheduler(DDIMScheduler(clip_sample=False), 6)
    table = torch.arange(6, dtype=torch.float32).view(6, 1) * 10

    def model(x, t, scale):
        seen.append(scale.clone())
        return x

    call = ModelCall(model, traj, torch.zeros(2, 3), {"scale": PerStep(table)})
    call(torch.zeros(3, 2, 3), (1, 4, 5), torch.empty(3, 2, 3))
    assert seen[0].view(-1).tolist() == [10, 10, 40, 40, 50, 50]


@pytest.mark.parametrize("kind,nets", [("sd15", ("cn",)), ("sdxl", ("cn-xl", "cn-xl2"))])
def test_controlnet_parallel_modes_give_finite_images(pipes, built, kind, nets):
    pipe = task_pipe(pipes, kind, "controlnet", controlnet=controlnets(built, *nets))
    images = [tp.image(20 + k, 32, 32) for k in range(len(nets))]
    kw = dict(steps=STEPS, guidance_scale=4.0, seed=1, control_guidance_end=0.7, output_type="latent")
    seq, _ = control_to_image(pipe, PROMPT, images if len(nets) > 1 else images[0], mode="sequential", **kw)
    for mode in ("aggressive", "conservative"):
        lat, stats = control_to_image(pipe, PROMPT, images if len(nets) > 1 else images[0], mode=mode, parallel=2,
                                      **kw)
        assert 0 < rel_err(lat, seq) < 0.2 and 2 in stats.batch_widths
        out = decode(pipe, lat, height=32, width=32, output_type="np").images
        assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


# ---------------------------------------------------------------------------------------------- LoRA


def save_lora(pipe, directory, seed=0) -> str:
    """LoRA weights for the UNet and text encoder, built with peft here (random, non-zero B matrices so they change
    the output) and written in diffusers' format; returns the weights file."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers
    import copy
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)  # the pipeline's own stay untouched
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="tmp")
    te.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                              target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), adapter_name="tmp")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in list(unet.named_parameters()) + list(te.named_parameters()):
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="tmp"))
    te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(te, adapter_name="tmp"))
    type(pipe).save_lora_weights(directory, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                 safe_serialization=True)
    return os.path.join(directory, "pytorch_lora_weights.safetensors")


def test_lora_loaded_pipeline_matches_diffusers_with_a_per_call_scale(built, tmp_path):
    pipe = quiet(load_pipeline(built["sd15"]))
    base = DRiffusionPipeline(pipe, mode="sequential")
    kw = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=4.0, height=32, width=32)
    before = base(generator=torch.Generator().manual_seed(3), output_type="latent", **kw).images
    path = save_lora(pipe, str(tmp_path / "lora"))
    pipe.load_lora_weights(path, adapter_name="style")
    out, ref, wrapped = parity(pipe, dict(kw, cross_attention_kwargs={"scale": 0.5}))
    err = rel_err(out, ref)
    print(f"\n[lora parity] scale 0.5: max rel err {err:.2e}")
    assert err <= 1e-5
    full, ref_full, _ = parity(pipe, kw)
    assert rel_err(full, ref_full) <= 1e-5
    assert rel_err(out, before) > 1e-3 and rel_err(full, out) > 1e-3  # the LoRA and its scale both matter
    pipe.set_adapters(["style"], adapter_weights=[0.25])  # adapter weights: the runtime runs the model as it is
    quarter, ref_quarter, _ = parity(pipe, kw)
    assert rel_err(quarter, ref_quarter) <= 1e-5 and rel_err(quarter, full) > 1e-3
    lat, _ = text_to_image(pipe, PROMPT, steps=4, guidance_scale=4.0, height=32, width=32, seed=3,
                           mode="aggressive", parallel=2, output_type="latent", lora_scale=0.5)
    assert torch.isfinite(lat).all() and 0 < rel_err(lat, ref_quarter)


def test_lora_scale_argument_errors(pipes):
    with pytest.raises(ValueError, match=r"cross_attention_kwargs supports only \{'scale': s\}"):
        DRiffusionPipeline(pipes["sd15"])(PROMPT, cross_attention_kwargs={"ip_adapter_masks": 1})
    with pytest.raises(TypeError, match="StableDiffusionPipeline does not take joint_attention_kwargs"):
        DRiffusionPipeline(pipes["sd15"])(PROMPT, joint_attention_kwargs={"scale": 0.5})
    with pytest.raises(TypeError, match="FluxPipeline does not take cross_attention_kwargs"):
        DRiffusionPipeline(pipes["flux"])(PROMPT, cross_attention_kwargs={"scale": 0.5})


# ---------------------------------------------------------------------------------------------- inpainting


INPAINT = [  # (id, kind, strength, options)
    ("sd-4ch-1.0", "sd15", 1.0, {}),
    ("sd-4ch-0.6-neg", "sd15", 0.6, dict(negative_prompt=["blurry", "ugly"])),
    ("sd-9ch-1.0", "sd-inpaint", 1.0, {}),
    ("sd-9ch-0.7", "sd-inpaint", 0.7, dict(negative_prompt=["blurry", "ugly"])),
    ("sdxl-4ch-default", "sdxl", None, {}),
    ("sdxl-4ch-0.5", "sdxl", 0.5, dict(negative_prompt=["ugly", "blurry"])),
]


@pytest.mark.parametrize("case,kind,strength,opts", INPAINT, ids=[c[0] for c in INPAINT])
def test_inpainting_sequential_matches_diffusers(pipes, case, kind, strength, opts):
    pipe = task_pipe(pipes, kind, "inpaint")
    kw = dict(prompt=[PROMPT, "a blue house"], image=tp.image(30, 32, 32), mask_image=tp.mask(),
              num_inference_steps=STEPS, guidance_scale=4.0, height=32, width=32, **opts)
    if strength is not None:
        kw["strength"] = strength
    out, ref, wrapped = parity(pipe, kw)
    err = rel_err(out, ref)
    print(f"\n[inpainting parity] {case}: max rel err {err:.2e}")
    assert out.shape == ref.shape and err <= 1e-5, case
    other = wrapped(generator=torch.Generator().manual_seed(3), output_type="latent",
                    **{**kw, "mask_image": tp.mask(box=(0, 0, 16, 31))}).images
    assert rel_err(other, ref) > 1e-3  # the mask matters


@pytest.mark.parametrize("kind", ["sd15", "sd-inpaint"])
def test_inpainting_parallel_modes_keep_the_unmasked_latents(pipes, kind):
    img, m = tp.image(31, 32, 32), tp.mask()
    kw = dict(steps=STEPS, guidance_scale=4.0, seed=4, output_type="latent", height=32, width=32)
    seq, _ = inpaint(pipes[kind], PROMPT, img, m, mode="sequential", **kw)
    keep = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(m) < 128).float()[None, None], size=(16, 16))
    for mode in ("aggressive", "conservative"):
        lat, stats = inpaint(pipes[kind], PROMPT, img, m, mode=mode, parallel=2, **kw)
        assert 2 in stats.batch_widths and torch.isfinite(lat).all()
        assert 0 < rel_err(lat, seq) < 0.2
        if kind == "sd15":  # the 4-channel blend: outside the mask every mode ends on the image's own latents
            assert torch.equal(lat * keep, seq * keep)
        images = decode(pipes[kind], lat, height=32, width=32, output_type="pt").images
        assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_mask_blend_in_parallel_modes_equals_the_blended_sequential_loop():
    """A model whose output does not depend on x: every mode equals sequential, with the blend (binary mask)
    applied after every state, drafts included; iterative modes refuse a blend."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
    torch.manual_seed(0)
    init, noise, bias = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    m = (torch.rand(2, 1, 8, 8) > 0.5).float()

    def model(x, t, **_):
        return bias.repeat(len(t) // 2, 1, 1, 1) * (t.view(-1, 1, 1, 1).float() / 1000)

    for sched in (EulerDiscreteScheduler(), DPMSolverMultistepScheduler()):
        blend = MaskBlend.for_schedule(sched, 12, 0, m, init, noise)
        sampler = Sampler(model, LocalEvaluator(model))
        seq = sampler(sched, noise, steps=12, mode="sequential", blend=blend).sample
        assert torch.equal(seq * (1 - m), init * (1 - m))
        for mode in ("aggressive", "conservative"):
            for n in (2, 4):
                out = sampler(sched, noise, steps=12, mode=mode, parallel=n, blend=blend)
                assert rel_err(out.sample, seq) <= 1e-6, (type(sched).__name__, mode, n)
    with pytest.raises(ValueError, match="a blend .* runs in modes sequential, aggressive, conservative, not "
                                         "mode='picard'"):
        sampler(sched, noise, steps=12, mode="picard", blend=blend)
    with pytest.raises(ValueError, match="the inpainting mask must be binary"):
        MaskBlend.for_schedule(sched, 12, 0, m * 0.5, init, noise)


# ---------------------------------------------------------------------------------------------- errors


def test_tasks_of_pipelines(pipes, built):
    assert task_of(pipes["sd15"]) == "text2img" and task_of(pipes["sd-inpaint"]) == "inpaint"
    assert task_of(task_pipe(pipes, "flux", "img2img")) == "img2img"
    assert task_of(task_pipe(pipes, "sdxl", "controlnet", controlnet=controlnets(built, "cn-xl"))) == "controlnet"


def test_bad_image_inputs_fail_before_any_work(pipes, tmp_path, monkeypatch):
    pipe = pipes["sd15"]
    calls = []
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: calls.append(1))  # any work would call it
    with pytest.raises(ValueError, match=r"image '.*nowhere.png' cannot be read as an image: FileNotFoundError"):
        image_to_image(pipe, PROMPT, str(tmp_path / "nowhere.png"), strength=0.5)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"image '.*bad.png' cannot be read as an image: UnidentifiedImageError"):
        image_to_image(pipe, PROMPT, str(tmp_path / "bad.png"), strength=0.5)
    with pytest.raises(ValueError, match=r"image must be a PIL image, a path, a numpy array or a torch tensor"):
        image_to_image(pipe, PROMPT, 42, strength=0.5)
    for bad in (0, 1.2, -1):
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\] .*, got "):
            image_to_image(pipe, PROMPT, tp.image(0), strength=bad)
        with pytest.raises(ValueError, match=r"strength must be a number in \(0, 1\]"):
            DRiffusionPipeline(task_pipe(pipes, "sd15", "inpaint"))(PROMPT, image=tp.image(0), mask_image=tp.mask(),
                                                                      strength=bad)
    with pytest.raises(ValueError, match="strength=0.05 with 10 steps keeps no step"):
        image_to_image(pipe, PROMPT, tp.image(0), strength=0.05, steps=10)
    with pytest.raises(ValueError, match="latents cannot be given with an init image"):
        image_to_image(pipe, PROMPT, tp.image(0), strength=0.5, latents=torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="3 init images cannot be spread over 2 images"):
        image_to_image(pipe, PROMPT, [tp.image(0)] * 3, strength=0.5, num_images=2)
    with pytest.raises(ValueError, match="StableDiffusionImg2ImgPipeline needs image="):
        DRiffusionPipeline(task_pipe(pipes, "sd15", "img2img"))(PROMPT)
    with pytest.raises(TypeError, match="StableDiffusionPipeline does not take image, strength"):
        DRiffusionPipeline(pipe)(PROMPT, image=tp.image(0), strength=0.5)
    assert calls == []


def test_controlnet_input_errors(pipes, built, monkeypatch):
    cn = task_pipe(pipes, "sd15", "controlnet", controlnet=controlnets(built, "cn"))
    two = task_pipe(pipes, "sd15", "controlnet", controlnet=controlnets(built, "cn", "cn2"))
    calls = []
    for p in (cn, two):
        monkeypatch.setattr(p, "encode_prompt", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match=r"the control image is 32x48 .* but the output is 32x32: pass control images "
                                         r"of the output size"):
        control_to_image(cn, PROMPT, tp.image(0, 32, 48), height=32, width=32)
    with pytest.raises(ValueError, match=r"control image 1 is 40x32 .* but the output is 32x32"):
        control_to_image(two, PROMPT, [tp.image(0), tp.image(1, 40, 32)])
    with pytest.raises(ValueError, match="a MultiControlNet of 2 nets takes a list of 2 control images"):
        control_to_image(two, PROMPT, tp.image(0))
    with pytest.raises(ValueError, match="controlnet_conditioning_scale has 3 values for 2 ControlNet"):
        control_to_image(two, PROMPT, [tp.image(0)] * 2, controlnet_conditioning_scale=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="control_guidance_start 0.8 and control_guidance_end 0.5 must satisfy"):
        control_to_image(cn, PROMPT, tp.image(0), control_guidance_start=0.8, control_guidance_end=0.5)
    with pytest.raises(ValueError, match="control image cannot be read as an image|control image .* cannot be read"):
        control_to_image(cn, PROMPT, "/no/such/control.png")
    with pytest.raises(ValueError, match=r"a control image needs a ControlNet pipeline \(StableDiffusionControlNet"
                                         r"Pipeline\); this StableDiffusionPipeline has no controlnet"):
        control_to_image(pipes["sd15"], PROMPT, tp.image(0))
    with pytest.raises(TypeError, match="StableDiffusionControlNetPipeline does not take strength"):
        DRiffusionPipeline(cn)(PROMPT, image=tp.image(0), strength=0.5)
    assert calls == []


@pytest.mark.parametrize("kind,task,message", [
    ("sd3", "controlnet", "ControlNet is supported for the sd, sdxl families; the sd3 pipeline has none"),
    ("flux", "controlnet", "ControlNet is supported for the sd, sdxl families; the flux pipeline has none"),
    ("flux", "inpaint", "inpainting is supported for the sd, sdxl families; the flux pipeline has none"),
])
def test_tasks_a_family_has_not(pipes, kind, task, message):
    with pytest.raises(ValueError, match=message):
        for_task(pipes[kind], task)
    with pytest.raises(ValueError, match=message):
        if task == "controlnet":
            control_to_image(pipes[kind], PROMPT, tp.image(0))
        else:
            inpaint(pipes[kind], PROMPT, tp.image(0), tp.mask())


# ---------------------------------------------------------------------------------------------- distributed


@pytest.mark.slow
def test_two_gloo_ranks_equal_the_local_evaluator(built, tmp_path):
    """img2img, MultiControlNet and inpainting (4-channel blend) on 2 ranks: the VAE runs on rank 0, every rank
    starts from the same broadcast state, and the distributed evaluator equals the local one."""
    import json
    import subprocess
    import sys
    out = tmp_path / "rows.json"
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conditioning_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, str(out),
           built["sd15"], built["cn"], built["cn2"]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    cases = [row for row in rows if row["case"] != "wrapper"]
    assert len(cases) == 2 * 3 * 2  # ranks x cases x modes
    print("\n[2 gloo ranks vs local] " + ", ".join(f"{r['case']}/{r['mode']}/rank{r['rank']} {r['rel_err']:.1e}"
                                               for r in cases))
    for row in cases:
        assert row["finite"] and row["rel_err"] <= 1e-6, row
    for case in ("img2img", "controlnet", "inpaint"):
        sums = {row["x_sum"] for row in cases if row["case"] == case}
        assert len(sums) == 1, (case, sums)  # every rank holds rank 0's start state
    wrapper = sorted((row for row in rows if row["case"] == "wrapper"), key=lambda row: row["rank"])
    assert wrapper[0]["images"] == [1, 32, 48, 3] and wrapper[1]["images"] is None
    assert wrapper[0]["serial_rounds"] == wrapper[1]["serial_rounds"] < 7


# ---------------------------------------------------------------------------------------------- CLI and engine


def run_cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "driffusion_rt.generate", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_img2img_inpainting_controlnet_and_lora(built, pipes, tmp_path, capsys):
    """The command line gives the image the functional API gives (same request, same seed)."""
    from PIL import Image
    from driffusion_rt import generate
    img, m, ctl = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "control.jpg"
    tp.image(40, 32, 48).save(img)
    tp.mask(32, 48).save(m)
    tp.image(41, 32, 32).save(ctl, quality=95)
    common = ["--steps", "6", "--seed", "2", "--guidance-scale", "4", "--prompt", PROMPT, "--warmup", "0"]

    def cli(name, *args):
        out = tmp_path / name
        assert generate.main(["--model", built["sd15"], *common, *args, "--out", str(out)]) == 0
        files = sorted(out.glob("*.png"))
        assert len(files) == 1 and (out / (files[0].stem + ".json")).exists()
        return np.asarray(Image.open(files[0]), np.int16)

    def same(a, images):
        assert a.shape == np.asarray(images[0]).shape
        assert np.abs(a - np.asarray(images[0], np.int16)).max() <= 1

    kw = dict(steps=6, seed=2, guidance_scale=4.0, mode="aggressive", parallel=2)
    same(cli("img2img", "--image", str(img), "--strength", "0.5", "--parallel", "2"),
         image_to_image(pipes["sd15"], PROMPT, tp.image(40, 32, 48), strength=0.5, **kw)[0])
    same(cli("inpaint", "--image", str(img), "--mask-image", str(m), "--parallel", "2", "--mode", "conservative",
             "--height", "32", "--width", "48"),
         inpaint(pipes["sd15"], PROMPT, tp.image(40, 32, 48), tp.mask(32, 48), height=32, width=48,
                 **dict(kw, mode="conservative"))[0])
    cn_pipe = task_pipe(pipes, "sd15", "controlnet", controlnet=controlnets(built, "cn"))
    same(cli("controlnet", "--controlnet", built["cn"], "--control-image", str(ctl), "--controlnet-scale", "0.7",
             "--parallel", "2"),
         control_to_image(cn_pipe, PROMPT, Image.open(ctl).convert("RGB"), controlnet_conditioning_scale=0.7, **kw)[0])
    lora = save_lora(quiet(load_pipeline(built["sd15"])), str(tmp_path / "lora"))
    with_lora = cli("lora", "--lora", f"{lora}:0.5", "--height", "32", "--width", "32")
    lp = quiet(load_pipeline(built["sd15"]))
    lp.load_lora_weights(lora, adapter_name="a")
    lp.set_adapters(["a"], adapter_weights=[0.5])
    same(with_lora, text_to_image(lp, PROMPT, height=32, width=32, steps=6, seed=2, guidance_scale=4.0)[0])
    capsys.readouterr()


@pytest.mark.parametrize("args,message", [
    (["--image", "/no/such.png"], "--image '/no/such.png' cannot be read as an image"),
    (["--image", "IMG", "--strength", "1.5"], "strength must be a number in (0, 1]"),
    (["--image", "IMG", "--strength", "0"], "strength must be a number in (0, 1]"),
    (["--lora", "/no/such/lora.safetensors:0.5"], "LoRA weights '/no/such/lora.safetensors' do not exist"),
    (["--mask-image", "IMG"], "--mask-image needs --image"),
    (["--controlnet", "CN"], "0 --control-image for 1 --controlnet"),
    (["--controlnet", "CN", "--control-image", "BAD"], "--control-image"),
])
def test_cli_bad_image_inputs_exit_2_before_loading(built, tmp_path, args, message):
    (tmp_path / "img.png").write_bytes(b"")
    tp.image(0).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    args = [{"IMG": str(tmp_path / "ok.png"), "CN": built["cn"], "BAD": str(tmp_path / "bad.png")}.get(a, a)
            for a in args]
    r = run_cli("--model", built["sd15"], "--prompt", PROMPT, *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cli_controlnet_for_a_family_without_one(built, tmp_path, kind):
    tp.image(0).save(tmp_path / "c.png")
    r = run_cli("--model", built[kind], "--prompt", PROMPT, "--controlnet", built["cn"], "--control-image",
                str(tmp_path / "c.png"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and f"ControlNet is supported for the sd and sdxl families; {built[kind]} is a {kind} " \
                                  f"pipeline" in r.stderr, r.stderr[-2000:]


def b64(im, fmt="PNG") -> str:
    import base64
    import io
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_image_requests_are_checked_before_loading_as_once_loaded(built):
    """requests.parse decodes a request's images and checks them against the model's configs, no weights
    loaded: the resolved values name the task, the pipeline's default strength, the size an image gives (SD
    img2img, ControlNet) and each image by digest (so output names differ by image); the loaded service resolves
    the same values and refuses the same requests with the same messages."""
    from cases import check_request, loaded_check
    from driffusion_rt import generate, model_ref, requests, services
    ref = model_ref.inspect_model(built["sd15"])
    loaded = services.load_service(built["sd15"], torch.device("cpu"))
    spec = dict(prompt=PROMPT, steps=10, image=b64(tp.image(0, 40, 48)))
    r = check_request(ref, spec)
    assert r["task"] == "img2img" and r["strength"] == 0.8 and (r["height"], r["width"]) == (40, 48)
    assert r["image"]["format"] == "PNG" and (r["image"]["height"], r["image"]["width"]) == (40, 48)
    assert loaded_check(loaded, spec) == r
    other = check_request(ref, dict(spec, image=b64(tp.image(1, 40, 48))))
    assert other["image"]["sha256"] != r["image"]["sha256"]
    args = generate.parser().parse_args(["--model", built["sd15"]])
    stem = lambda q: generate.output_stem(args, ref, requests.parse(q, ref), 1)  # noqa: E731
    assert stem(spec) != stem(dict(spec, image=b64(tp.image(1, 40, 48))))
    inpaint_spec = dict(spec, mask_image=b64(tp.mask(40, 48)))
    r = check_request(ref, inpaint_spec)
    assert r["task"] == "inpaint" and r["strength"] == 1.0 and (r["height"], r["width"]) == ref.rules.default_size
    assert loaded_check(loaded, inpaint_spec) == r
    assert check_request(ref, dict(prompt=PROMPT))["task"] == "text2img"
    limits = requests.Limits(side=44, image_bytes=4000)
    bad = {
        "image is not valid base64": dict(image="not base64!"),
        "image is a GIF image; allowed: PNG, JPEG": dict(image=b64(tp.image(0), "GIF")),
        "image is 48x40 pixels; the limit is 44 per side": dict(image=b64(tp.image(0, 40, 48))),
        "the request's images are over 4000 bytes": dict(image=b64(tp.image(0, 40, 40)),
                                                         mask_image=b64(tp.image(1, 40, 40))),
        "strength must be a number in (0, 1]": dict(image=b64(tp.image(0)), strength=0),
        "strength=0.05 with 10 steps keeps no step": dict(image=b64(tp.image(0)), strength=0.05),
        "height=36 (the input image's, rounded down) is not a multiple of 8": dict(image=b64(tp.image(0, 36, 32))),
        "mask_image needs image": dict(mask_image=b64(tp.mask())),
        "strength applies to requests with an image": dict(strength=0.5),
        "control_image needs a server started with --controlnet": dict(control_image=b64(tp.image(0))),
        "lora_scale must be a finite number": dict(lora_scale="high"),
    }
    for message, fields in bad.items():
        for check in (lambda q: check_request(ref, q, limits), lambda q: loaded_check(loaded, q, limits)):
            with pytest.raises(requests.RequestError) as e:
                check(dict(prompt=PROMPT, steps=10, **fields))
            assert message in str(e.value), (message, str(e.value))
    with pytest.raises(requests.RequestError, match="inpainting is supported for the sd, sdxl families; the sd3 "):
        check_request(model_ref.inspect_model(built["sd3"]),
                               dict(prompt=PROMPT, image=b64(tp.image(0)), mask_image=b64(tp.mask())))


def test_controlnet_and_lora_references_are_checked_before_loading(built, tmp_path):
    from cases import check_request
    from driffusion_rt import model_ref, requests
    ref = model_ref.inspect_model(built["sd15"], controlnets=[built["cn"], built["cn2"]])
    assert ref.rules.task == "controlnet" and ref.rules.nets == 2
    controls = [b64(tp.image(0, 32, 48)), b64(tp.image(1, 32, 48))]
    r = check_request(ref, dict(prompt=PROMPT, control_image=controls))
    assert r["task"] == "controlnet" and r["controlnet_conditioning_scale"] == [1.0, 1.0]
    assert (r["height"], r["width"]) == (32, 48) and len(r["control_image"]) == 2
    for fields, message in ((dict(control_image=controls[0]), r"control_image has 1 image\(s\) for 2 ControlNet\(s\)"),
                            (dict(control_image=controls, controlnet_conditioning_scale=[1, 2, 3]),
                             "controlnet_conditioning_scale has 3 values for 2 ControlNet"),
                            (dict(control_image=controls, image=controls[0]),
                             "this server runs a ControlNet pipeline: requests take control_image"),
                            (dict(), "this server runs a ControlNet pipeline")):
        with pytest.raises(requests.RequestError, match=message):
            check_request(ref, dict(prompt=PROMPT, **fields))
    for model, kw, message in (
            (built["sd3"], dict(controlnets=[built["cn"]]), "--controlnet: ControlNet is supported for the sd and "
                                                           "sdxl families; .* is a sd3 pipeline"),
            (built["sd15"], dict(controlnets=[str(tmp_path)]), "is not a ControlNetModel directory \\(no config.json"),
            (built["sd15"], dict(loras=["/no/such/lora.safetensors:0.5"]),
             "--lora: LoRA weights '/no/such/lora.safetensors' do not exist"),
            ("digits", dict(loras=["x.safetensors"]), "apply to diffusers pipelines, not --model digits")):
        with pytest.raises(model_ref.ModelUnavailable, match=message):
            model_ref.inspect_model(model, **kw)


def test_cli_image_inputs_checked_before_loading_and_after_it_exit_2(built, tmp_path, monkeypatch, capsys):
    """Bad image inputs the configs can refute exit 2 before the model loads; those only the loaded pipeline can
    (a control image of another size than the output, LoRA weights that do not load) exit 2 right after loading,
    with one message and no output either way."""
    from driffusion_rt import generate
    tp.image(0, 40, 48).save(tmp_path / "in.png")
    tp.image(0).save(tmp_path / "in.gif")
    tp.image(1, 32, 48).save(tmp_path / "control.png")
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    out = tmp_path / "out"

    def cli(*args):
        with pytest.raises(SystemExit) as e:
            generate.main(["--model", built["sd15"], "--prompt", PROMPT, "--steps", "10", "--warmup", "0", *args,
                           "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("error") == 1 and "Traceback" not in err, err
        assert not out.exists()
        return err
    load = generate.load_service
    monkeypatch.setattr(generate, "load_service", lambda *a, **k: pytest.fail("the model was loaded"))
    img = str(tmp_path / "in.png")
    for args, message in ((["--image", str(tmp_path / "in.gif")], "image is a GIF image; allowed: PNG, JPEG"),
                          (["--image", img, "--max-side", "44"], "image is 48x40 pixels; the limit is 44 per side"),
                          (["--image", img, "--max-image-bytes", "100"], "the request's images are over 100 bytes"),
                          (["--image", img, "--strength", "0.05"], "strength=0.05 with 10 steps keeps no step"),
                          (["--image", img, "--controlnet", built["cn"], "--control-image", img],
                           "--controlnet runs ControlNet text-to-image; it does not combine with --image"),
                          (["--model", "digits", "--image", img], "--image apply to diffusers pipelines")):
        assert message in cli(*args)
    monkeypatch.setattr(generate, "load_service", load)
    assert "the control image is 32x48" in cli("--controlnet", built["cn"], "--control-image",
                                               str(tmp_path / "control.png"), "--height", "32", "--width", "32")
    assert "could not be loaded" in cli("--lora", str(tmp_path / "broken.safetensors"))


def test_engine_requests_with_images(built, tmp_path):
    """The engine (one process) serves img2img, inpainting and LoRA-scaled requests with base64 images, the
    same images as the functional API, and answers bad images with an error before any work."""
    import base64
    from driffusion_rt import requests, services
    from driffusion_rt.engine import Engine

    limits = requests.Limits(image_bytes=20000)
    engine = Engine(services.load_service(built["sd15"], torch.device("cpu")), limits)
    pipe = engine.service.pipe
    quiet(pipe)
    base = dict(prompt=PROMPT, steps=6, seed=1, guidance_scale=4.0, mode="aggressive", parallel=2)
    r = engine.generate(dict(base, image=b64(tp.image(50, 32, 48)), strength=0.6))
    assert r.ok, r.error
    ref, _ = image_to_image(pipe, PROMPT, tp.image(50, 32, 48), strength=0.6, steps=6, seed=1, guidance_scale=4.0,
                            mode="aggressive", parallel=2, output_type="latent")
    assert rel_err(r.latent, ref) == 0 and r.images[0].size == (48, 32)
    r = engine.generate(dict(base, image=b64(tp.image(51), "JPEG"), mask_image=b64(tp.mask()), height=32, width=32))
    assert r.ok and r.images[0].size == (32, 32), r.error
    import threading
    cancel = threading.Event()
    cancel.set()  # an inpainting request cancelled by its caller before it started does no work at all
    served = engine.served
    r = engine.generate(dict(base, image=b64(tp.image(51)), mask_image=b64(tp.mask()), height=32, width=32), cancel)
    assert not r.ok and r.status == 499 and "cancelled before it started" in r.error, r.error
    assert engine.served == served
    bad = {
        "image is not valid base64": dict(image="not base64!"),
        "image cannot be read as an image": dict(image=base64.b64encode(b"GIF89a....").decode()),
        "image is a GIF image; allowed: PNG, JPEG": dict(image=b64(tp.image(0), "GIF")),
        "the request's images are over 20000 bytes": dict(image=b64(tp.image(0, 96, 96, "RGB")),
                                                          mask_image=b64(tp.image(1, 96, 96))),
        "strength must be a number in (0, 1]": dict(image=b64(tp.image(0)), strength=2),
        "strength applies to requests with an image": dict(strength=0.5),
        "control_image needs a server started with --controlnet": dict(control_image=b64(tp.image(0))),
        "mask_image needs image": dict(mask_image=b64(tp.mask())),
    }
    served = engine.served
    for message, fields in bad.items():
        r = engine.generate(dict(base, **fields))
        assert not r.ok and r.status == 422 and message in r.error, (message, r.error)
    assert engine.served == served  # none of them reached the sampler



@pytest.mark.slow
def test_http_img2img_on_two_ranks(built, tmp_path):
    """serve.py on 2 gloo ranks: an img2img request with a base64 PNG, an inpainting request with a JPEG, a body
    over the image limit (413) and an unreadable image (422)."""
    import base64
    import io
    import json

    from serving import kill_job, post, start_server
    proc, port = start_server(tmp_path, "--model", built["sd15"], "--max-requests", "3", "--max-image-bytes", "30000")
    try:
        base = dict(prompt=PROMPT, steps=6, guidance_scale=4.0, parallel=2, seed=3)
        status, _, body = post(port, dict(base, image=b64(tp.image(60, 32, 48)), strength=0.7))
        assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n", body[-500:]
        from PIL import Image
        assert Image.open(io.BytesIO(body)).size == (48, 32)
        status, _, body = post(port, dict(base, image=b64(tp.image(61), "JPEG"), mask_image=b64(tp.mask()),
                                       response="base64"))
        assert status == 200 and len(json.loads(body)["images"]) == 1, body[-500:]
        status, _, body = post(port, dict(base, image="A" * 120000))
        assert status == 413 and b"request body over" in body
        status, _, body = post(port, dict(base, image=base64.b64encode(b"\x89PNG broken").decode()))
        assert status == 422 and b"image cannot be read as an image" in body
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
    finally:
        kill_job(proc)
    access = [json.loads(line) for line in out.splitlines() if '"event": "access"' in line]
    assert [(r["status"], r.get("task")) for r in access] == [(200, "img2img"), (200, "inpaint"), (413, None),
                                                           (422, None)]


def test_img2img_and_inpainting_refuse_pipelines_they_cannot_run(pipes, built):
    cn = task_pipe(pipes, "sd15", "controlnet", controlnet=controlnets(built, "cn"))
    with pytest.raises(ValueError, match=r"img2img on a ControlNet pipeline \(StableDiffusionControlNetPipeline\) is "
                                         r"not supported"):
        image_to_image(cn, PROMPT, tp.image(0), strength=0.5)
    with pytest.raises(ValueError, match="inpainting on a ControlNet pipeline"):
        inpaint(cn, PROMPT, tp.image(0), tp.mask())
    with pytest.raises(ValueError, match="img2img needs a UNet whose input is the latent alone; this one takes 9"):
        image_to_image(pipes["sd-inpaint"], PROMPT, tp.image(0), strength=0.5)


def test_controlnet_and_lora_scale_under_graph_replay(pipes, built, tmp_path):
    """A CPU stand-in for CUDA-graph capture (replay recomputes from the captured static buffers): ControlNet's
    per-step scales are refreshed for every call (rows at other steps, no new capture) and a LoRA scale is baked
    in, keyed by value (Static: a new scale captures again); both equal the eager calls bit for bit."""
    from driffusion_rt.cuda_graphs import GraphCache
    from driffusion_rt.evaluator import ModelCall
    from driffusion_rt.pipelines import model_adapter

    class StandIn:
        def __call__(self, run, pool):
            y = run()
            return (lambda: y.copy_(run())), y

    def compare(pipe, req, graphs, idxs):
        model = model_adapter(pipe)
        for idx in idxs:
            states = torch.randn(len(idx), *req.latents.shape, generator=torch.Generator().manual_seed(len(idx)))
            a, b = torch.empty_like(states), torch.empty_like(states)
            ModelCall(model, req.trajectory, req.latents, req.model_kwargs)(states, idx, a)
            ModelCall(model, req.trajectory, req.latents, req.model_kwargs, graphs)(states, idx, b)
            assert torch.equal(a, b), idx

    cn = task_pipe(pipes, "sd15", "controlnet", controlnet=controlnets(built, "cn"))
    graphs = GraphCache(capture=StandIn(), size=16, new_pool=object)
    req = prepare(cn, PROMPT, negative_prompt="blurry", steps=8, guidance_scale=4.0, seed=0,
                  conditioning=cond.control(cn, tp.image(0), control_guidance_end=0.5))
    compare(cn, req, graphs, [(0,), (1, 6), (5, 2), (7,)])  # rows on and off in one call, both orders
    assert graphs.captures == 2
    lp = quiet(load_pipeline(built["sd15"]))
    lp.load_lora_weights(save_lora(lp, str(tmp_path / "lora")), adapter_name="a")
    graphs = GraphCache(capture=StandIn(), size=16, new_pool=object)
    for scale in (0.5, 0.5, 1.5):
        req = prepare(lp, PROMPT, steps=4, guidance_scale=4.0, height=32, width=32, seed=0, lora_scale=scale)
        compare(lp, req, graphs, [(0,), (1, 2)])
    assert graphs.captures == 4  # widths 1 and 2, for each of the two scales


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_joint_attention_kwargs_scale_is_accepted_like_diffusers(pipes, kind):
    """SD3 / Flux take the per-call LoRA scale as joint_attention_kwargs; with none loaded it changes nothing, in
    the runtime as in diffusers."""
    kw = dict(prompt=PROMPT, num_inference_steps=4, guidance_scale=4.0, height=32, width=32,
              joint_attention_kwargs={"scale": 0.5}, **SEQ)
    out, ref, _ = parity(pipes[kind], kw)
    assert rel_err(out, ref) <= 1e-5
