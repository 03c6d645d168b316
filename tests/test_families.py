"""Qwen-Image (text-to-image and img2img), Qwen-Image-Edit, Flux.2 [dev] and Z-Image (text-to-image and img2img)
through the runtime, with tiny random-weight pipelines built offline (tests/tiny_families.py), saved and loaded by
path.

Parity: mode="sequential" equals the plain diffusers pipeline call (float32, 1e-5 relative) for each pipeline class,
guidance on where the family has it, and an override that must change the result shows the comparison sees that
part of the conditioning. Parallel modes: aggressive and conservative at n = 2 give finite images of the requested
size. 2 gloo ranks equal the local evaluator for each family (guided families through a guidance pair too). Bad
input specific to a family exits 2 before any model loads.

Offline and without torchvision (see tiny_families.py): Qwen-Image-Edit runs with a Qwen2VLProcessor that has no
video processor, Flux.2 with a chat-template tokenizer in place of its PixtralProcessor (the pipeline only calls
apply_chat_template on text); the real processors' own code is what these tests do not run.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import tiny_families as tf
from PIL import Image
import tiny_pipelines as tp
from cases import rel_err

from driffusion_rt import generate, make_plan
from driffusion_rt.pipelines import (DRiffusionPipeline, decode, edit, edit_image, for_task, get_family, img2img,
                                     load_pipeline, prepare, run, text_to_image)

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "a photo of a red cat"
STEPS = 3
SEQ = {"max_sequence_length": 256}  # Flux.2: its system message and the prompt, unpadded to 512


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {kind: tf.build(kind, str(root / kind)) for kind in tf.BUILDERS}


@pytest.fixture(scope="module")
def pipes(dirs):
    """kind -> pipeline loaded by path; the img2img pipelines made from the text-to-image ones (from_pipe)."""
    out = {kind: load_pipeline(path) for kind, path in dirs.items()}
    out["qwen-i2i"] = for_task(out["qwen"], "img2img")
    out["zimage-i2i"] = for_task(out["zimage"], "img2img")
    for pipe in out.values():
        pipe.set_progress_bar_config(disable=True)
    return out


# (id, kind, the pipeline's own call arguments, an override that must change the result). Every call goes through
# DRiffusionPipeline with the pipeline's argument names (Qwen-Image's true_cfg_scale, attention_kwargs, ...).
PARITY = [
    ("qwen-true-cfg-2-prompts", "qwen", dict(prompt=[PROMPT, "a blue house on a big green tree"],
                                             negative_prompt=["ugly", "blurry"], true_cfg_scale=4.0, height=32,
                                             width=48), dict(true_cfg_scale=2.0)),
    ("qwen-img2img", "qwen-i2i", dict(prompt=PROMPT, image=tp.image(0, 40, 56), strength=0.6, negative_prompt="ugly",
                                      true_cfg_scale=3.0, height=32, width=32), dict(image=tp.image(1, 40, 56))),
    ("qwen-edit", "qwen-edit", dict(prompt=PROMPT, image=tp.image(0, 40, 56), negative_prompt="ugly",
                                    true_cfg_scale=4.0, height=64, width=32),
     dict(image=Image.new("RGB", (56, 40), (255, 0, 0)))),  # (the tiny model's two output tokens change little)
    ("flux2-guidance-embedding", "flux2", dict(prompt=[PROMPT, "a blue house"], guidance_scale=4.0, height=32,
                                               width=48, num_images_per_prompt=2, **SEQ), dict(guidance_scale=1.5)),
    ("zimage-cfg-2-per-prompt", "zimage", dict(prompt=[PROMPT, "a blue house"], negative_prompt=["ugly", "a dog"],
                                               guidance_scale=3.0, height=32, width=48, num_images_per_prompt=2),
     dict(negative_prompt=None)),
    ("zimage-turbo-unguided", "zimage", dict(prompt=PROMPT, guidance_scale=0.0, height=32, width=32),
     dict(prompt="a blue house")),
    ("zimage-img2img", "zimage-i2i", dict(prompt=PROMPT, image=tp.image(2, 32, 48), strength=0.6, guidance_scale=2.0,
                                          height=32, width=48), dict(image=tp.image(3, 32, 48))),
]


def call(pipe, kw, wrapped=False):
    """The pipeline's call, or DRiffusionPipeline's; on copies of list arguments (Z-Image's encode_prompt rewrites
    a list of prompts in place)."""
    kw = {k: list(v) if isinstance(v, list) else v for k, v in kw.items()}
    kw.update(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7), output_type="latent")
    return (DRiffusionPipeline(pipe, mode="sequential") if wrapped else pipe)(**kw).images


@pytest.mark.parametrize("case,kind,kw,alt", PARITY, ids=[c[0] for c in PARITY])
def test_sequential_matches_diffusers(pipes, case, kind, kw, alt):
    pipe = pipes[kind]
    out, ref = call(pipe, kw, wrapped=True), call(pipe, kw)
    err = rel_err(out, ref)
    print(f"\n[parity] {case}: max rel err {err:.2e}")
    assert out.shape == ref.shape and err <= 1e-5, case
    assert rel_err(call(pipe, {**kw, **alt}, wrapped=True), ref) > 1e-3, alt


def test_functional_forms_take_the_runtime_names(pipes):
    """text_to_image's guidance_scale is Qwen-Image's true_cfg_scale; the requests' guided calls are one doubled
    call (what a guidance pair splits); LoRA scales travel in each pipeline's own argument."""
    from driffusion_rt.layout import guided
    from driffusion_rt.pipelines import model_adapter
    qwen = pipes["qwen"]
    kw = dict(steps=STEPS, height=32, width=32, seed=7, mode="sequential", output_type="latent")
    lat, _ = text_to_image(qwen, PROMPT, negative_prompt="ugly", guidance_scale=4.0, **kw)
    ref = call(qwen, dict(prompt=PROMPT, negative_prompt="ugly", true_cfg_scale=4.0, height=32, width=32))
    assert rel_err(lat, ref) <= 1e-5
    for kind, opts in (("qwen", dict(negative_prompt="ugly", guidance_scale=4.0)),
                       ("zimage", dict(guidance_scale=3.0)), ("qwen-edit", dict(negative_prompt="ugly"))):
        cond = edit(pipes[kind], tp.image(0, 40, 56)) if kind == "qwen-edit" else None
        req = prepare(pipes[kind], PROMPT, steps=2, height=32, width=32, seed=0, conditioning=cond, **opts)
        assert guided(model_adapter(pipes[kind]), req.model_kwargs), kind
    req = prepare(qwen, PROMPT, steps=2, height=32, width=32, seed=0, guidance_scale=4.0)  # no negative prompt
    assert not guided(model_adapter(qwen), req.model_kwargs)
    for kind, name in (("qwen", "attention_kwargs"), ("flux2", "attention_kwargs"),
                       ("zimage", "joint_attention_kwargs")):
        assert get_family(pipes[kind]).lora_kwargs == name
        extra = SEQ if kind == "flux2" else {}
        kwargs = dict(prompt=PROMPT, height=32, width=32, **{name: {"scale": 0.5}}, **extra)
        assert rel_err(call(pipes[kind], kwargs, wrapped=True), call(pipes[kind], kwargs)) <= 1e-5


def save_lora(pipe, directory, seed=0):
    """Random LoRA weights for the transformer's attention projections, saved in diffusers' format."""
    import copy
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers
    transformer = copy.deepcopy(pipe.transformer)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v"]), adapter_name="tmp")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(transformer, adapter_name="tmp"))
    type(pipe).save_lora_weights(directory, transformer_lora_layers=layers, safe_serialization=True)
    return os.path.join(directory, "pytorch_lora_weights.safetensors")


def test_lora_with_a_per_call_scale_matches_diffusers(dirs, tmp_path):
    pipe = load_pipeline(dirs["qwen"])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, negative_prompt="ugly", true_cfg_scale=4.0, height=32, width=32)
    before = call(pipe, kw)
    pipe.load_lora_weights(save_lora(pipe, str(tmp_path / "lora")), adapter_name="style")
    scaled = dict(kw, attention_kwargs={"scale": 0.5})
    out, ref = call(pipe, scaled, wrapped=True), call(pipe, scaled)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(out, before) > 1e-3 and rel_err(out, call(pipe, kw, wrapped=True)) > 1e-3


# ---------------------------------------------------------------------------------------------- parallel modes


PARALLEL = [  # (kind, prepare's arguments)
    ("qwen", dict(negative_prompt="ugly", guidance_scale=4.0, height=32, width=48)),
    ("qwen-i2i", dict(conditioning="img2img", height=32, width=48)),
    ("qwen-edit", dict(conditioning="edit", negative_prompt="ugly", height=64, width=32)),
    ("flux2", dict(height=32, width=48, **SEQ)),
    ("zimage", dict(negative_prompt="ugly", guidance_scale=3.0, height=32, width=48)),
    ("zimage-i2i", dict(conditioning="img2img", height=32, width=48)),
]


@pytest.mark.parametrize("kind,kw", PARALLEL, ids=[k for k, _ in PARALLEL])
def test_parallel_modes_give_finite_images_of_the_requested_size(pipes, kind, kw):
    pipe, kw, steps = pipes[kind], dict(kw), 6
    task = kw.pop("conditioning", None)
    if task == "img2img":
        kw["conditioning"] = img2img(pipe, tp.image(3, kw["height"], kw["width"]), 0.6)  # starts at step 2 of 6
    elif task == "edit":
        kw["conditioning"] = edit(pipe, tp.image(3, 40, 56))
    req = prepare(pipe, PROMPT, steps=steps, num_images=2, seed=5, **kw)
    seq = run(pipe, req, mode="sequential").sample
    for mode in ("aggressive", "conservative"):
        out = run(pipe, req, mode=mode, parallel=2)
        plan = make_plan(mode, req.trajectory.steps, 2)
        assert out.stats.serial_rounds == plan.serial_rounds < req.trajectory.steps, mode
        assert 0 < rel_err(out.sample, seq) < 0.5, mode  # drafts were used, and they stay close
        images = decode(pipe, out.sample, height=req.height, width=req.width, output_type="pt").images
        assert images.shape == (2, 3, kw["height"], kw["width"]) and torch.isfinite(images).all(), mode
        assert images.std() > 0


# ---------------------------------------------------------------------------------------------- 2 ranks


@pytest.mark.slow
def test_two_gloo_ranks_equal_the_local_evaluator(dirs, tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "families_worker.py"), str(out), dirs["qwen"], dirs["qwen-edit"], dirs["flux2"],
           dirs["zimage"]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    layouts = {"qwen-image": ("draft", "cfg"), "qwen-image-edit": ("draft", "cfg"), "flux2": ("draft",),
               "z-image": ("draft", "cfg")}
    assert sorted((r["family"], r["layout"], r["mode"], r["rank"]) for r in rows) == sorted(
        (f, lay, m, k) for f, ls in layouts.items() for lay in ls for m in ("aggressive", "conservative")
        for k in (0, 1))
    print("\n[2 gloo ranks vs local] " + ", ".join(f"{r['family']}/{r['layout']}/{r['mode']}: {r['rel_err']:.1e}"
                                               for r in rows if r["rank"] == 0))
    for row in rows:
        assert row["finite"] and row["ranks_agree"] and row["rel_err"] <= 1e-6, row
        assert row["guided"] == (row["family"] != "flux2"), row
        assert row["parallel"] == 2 and row["serial_rounds"] < 6, row


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "in.png"
    tp.image(0, 40, 56).save(path)
    return str(path)


BAD = [  # (kind, arguments, message)
    ("qwen-edit", [], "this qwen-image-edit pipeline edits an image: requests need image (the picture to edit)"),
    ("qwen-edit", ["--image", "IMAGE", "--strength", "0.5"], "edits an image: requests need image (the picture to "
                                                              "edit) and take no strength"),
    ("qwen-edit", ["--image", "IMAGE", "--height", "48"], "height=48 is not a multiple of 32, which the "
                                                          "qwen-image-edit pipeline needs (VAE scale factor 16 x 2"),
    ("qwen", ["--height", "36"], "height=36 is not a multiple of 8, which the qwen-image pipeline needs (VAE scale "
                                 "factor 4 x 2 for the 2 x 2 latent packing); use e.g. 32 or 40"),
    ("qwen", ["--image", "IMAGE", "--mask-image", "IMAGE"], "inpainting is supported for the sd, sdxl families; "
                                                            "the qwen-image pipeline has none"),
    ("flux2", ["--width", "30"], "width=30 is not a multiple of 4, which the flux2 pipeline needs (VAE scale factor "
                                 "2 x 2 for the 2 x 2 latent patches)"),
    ("flux2", ["--image", "IMAGE"], "img2img is supported for the sd, sdxl, sd3, flux, qwen-image, z-image families; "
                                    "the flux2 pipeline has none"),
    ("zimage", ["--height", "30"], "height=30 is not a multiple of 4, which the z-image pipeline needs"),
    ("zimage", ["--scheduler", "ddim"], "scheduler 'ddim' is not supported for z-image pipelines; choose one of flow"),
]


@pytest.mark.parametrize("kind,args,message", BAD, ids=[f"{k} {' '.join(a)}" for k, a, _ in BAD])
def test_bad_input_exits_2_before_any_work(dirs, image_file, kind, args, message, tmp_path, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(generate, "load_service", never)
    out = tmp_path / "out"
    args = [image_file if a == "IMAGE" else a for a in args]
    with pytest.raises(SystemExit) as e:
        generate.main(["--model", dirs[kind], "--prompt", PROMPT, "--steps", "2", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_python_api_bad_input_fails_before_any_model_call(pipes, monkeypatch):
    """An edit without its image, or with several, and sizes a family cannot take: ValueError, no model called."""
    for kind in ("qwen-edit", "qwen", "zimage", "flux2"):
        monkeypatch.setattr(pipes[kind].transformer, "forward", None)  # any denoiser call would fail loudly
        monkeypatch.setattr(pipes[kind].text_encoder, "forward", None)
    edit_pipe = pipes["qwen-edit"]
    with pytest.raises(ValueError, match=r"QwenImageEditPipeline needs image= \(the input image\)"):
        DRiffusionPipeline(edit_pipe)(PROMPT, num_inference_steps=2)
    with pytest.raises(ValueError, match="QwenImageEditPipeline edits an image: pass image="):
        text_to_image(edit_pipe, PROMPT, steps=2)
    with pytest.raises(ValueError, match=r"an edit takes one image and one prompt per request .*got 2 image\(s\)"):
        edit_image(edit_pipe, PROMPT, [tp.image(0), tp.image(1)], steps=2)
    with pytest.raises(ValueError, match="editing is supported for the qwen-image-edit families; the qwen-image "
                                         "pipeline has none"):
        edit(pipes["qwen"], tp.image(0))
    for kind, h, w, message in (("qwen", 32, 44, "width=44 is not a multiple of 8"),
                                ("qwen-edit", 40, 32, "height=40 is not a multiple of 32"),
                                ("flux2", 22, 32, "height=22 is not a multiple of 4"),
                                ("zimage", 32, 34, "width=34 is not a multiple of 4")):
        extra = {"image": tp.image(0, 40, 56)} if kind == "qwen-edit" else {}
        with pytest.raises(ValueError, match=message):
            DRiffusionPipeline(pipes[kind])(PROMPT, num_inference_steps=2, height=h, width=w, **extra)
    with pytest.raises(ValueError, match="max_sequence_length=2000 is more than the 1024 tokens"):
        text_to_image(pipes["qwen"], PROMPT, steps=2, height=32, width=32, max_sequence_length=2000)
    from types import SimpleNamespace
    distilled = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=True)))
    with pytest.raises(ValueError, match="has a guidance embedding .*which no published checkpoint has"):
        get_family(pipes["qwen"]).adapter(distilled)


# ---------------------------------------------------------------------------------------------- command line


def test_cli_edits_and_img2img_through_the_runtime(dirs, pipes, image_file, tmp_path):
    """--model DIR with --image: Qwen-Image-Edit edits (the output takes the resized image's size unless asked),
    Z-Image img2img keeps the image's size; each PNG equals the functional form's image."""
    import numpy as np
    from PIL import Image
    cases = [("qwen-edit", ["--negative-prompt", "ugly", "--height", "64", "--width", "32"], (64, 32)),
             ("zimage", ["--strength", "0.6"], (40, 56))]
    for kind, args, size in cases:
        out = tmp_path / kind
        generate.main(["--model", dirs[kind], "--prompt", PROMPT, "--steps", "4", "--image", image_file,
                       "--parallel", "2", "--warmup", "0", *args, "--out", str(out)])
        (png,) = out.glob("*.png")
        got = np.asarray(Image.open(png), np.int16)
        assert got.shape == (*size, 3)
        im = Image.open(image_file).convert("RGB")
        kw = dict(steps=4, seed=0, mode="aggressive", parallel=2, output_type="pil")
        if kind == "qwen-edit":
            ref, _ = edit_image(pipes[kind], PROMPT, im, negative_prompt="ugly", height=64, width=32, **kw)
        else:
            ref, _ = text_to_image(pipes[kind], PROMPT, conditioning=img2img(pipes[kind], im, 0.6), **kw)
        assert np.abs(got - np.asarray(ref[0], np.int16)).max() <= 1, kind
