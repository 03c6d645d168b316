"""Multi-rank scenarios, launched by tests/test_distributed.py as `torchrun --nproc_per_node=N tests/dist_worker.py ...`.

    equal OUT.json   distributed == local sampler (Gaussian mixture and a tiny diffusers UNet), buffer reuse
    fault KIND RANK CALL -- GENERATE_ARGS   run the generate CLI with a model that fails on one rank at one call
                     (KIND raise, hang, exit, nan; slowload: rank RANK takes CALL seconds longer to load its model;
                     loadraise: rank RANK fails while loading)
    cli MARKER -- GENERATE_ARGS   run the generate CLI; a rank that loads a model creates the file MARKER
    threads OUT.json  the names of this process's threads while the group lives and after teardown
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler
from driffusion_rt import generate
from driffusion_rt.distributed import default_evaluator, maybe_init_dist, teardown
from driffusion_rt.evaluator import LocalEvaluator


def tiny_unet(device="cpu"):
    from diffusers import UNet2DModel
    torch.manual_seed(0)  # the same replica on every rank
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8).eval().to(device)
    return lambda x, t: unet(x, t).sample


class Recording:
    """Wraps an evaluator and records the storage of the buffers each round uses."""

    def __init__(self, ev):
        self.ev, self.ptrs = ev, []

    def __getattr__(self, name):
        return getattr(self.ev, name)

    def send_buffer(self, gathered):
        send = self.ev.send_buffer(gathered)
        self.ptrs.append((gathered.data_ptr(), send.data_ptr()))
        return send


def equal(path):
    info = maybe_init_dist(timeout_s=60)
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
    results = []
    mix = GaussianMixture.random(4, shape=(4, 8, 8), seed=0)
    with torch.no_grad():
        for model_name, sched in (("gmm", DDIMScheduler(clip_sample=False)), ("unet", EulerDiscreteScheduler())):
            model = tiny_unet(info.device) if model_name == "unet" else GaussianMixtureModel.for_scheduler(mix, sched, 12)
            ev = Recording(default_evaluator(model))
            dist_sampler, local_sampler = Sampler(model, ev), Sampler(model, LocalEvaluator(model))
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(info.device)
            for mode in ("aggressive", "conservative"):
                for n in (info.world, 2 * info.world):
                    ev.ptrs.clear()
                    a = dist_sampler(sched, x, steps=12, mode=mode, parallel=n)
                    first = dist_sampler.arenas.idle[(tuple(x.shape), x.dtype, x.device)][-1]
                    b = dist_sampler(sched, x, steps=12, mode=mode, parallel=n)  # a second request: same buffers
                    same = first is dist_sampler.arenas.idle[(tuple(x.shape), x.dtype, x.device)][-1]
                    ref = local_sampler(sched, x, steps=12, mode=mode, parallel=n).sample
                    results.append(dict(
                        model=model_name, mode=mode, n=n, rank=info.rank,
                        rel_err=((a.sample - ref).abs().max() / ref.abs().max()).item(),
                        bitwise=bool(torch.equal(a.sample, ref)), repeat_bitwise=bool(torch.equal(a.sample, b.sample)),
                        serial_rounds=a.stats.serial_rounds, model_evals=a.stats.model_evals,
                        buffer_ptrs=len(set(ev.ptrs)), rounds_with_drafts=len(ev.ptrs), same_buffers=same))
        # extrapolated drafts read a fourth input (o_prev) that every rank keeps for itself
        sched = DDIMScheduler(clip_sample=False)
        model = GaussianMixtureModel.for_scheduler(mix, sched, 12)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(info.device)
        for mode in ("aggressive", "conservative"):
            outs = [Sampler(model, ev)(sched, x, steps=12, mode=mode, parallel=2 * info.world, drafts="extrapolate")
                    for ev in (default_evaluator(model), LocalEvaluator(model))]
            a, ref = outs[0].sample, outs[1].sample
            results.append(dict(model="gmm", mode=f"{mode}-extrapolate", n=2 * info.world, rank=info.rank,
                                rel_err=((a - ref).abs().max() / ref.abs().max()).item(),
                                bitwise=bool(torch.equal(a, ref)), serial_rounds=outs[0].stats.serial_rounds,
                                local_serial_rounds=outs[1].stats.serial_rounds))
        # the iterative samplers through the same evaluator (Gaussian mixture, DDPM: stochastic steps too)
        sched = DDPMScheduler(clip_sample=False)
        model = GaussianMixtureModel.for_scheduler(mix, sched, 12)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(info.device)
        for mode, kw in (("picard", dict(window=info.world, tolerance=0.01)),
                         ("parasolver", dict(subintervals=6, preconditioning=1, window=2 * info.world, tolerance=0.01))):
            outs = [Sampler(model, ev)(sched, x, steps=12, mode=mode, generator=torch.Generator().manual_seed(2), **kw)
                    for ev in (default_evaluator(model), LocalEvaluator(model))]
            a, ref = outs[0].sample, outs[1].sample
            results.append(dict(model="gmm", mode=mode, n=kw["window"], rank=info.rank,
                                rel_err=((a - ref).abs().max() / ref.abs().max()).item(),
                                bitwise=bool(torch.equal(a, ref)), serial_rounds=outs[0].stats.serial_rounds,
                                local_serial_rounds=outs[1].stats.serial_rounds))
    gathered = [None] * info.world
    dist.all_gather_object(gathered, results)
    if info.rank == 0:
        with open(path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)
    teardown(info)


def stamp_fault():
    """Print when the injected fault happens (wall clock), so tests can time the job's end from it rather than
    from a start-up whose length depends on the machine's load."""
    print(f"FAULT_AT {time.time():.3f}", file=sys.stderr, flush=True)


def fault(kind, bad_rank, bad_call, argv):
    """generate.main(argv) with a model that raises / hangs / exits on rank `bad_rank` at its call `bad_call`."""
    load = generate.load_service
    rank = int(os.environ["RANK"])

    def faulty_load(*args, **kwargs):
        if kind == "slowload" and rank == bad_rank:
            time.sleep(bad_call)
        if kind == "loadraise" and rank == bad_rank:
            stamp_fault()
            raise RuntimeError("injected failure while loading")
        service = load(*args, **kwargs)
        model, calls = service.model, [0]

        def wrapped(x_in, t, **kw):
            calls[0] += 1
            if rank == bad_rank and calls[0] == bad_call:
                stamp_fault()
                if kind == "raise":
                    raise RuntimeError(f"injected failure at call {bad_call}")
                if kind == "hang":
                    time.sleep(3600)
                if kind == "exit":
                    os._exit(17)
            out = model(x_in, t, **kw)
            return out * float("nan") if kind == "nan" and rank == bad_rank and calls[0] >= bad_call else out
        service.model = wrapped
        return service

    generate.load_service = faulty_load
    return generate.main(argv)


def cli(marker, argv):
    """generate.main(argv), recording whether any rank got as far as loading a model."""
    load = generate.load_service

    def recorded(*args, **kwargs):
        open(marker, "a").close()
        return load(*args, **kwargs)
    generate.load_service = recorded
    return generate.main(argv)


def thread_names() -> list:
    """Names of this process's threads (Linux): gloo names its own (gloo_tcp_loop, pt_gloo_runloop)."""
    tasks = "/proc/self/task"
    return sorted(open(os.path.join(tasks, t, "comm")).read().strip() for t in os.listdir(tasks))


def threads(path):
    """Join the job, import diffusers (which imports torch.distributed.nn) with the group up, run the runtime's
    collectives while holding the DistInfo, tear down: no gloo thread may outlive the teardown."""
    from driffusion_rt.distributed import DistributedEvaluator
    info = maybe_init_dist(timeout_s=60)
    import diffusers  # noqa: F401
    from diffusers import DDIMScheduler  # noqa: F401
    ev = DistributedEvaluator(None, info)
    ev.broadcast(torch.ones(3))
    ev.gather(torch.zeros(2 * info.world, 3), torch.ones(2, 3))
    before = thread_names()
    rank = info.rank
    teardown(info)
    row = {"rank": rank, "before": before, "after": thread_names()}
    with open(f"{path}.{rank}.tmp", "w") as f:  # then renamed: rank 0 must never read a half-written file
        json.dump(row, f)
    os.replace(f"{path}.{rank}.tmp", f"{path}.{rank}")
    if rank == 0:  # the group is gone: wait for the other rank's file
        for _ in range(600):
            if all(os.path.exists(f"{path}.{r}") for r in range(info.world)):
                break
            time.sleep(0.1)
        rows = []
        for r in range(info.world):
            with open(f"{path}.{r}") as f:
                rows.append(json.load(f))
        with open(path, "w") as f:
            json.dump(rows, f)


def models(path, pipeline_dir):
    """The shipped digits model and a tiny SD pipeline on 2+ ranks: equal to the local evaluator, finite, sized."""
    info = maybe_init_dist(timeout_s=60)
    from driffusion_rt import digits, pipelines
    results = {}
    with torch.no_grad():
        unet, sched = digits.load_digits_model()
        model = digits.DigitsModel(unet)
        labels = digits.parse_prompt("0123")
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        kw = {"labels": labels, "guidance_scale": 2.0}
        a, ref = (Sampler(model, ev)(sched, x, steps=20, mode="aggressive", parallel=info.world, model_kwargs=kw).sample
                  for ev in (default_evaluator(model), LocalEvaluator(model)))
        results["digits"] = dict(shape=list(a.shape), finite=bool(torch.isfinite(a).all()),
                                 rel_err=((a - ref).abs().max() / ref.abs().max()).item())
        pipe = pipelines.load_pipeline(pipeline_dir)
        common = dict(steps=6, guidance_scale=4.0, negative_prompt="blurry", height=32, width=48, seed=3)
        for mode in ("aggressive", "conservative"):
            lat, st = pipelines.text_to_image(pipe, "a red cat", mode=mode, parallel=2, output_type="latent", **common)
            images, _ = pipelines.text_to_image(pipe, "a red cat", mode=mode, parallel=2, output_type="np", **common)
            local = pipelines.run(pipe, pipelines.prepare(pipe, "a red cat", **common), mode=mode, parallel=2,
                                  sampler=Sampler(pipelines.model_adapter(pipe), LocalEvaluator(None))).sample
            if info.rank == 0:
                results[f"sd-{mode}"] = dict(image_shape=list(images.shape), finite=bool(torch.isfinite(
                    torch.as_tensor(images)).all()), rel_err=((lat - local).abs().max() / local.abs().max()).item(),
                    serial_rounds=st.serial_rounds)
            else:
                results[f"sd-{mode}-rank{info.rank}"] = dict(images_none=images is None)
    gathered = [None] * info.world
    dist.all_gather_object(gathered, results)
    if info.rank == 0:
        with open(path, "w") as f:
            json.dump(gathered, f)
    teardown(info)


if __name__ == "__main__":
    if sys.argv[1] == "equal":
        equal(sys.argv[2])
    elif sys.argv[1] == "models":
        models(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "threads":
        threads(sys.argv[2])
    elif sys.argv[1] == "cli":
        sys.exit(cli(sys.argv[2], sys.argv[4:]))
    else:
        sys.exit(fault(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[6:]))
