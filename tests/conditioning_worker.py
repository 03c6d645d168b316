"""Image tasks on 2+ gloo ranks, launched by tests/test_conditioning.py as
`torchrun --nproc_per_node=N tests/conditioning_worker.py OUT.json SD_DIR CN_DIR CN2_DIR`.

Every rank prepares the same request (the VAE runs on rank 0 only; the start state, the image latents and the
noise are broadcast) and samples it twice: with the distributed evaluator and with the local one. Rank 0 writes,
per case and rank, the relative difference between the two and a checksum of the prepared start state.
"""
import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import tiny_pipelines as tp  # noqa: E402

from driffusion_rt import Sampler  # noqa: E402
from driffusion_rt.distributed import default_evaluator, maybe_init_dist  # noqa: E402
from driffusion_rt.evaluator import LocalEvaluator  # noqa: E402
from driffusion_rt.pipelines import DRiffusionPipeline, for_task, load_pipeline, model_adapter, prepare, run  # noqa
from driffusion_rt.pipelines import conditioning as cond  # noqa: E402


def main(path, sd_dir, cn_dir, cn2_dir):
    info = maybe_init_dist(timeout_s=120)
    from diffusers import ControlNetModel
    base = load_pipeline(sd_dir)
    cn = for_task(base, "controlnet", controlnet=[ControlNetModel.from_pretrained(d) for d in (cn_dir, cn2_dir)])
    for p in (base, cn):
        p.set_progress_bar_config(disable=True)
    cases = {
        "img2img": (base, cond.img2img(base, tp.image(0, 32, 48), 0.7)),
        "controlnet": (cn, cond.control(cn, [tp.image(1, 32, 48), tp.image(2, 32, 48)], [0.8, 1.2],
                                        control_guidance_end=[1.0, 0.6])),
        "inpaint": (base, cond.inpainting(base, tp.image(3, 32, 48), tp.mask(32, 48), 0.8)),
    }
    rows = []
    with torch.no_grad():
        for name, (pipe, inputs) in cases.items():
            model = model_adapter(pipe)
            samplers = {"dist": Sampler(model, default_evaluator(model)),
                        "local": Sampler(model, LocalEvaluator(model))}
            for mode in ("aggressive", "conservative"):
                req = prepare(pipe, "a photo of a red cat", negative_prompt="blurry", steps=8, guidance_scale=4.0,
                              height=32, width=48, seed=5, conditioning=inputs)
                outs = {k: run(pipe, req, mode=mode, parallel=2, sampler=s).sample for k, s in samplers.items()}
                a, ref = outs["dist"], outs["local"]
                rows.append(dict(case=name, mode=mode, rank=info.rank, x_sum=float(req.latents.double().sum()),
                                 rel_err=((a - ref).abs().max() / ref.abs().max()).item(),
                                 finite=bool(torch.isfinite(a).all())))
        # the wrapper on every rank: rank 0 gets the pipeline's output class with images, the others empty fields
        wrapped = DRiffusionPipeline(for_task(base, "img2img"), mode="aggressive", parallel=2)
        out = wrapped("a photo of a red cat", image=tp.image(0, 32, 48), strength=0.7, num_inference_steps=8,
                      guidance_scale=4.0, generator=torch.Generator().manual_seed(5), output_type="np")
        rows.append(dict(case="wrapper", rank=info.rank, images=None if out.images is None else list(out.images.shape),
                         serial_rounds=wrapped.last_stats.serial_rounds))
    gathered = [None] * info.world
    dist.all_gather_object(gathered, rows)
    if info.rank == 0:
        with open(path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
