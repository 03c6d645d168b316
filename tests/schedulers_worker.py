"""torchrun worker for tests/test_schedulers.py: multistep and stochastic schedulers on the distributed evaluator
against the local one (same noise: every rank draws it from a replica of rank 0's generator)."""
import json
import sys

import diffusers as d
import torch
import torch.distributed as dist

from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler
from driffusion_rt.distributed import default_evaluator, maybe_init_dist
from driffusion_rt.evaluator import LocalEvaluator

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def main(path):
    info = maybe_init_dist(timeout_s=120)
    mix = GaussianMixture.random(3, shape=(2, 4, 4), seed=0)
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rows = []
    with torch.no_grad():
        for name, sched in (("dpm++2m", d.DPMSolverMultistepScheduler(**SD)), ("unipc", d.UniPCMultistepScheduler(**SD)),
                            ("ddpm", d.DDPMScheduler(clip_sample=False, **SD)),
                            ("euler-a", d.EulerAncestralDiscreteScheduler(**SD)), ("sasolver", d.SASolverScheduler(**SD))):
            model = GaussianMixtureModel.for_scheduler(mix, sched, 16)
            for mode in ("aggressive", "conservative"):
                a, ref = (Sampler(model, ev)(sched, x, steps=16, mode=mode, parallel=2 * info.world,
                                             generator=torch.Generator().manual_seed(2)).sample
                          for ev in (default_evaluator(model), LocalEvaluator(model)))
                every = [torch.empty_like(a) for _ in range(info.world)]
                dist.all_gather(every, a)
                rows.append(dict(scheduler=name, mode=mode, rank=info.rank, bitwise=bool(torch.equal(a, ref)),
                                 ranks_agree=all(torch.equal(e, a) for e in every)))
        # the debug check itself: equal bits pass, one flipped bit on one rank fails on every rank
        ev = default_evaluator(None)
        t = torch.linspace(0, 1, 17, dtype=torch.float32)
        ev.check_in_step(t, "in the test")
        if info.rank == 1:
            t.view(torch.int32)[5] ^= 1
        try:
            ev.check_in_step(t, "in the test")
            caught = ""
        except RuntimeError as e:
            caught = str(e)
        rows.append(dict(scheduler="check", mode="-", rank=info.rank, bitwise=True, ranks_agree=True, caught=caught))
    gathered = [None] * info.world
    dist.all_gather_object(gathered, rows)
    if info.rank == 0:
        with open(path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
