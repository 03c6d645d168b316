"""torchrun worker for tests/test_cfg_parallel.py: guidance-parallel layouts against in-rank guidance.

    pairs OUT.json SD_DIR SDXL_DIR FLUX_DIR   2 ranks, cfg 2 x draft 1: tiny SD, SDXL and Flux (true CFG) pipelines
    engine OUT.json                           2 ranks, the digits engine with cfg 2
    grid OUT.json SD_DIR                      4 ranks, cfg 2 x draft 2, n = 2, against the local evaluator: every
                                              mode (extrapolated drafts, Picard and ParaSolver too)
Each rank first computes the reference with the local evaluator and no hooks (guidance inside the call), then the
same request through the layout.
"""
import json
import sys

import torch
import torch.distributed as dist

from driffusion_rt import Sampler
from driffusion_rt.layout import Layout, denoisers, guided
from driffusion_rt.distributed import default_evaluator, maybe_init_dist, teardown
from driffusion_rt.evaluator import LocalEvaluator

PROMPT = "a photo of a red cat"


def run_case(pipe, info, cfg, parallel, mode, sample_kwargs=None, **kw):
    from driffusion_rt import pipelines
    adapter = pipelines.model_adapter(pipe)
    opts = sample_kwargs or {}
    req = pipelines.prepare(pipe, PROMPT, steps=6, height=32, width=32, num_images=2, seed=3, **kw)
    ref = pipelines.run(pipe, req, mode=mode, parallel=parallel, sampler=Sampler(adapter, LocalEvaluator(adapter)),
                        **opts).sample
    layout = Layout.make(cfg, info)
    handles = layout.apply(*denoisers(adapter, pipe))
    try:
        req = pipelines.prepare(pipe, PROMPT, steps=6, height=32, width=32, num_images=2, seed=3, **kw)
        out = pipelines.run(pipe, req, mode=mode, sampler=Sampler(adapter, default_evaluator(adapter, layout)),
                            **opts)
    finally:
        for h in handles:
            h.remove()
    every = [torch.empty_like(out.sample) for _ in range(info.world)]
    dist.all_gather(every, out.sample.contiguous())
    return dict(rank=info.rank, layout=layout.describe(), guided=guided(adapter, req.model_kwargs),
                parallel=out.stats.parallel, serial_rounds=out.stats.serial_rounds,
                rel_err=((out.sample - ref).abs().max() / ref.abs().max()).item(),
                ranks_agree=all(torch.equal(e, out.sample) for e in every))


def engine(path):
    """The digits engine with --cfg-parallel 2 on 2 ranks: guided requests equal one process's; an unguided one
    is refused (422) and the engine keeps serving."""
    from driffusion_rt import services
    from driffusion_rt.engine import Engine
    eng = Engine(services.load_service("digits", torch.device("cpu")), timeout_s=60, cfg_parallel="2")
    specs = [{"prompt": "07", "steps": 8, "seed": 1}, {"prompt": "3", "steps": 8, "guidance_scale": 1.0},
             {"prompt": "42", "steps": 8, "mode": "conservative", "seed": 2}]
    rows = []

    def main(e):
        for spec in specs:
            r = e.generate(spec)
            rows.append(dict(spec=spec, ok=r.ok, status=getattr(r, "status", None), error=r.error,
                             stats=r.stats, latent=r.latent.tolist() if r.latent is not None else None))
    eng.serve(main)
    if eng.rank == 0:
        with open(path, "w") as f:
            json.dump(rows, f)


def main(kind, path, *dirs):
    if kind == "engine":
        return engine(path)
    info = maybe_init_dist(timeout_s=120)
    from driffusion_rt import pipelines
    rows = []
    with torch.no_grad():
        if kind == "pairs":
            sd, sdxl, flux = (pipelines.load_pipeline(d) for d in dirs)
            for name, pipe, kw in (("sd", sd, dict(guidance_scale=4.0, negative_prompt="blurry",
                                                     guidance_rescale=0.5)),
                                   ("sdxl", sdxl, dict(guidance_scale=4.0)),
                                   ("flux", flux, dict(negative_prompt="ugly", true_cfg_scale=3.0,
                                                       max_sequence_length=16))):
                rows.append(dict(run_case(pipe, info, 2, 1, "aggressive", **kw), family=name))
        else:
            sd = pipelines.load_pipeline(dirs[0])
            for mode, opts in (("aggressive", {}), ("conservative", {}), ("aggressive", {"drafts": "extrapolate"}),
                               ("picard", {"tolerance": 0.01}),
                               ("parasolver", {"subintervals": 3, "preconditioning": 1, "tolerance": 0.01})):
                rows.append(dict(run_case(sd, info, 2, 2, mode, opts, guidance_scale=4.0), family="sd", mode=mode,
                                 options=opts))
    gathered = [None] * info.world
    dist.all_gather_object(gathered, rows)
    if info.rank == 0:
        with open(path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)
    teardown(info)


if __name__ == "__main__":
    main(*sys.argv[1:])
