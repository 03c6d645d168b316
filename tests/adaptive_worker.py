"""Error-controlled sampling on several ranks, launched by tests/test_adaptive.py as
`torchrun --nproc_per_node=N tests/adaptive_worker.py OUT.json`: the distributed evaluator against the local one
(Gaussian mixture, float64; DDIM, DPM++ 2M with registers, DDPM with noise; n a multiple of the ranks and not)."""
import json
import sys

import torch

from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler
from driffusion_rt import schedulers as named
from driffusion_rt.distributed import default_evaluator, maybe_init_dist, teardown
from driffusion_rt.evaluator import LocalEvaluator


def main(path):
    info = maybe_init_dist(timeout_s=60)
    mix = GaussianMixture.random(4, shape=(4, 8, 8), seed=0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for name in ("ddim", "dpm++2m", "ddpm"):
        sched = named.toy(name) if name in named.TOY else named.build(name, named.toy("ddim").config)
        model = GaussianMixtureModel.for_scheduler(mix, sched, 16)
        for n in (info.world, info.world + 1):
            runs = [Sampler(model, ev)(sched, x, steps=16, mode="adaptive", parallel=n, tolerance=1e-3,
                                       generator=torch.Generator().manual_seed(5))
                    for ev in (default_evaluator(model), LocalEvaluator(model))]
            a, ref = runs
            results.append(dict(scheduler=name, n=n, rank=info.rank, bitwise=bool(torch.equal(a.sample, ref.sample)),
                                trace=a.stats.trace, local_trace=ref.stats.trace,
                                serial_rounds=a.stats.serial_rounds, model_evals=a.stats.model_evals))
    if info.rank == 0:
        with open(path, "w") as f:
            json.dump(results, f)
    teardown(info)


if __name__ == "__main__":
    main(sys.argv[1])
