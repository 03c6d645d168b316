"""torchrun worker for tests/test_sequence_parallel.py: sequence-parallel layouts against the unsplit model.

    pairs OUT.json FLUX WAN21 WAN22 LTX WAN22_5B WAN21_I2V FLUX2 QWEN QWEN_EDIT
                                          2 ranks, 1 draft x ulysses 2: Flux (true CFG, img2img also through
                                          image_to_image, LoRA), Wan 2.1, Wan 2.2 (two experts) and LTX (guided: the
                                          text masks differ per row), sequential and aggressive n = 2; Wan 2.2
                                          TI2V-5B (a timestep per token, split too) and Wan 2.1 image-to-video,
                                          aggressive; Flux.2, Qwen-Image (guided) and
                                          Qwen-Image-Edit, sequential and aggressive, each Qwen prompt of a token
                                          count Ulysses 2 does not divide (the adapter pads it); then the Flux
                                          engine with --ulysses 2 (OUT.json.engine): two requests and, between
                                          them, one whose image tokens 2 ranks cannot split (422)
    grid OUT.json FLUX                    4 ranks: 2 drafts x ulysses 2 against the local evaluator (aggressive,
                                          conservative), and a guidance pair x ulysses 2 against in-rank guidance
Each rank first computes the reference on its own unsplit replica with the local evaluator (Ulysses 1: every
token and head on one rank), then turns the split on (diffusers' context parallelism cannot be turned off again)
and runs the same request through the layout. Rows: each rank's relative error and whether every rank of the job
holds the same bits.
"""
import dataclasses
import json
import sys

import PIL.Image
import torch
import torch.distributed as dist

import tiny_families  # noqa: F401  (diffusers loads the edit processor class from it: import it first)
import tiny_pipelines as tp
import tiny_video as tv
from driffusion_rt import Sampler, pipelines
from driffusion_rt.distributed import maybe_init_dist, teardown
from driffusion_rt.evaluator import LocalEvaluator
from driffusion_rt.layout import parallelize
from driffusion_rt.pipelines.prepare import check_split

PROMPT = "a photo of a red cat"
FLUX = dict(height=32, width=32, max_sequence_length=tp.T5_MAX_LEN, negative_prompt="ugly", true_cfg_scale=3.0)
FAMILIES = {  # prepare's arguments; the Qwen prompts are 149 and 293 tokens long (odd: padded under Ulysses 2)
    "flux2": ("a photo of a red cat", dict(guidance_scale=4.0, height=32, width=48, max_sequence_length=256)),
    "qwen-image": ("a photo of a red cats", dict(negative_prompt="ugly", guidance_scale=4.0, height=32, width=48)),
    "qwen-image-edit": ("a photo of a red cat", dict(height=64, width=32)),  # unguided: no mask until padded
}
VIDEO = dict(height=32, width=32, num_frames=9, negative_prompt="blurry", max_sequence_length=tv.T5_MAX_LEN,
             guidance_scale=4.0)


def local(pipe):
    adapter = pipelines.model_adapter(pipe)
    return Sampler(adapter, LocalEvaluator(adapter), cuda_graphs=False)


class Tokens:
    """What the transformers' output projections see (rows, tokens: dims 0 and 1 of proj_out's input): whole calls
    on the unsplit replica, this rank's share of the tokens (and under a guidance pair its half of the rows) when
    split."""

    def __init__(self, pipe):
        self.seen, self.text = set(), set()
        for t in (pipe.transformer, getattr(pipe, "transformer_2", None)):
            if t is not None:
                t.proj_out.register_forward_pre_hook(lambda m, args: self.seen.add(tuple(args[0].shape[:2])))
        txt_in = getattr(pipe.transformer, "txt_in", None)  # Qwen-Image: the prompt before diffusers' split
        if txt_in is not None:
            txt_in.register_forward_pre_hook(lambda m, args: self.text.add(args[0].shape[1]))

    def take(self) -> list:
        """The largest rows and the largest token count seen since the last take."""
        seen, self.seen = self.seen, set()
        return [max(r for r, _ in seen), max(t for _, t in seen)]

    def take_text(self) -> list:
        """The prompt token counts the transformer took since the last take (Qwen-Image)."""
        text, self.text = sorted(self.text), set()
        return text


def compare(info, name, out, ref, layout, **extra):
    every = [torch.empty_like(out) for _ in range(info.world)]
    dist.all_gather(every, out.contiguous())
    return dict(case=name, rank=info.rank, layout=layout.describe(), **extra,
                rel_err=((out - ref).abs().max() / ref.abs().max()).item(),
                ranks_agree=all(torch.equal(e, out) for e in every))


def image_case(info, path, name, cfg=1, runs=(("sequential", 1), ("aggressive", 2)), lora=False, img2img=False):
    """A Flux request through (draft, cfg, ulysses 2) against the same request on the unsplit replica."""
    pipe = pipelines.load_pipeline(path)
    kw = dict(FLUX)
    if lora:  # LoRA layers on the transformer's attention, the same random weights on every rank
        from peft import LoraConfig  # optional: the lora extra
        torch.manual_seed(5)
        pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        kw["lora_scale"] = 0.5
    if img2img:
        kw["conditioning"] = pipelines.img2img(pipe, PIL.Image.effect_noise((32, 32), 40).convert("RGB"), 0.75)
    tokens = Tokens(pipe)
    refs = {r: pipelines.run(pipe, pipelines.prepare(pipe, PROMPT, steps=6, seed=3, **kw), mode=r[0], parallel=r[1],
                             sampler=local(pipe)).sample for r in runs}
    whole = tokens.take()
    sampler = parallelize(pipelines.model_adapter(pipe), pipe, cfg=cfg, info=info, ulysses=2)
    rows = []
    for (mode, n), ref in refs.items():
        out = pipelines.run(pipe, pipelines.prepare(pipe, PROMPT, steps=6, seed=3, **kw), mode=mode, parallel=n,
                            sampler=sampler)
        rows.append(compare(info, name, out.sample, ref, sampler.layout, mode=mode, parallel=out.stats.parallel,
                            tokens=whole, tokens_split=tokens.take()))
    return rows


def functional_img2img(info, path):
    """image_to_image(..., ulysses=2): the functional form builds the layout itself."""
    pipe = pipelines.load_pipeline(path)
    image = PIL.Image.effect_noise((32, 32), 40).convert("RGB")
    kw = dict(FLUX, steps=6, seed=3, strength=0.75, output_type="latent", mode="aggressive", parallel=2)
    ref, _ = pipelines.image_to_image(pipe, PROMPT, image, sampler=local(pipe), **kw)
    out, stats = pipelines.image_to_image(pipe, PROMPT, image, ulysses=2, **kw)
    if info.rank:  # only rank 0 decodes ("latent": the final latents)
        return []
    return [dict(case="flux img2img (image_to_image)", rank=info.rank, mode="aggressive", parallel=stats.parallel,
                 rel_err=((out - ref).abs().max() / ref.abs().max()).item(), ranks_agree=True,
                 layout={"cfg": 1, "draft_ranks": 1, "ulysses": 2, "ring": 1})]


def video_case(info, path, name, runs=(("sequential", 1), ("aggressive", 2)), wrapper=False, **extra):
    """A video request through 1 draft x ulysses 2 (video_sampler) against the unsplit replica; with `wrapper`, also
    DRiffusionPipeline(pipe, ulysses=2) against text_to_video on the unsplit replica (rank 0 decodes)."""
    pipe = tv.load(path)
    kw = dict(VIDEO, **extra)
    call = dict(kw, mode="aggressive", parallel=2, output_type="latent")
    unsplit = pipelines.text_to_video(pipe, PROMPT, steps=6, seed=4, sampler=local(pipe), **call)[0] if wrapper \
        else None
    tokens = Tokens(pipe)
    refs = {r: pipelines.run(pipe, pipelines.prepare_video(pipe, PROMPT, steps=6, seed=4, **kw), mode=r[0],
                             parallel=r[1], sampler=local(pipe)).sample for r in runs}
    whole = tokens.take()
    sampler = pipelines.video_sampler(pipelines.model_adapter(pipe), ulysses=2)
    rows = []
    for (mode, n), ref in refs.items():
        out = pipelines.run(pipe, pipelines.prepare_video(pipe, PROMPT, steps=6, seed=4, **kw), mode=mode,
                            parallel=n, sampler=sampler)
        rows.append(compare(info, name, out.sample, ref, sampler.layout, mode=mode, parallel=out.stats.parallel,
                            tokens=whole, tokens_split=tokens.take()))
    if wrapper:
        wrapped = pipelines.DRiffusionPipeline(pipe, mode=call.pop("mode"), parallel=call.pop("parallel"), ulysses=2)
        got = wrapped(PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(4), **call).frames
        if info.rank == 0:  # only rank 0 decodes ("latent": the final latents)
            rows.append(dict(case=f"{name} (DRiffusionPipeline)", rank=0, mode="aggressive",
                             parallel=wrapped.last_stats.parallel, layout=wrapped.sampler.layout.describe(),
                             rel_err=((got - unsplit).abs().max() / unsplit.abs().max()).item(), ranks_agree=True))
    return rows


def family_case(info, path, name):
    """A request of Flux.2, Qwen-Image or Qwen-Image-Edit (FAMILIES), prepared once, through 1 draft x ulysses 2
    against the unsplit replica; Qwen also records the prompt's token counts the transformer took (unsplit: the
    prompt's own; split: padded to a multiple of 2). An edit also checks a request of odd image tokens: refused."""
    pipe = pipelines.load_pipeline(path)
    prompt, kw = FAMILIES[name]
    if name == "qwen-image-edit":
        kw = dict(kw, conditioning=pipelines.edit(pipe, tp.image(0, 40, 56)))
    req = pipelines.prepare(pipe, prompt, steps=6, seed=3, **kw)
    tokens, runs = Tokens(pipe), (("sequential", 1), ("aggressive", 2))
    refs = {r: pipelines.run(pipe, req, mode=r[0], parallel=r[1], sampler=local(pipe)).sample for r in runs}
    whole, text = tokens.take(), tokens.take_text()
    sampler = parallelize(pipelines.model_adapter(pipe), pipe, info=info, ulysses=2)
    rows = []
    for (mode, n), ref in refs.items():
        out = pipelines.run(pipe, req, mode=mode, parallel=n, sampler=sampler)
        rows.append(compare(info, name, out.sample, ref, sampler.layout, mode=mode, parallel=out.stats.parallel,
                            tokens=whole, tokens_split=tokens.take(), text=text, text_split=tokens.take_text()))
    if name == "qwen-image-edit":  # 1 output token + 1026 of the image: the split cannot take it
        try:
            check_split(pipe, dataclasses.replace(req, height=32, width=32), sampler.layout)
            rows[-1]["refused"] = None
        except ValueError as e:
            rows[-1]["refused"] = str(e)
    return rows


def engine_case(path, flux):
    """The Flux engine with ulysses 2 on 2 ranks (it leaves the process group when it stops)."""
    from driffusion_rt import services
    from driffusion_rt.engine import Engine
    eng = Engine(services.load_service(flux, torch.device("cpu")), timeout_s=60, ulysses=2)
    base = {"prompt": PROMPT, "steps": 4, "height": 32, "width": 32}
    specs = [dict(base, seed=1), dict(base, height=36, width=36), dict(base, seed=2, mode="sequential")]
    rows = []

    def main(e):
        for spec in specs:
            r = e.generate(spec)
            rows.append(dict(spec=spec, ok=r.ok, status=r.status, error=r.error, stats=r.stats,
                             latent=r.latent.tolist() if r.latent is not None else None))
    eng.serve(main)
    if eng.rank == 0:
        with open(path, "w") as f:
            json.dump(rows, f)


def main(kind, path, *dirs):
    info = maybe_init_dist(timeout_s=120)
    rows = []
    with torch.no_grad():
        if kind == "pairs":
            flux, wan21, wan22, ltx, wan22_5b, wan21_i2v, flux2, qwen, qwen_edit = dirs
            rows += image_case(info, flux, "flux true CFG")
            rows += image_case(info, flux, "flux LoRA", runs=(("aggressive", 2),), lora=True)
            rows += image_case(info, flux, "flux img2img", runs=(("aggressive", 2),), img2img=True)
            rows += functional_img2img(info, flux)
            rows += video_case(info, wan21, "wan 2.1")
            rows += video_case(info, wan22, "wan 2.2", guidance_scale_2=2.0)
            rows += video_case(info, ltx, "ltx", width=64, wrapper=True)
            rows += video_case(info, wan22_5b, "wan 2.2 TI2V-5B", runs=(("aggressive", 2),), height=64)
            rows += video_case(info, wan21_i2v, "wan 2.1 I2V", runs=(("aggressive", 2),),
                               image=PIL.Image.new("RGB", (32, 32), (200, 30, 30)))
            for name, pipeline in (("flux2", flux2), ("qwen-image", qwen), ("qwen-image-edit", qwen_edit)):
                rows += family_case(info, pipeline, name)
        else:
            rows += image_case(info, dirs[0], "2 drafts x ulysses 2", runs=(("aggressive", 2), ("conservative", 2)))
            rows += image_case(info, dirs[0], "cfg pair x ulysses 2", cfg=2, runs=(("aggressive", 2),))
    gathered = [None] * info.world
    dist.all_gather_object(gathered, rows)
    if info.rank == 0:
        with open(path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)
    if kind == "pairs":
        engine_case(path + ".engine", dirs[0])
    teardown(info)


if __name__ == "__main__":
    main(*sys.argv[1:])
