"""Qwen-Image, Qwen-Image-Edit, Flux.2 and Z-Image on 2 gloo ranks, launched by tests/test_families.py as
`torchrun --nproc_per_node=2 tests/families_worker.py OUT.json QWEN_DIR EDIT_DIR FLUX2_DIR ZIMAGE_DIR`.

Every rank prepares the same request once (an input image is VAE-encoded on rank 0 and broadcast) and samples it
with the local evaluator (the reference), with the distributed evaluator (drafts spread over both ranks), and, for
the families whose calls are guided, through a guidance pair (cfg 2 x draft 1: each rank runs one half of every
doubled call, both drafts of a round on the pair). n = 2 throughout. Rank 0 writes one row per (family, layout, mode, rank).
"""
import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import tiny_families  # noqa: E402,F401  (diffusers loads the edit processor class from it: import it first)
import tiny_pipelines as tp  # noqa: E402

from driffusion_rt import Sampler  # noqa: E402
from driffusion_rt.distributed import default_evaluator, maybe_init_dist, teardown  # noqa: E402
from driffusion_rt.evaluator import LocalEvaluator  # noqa: E402
from driffusion_rt.layout import Layout, denoisers, guided  # noqa: E402
from driffusion_rt import pipelines  # noqa: E402

PROMPT = "a photo of a red cat"


def compare(pipe, req, info, layout_name, mode):
    adapter = pipelines.model_adapter(pipe)
    ref = pipelines.run(pipe, req, mode=mode, parallel=2, sampler=Sampler(adapter, LocalEvaluator(adapter))).sample
    layout = Layout.make(2 if layout_name == "cfg" else 1, info)
    handles = layout.apply(*denoisers(adapter, pipe))
    try:
        out = pipelines.run(pipe, req, mode=mode, parallel=2, sampler=Sampler(adapter, default_evaluator(adapter, layout)))
    finally:
        for h in handles:
            h.remove()
    every = [torch.empty_like(out.sample) for _ in range(info.world)]
    dist.all_gather(every, out.sample.contiguous())
    return dict(layout=layout_name, mode=mode, rank=info.rank, guided=guided(adapter, req.model_kwargs),
                parallel=out.stats.parallel, serial_rounds=out.stats.serial_rounds,
                finite=bool(torch.isfinite(out.sample).all()),
                rel_err=((out.sample - ref).abs().max() / ref.abs().max()).item(),
                ranks_agree=all(torch.equal(e, out.sample) for e in every))


def main(path, qwen_dir, edit_dir, flux2_dir, zimage_dir):
    info = maybe_init_dist(timeout_s=300)
    qwen, edit, flux2, zimage = (pipelines.load_pipeline(d) for d in (qwen_dir, edit_dir, flux2_dir, zimage_dir))
    for p in (qwen, edit, flux2, zimage):
        p.set_progress_bar_config(disable=True)
    common = dict(steps=6, seed=4)
    cases = [  # (family, pipeline, prepare's arguments, layouts)
        ("qwen-image", qwen, dict(negative_prompt="ugly", guidance_scale=4.0, height=32, width=48, num_images=2),
         ("draft", "cfg")),
        ("qwen-image-edit", edit, dict(negative_prompt="ugly", guidance_scale=4.0, height=64, width=32,
                                       conditioning=pipelines.edit(edit, tp.image(0, 40, 56))), ("draft", "cfg")),
        ("flux2", flux2, dict(guidance_scale=4.0, height=32, width=48, max_sequence_length=256), ("draft",)),
        ("z-image", zimage, dict(negative_prompt="ugly", guidance_scale=3.0, height=32, width=48,
                                 conditioning=pipelines.img2img(zimage, tp.image(1, 32, 48), 0.8)), ("draft", "cfg")),
    ]
    rows = []
    with torch.no_grad():
        for family, pipe, kw, layouts in cases:
            req = pipelines.prepare(pipe, PROMPT, **common, **kw)
            for layout in layouts:
                for mode in ("aggressive", "conservative"):
                    rows.append(dict(compare(pipe, req, info, layout, mode), family=family))
    gathered = [None] * info.world
    dist.all_gather_object(gathered, rows)
    if info.rank == 0:
        with open(path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)
    teardown(info)


if __name__ == "__main__":
    main(*sys.argv[1:6])
