"""Video pipelines on several ranks, launched by tests/test_video.py as
`torchrun --nproc_per_node=2 tests/video_worker.py OUT.json KIND=PATH ...` (tiny pipelines saved by the test).

For each pipeline and mode (aggressive, conservative; n = world): the distributed evaluator's final latents against
a local evaluator's on the same rank, and the wrapper's decode (frames on rank 0 only). Each rank writes
OUT.json.rank<r>.
"""
import json
import sys

import torch

import tiny_video as tv
from driffusion_rt import Sampler
from driffusion_rt.distributed import maybe_init_dist
from driffusion_rt.evaluator import LocalEvaluator
from driffusion_rt.pipelines import DRiffusionPipeline, model_adapter, prepare_video, run, video_sampler


def main(out_path, *kinds):
    info = maybe_init_dist(timeout_s=120)
    rows = []
    for spec in kinds:
        kind, path = spec.split("=", 1)
        pipe = tv.load(path)
        opts = dict(height=32, width=64 if kind == "ltx" else 32, num_frames=9, negative_prompt="blurry")
        if kind != "hunyuan15":
            opts.update(max_sequence_length=tv.T5_MAX_LEN, guidance_scale=4.0)
        if kind == "wan22":
            opts["guidance_scale_2"] = 2.0
        adapter = model_adapter(pipe)
        req = prepare_video(pipe, "a photo of a cat", steps=6, seed=4, **opts)
        for mode in ("aggressive", "conservative"):
            out = run(pipe, req, mode=mode, parallel=info.world, sampler=video_sampler(adapter))
            local = Sampler(adapter, LocalEvaluator(adapter), cuda_graphs=False)
            ref = run(pipe, req, mode=mode, parallel=info.world, sampler=local).sample
            rows.append(dict(kind=kind, mode=mode, rank=info.rank, n=info.world, shape=list(out.sample.shape),
                             rel_err=((out.sample - ref).abs().max() / ref.abs().max()).item(),
                             serial_rounds=out.stats.serial_rounds, model_evals=out.stats.model_evals))
        wrapped = DRiffusionPipeline(pipe, mode="aggressive")
        out = wrapped("a photo of a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                      output_type="np", **opts)
        frames = out.frames
        rows.append(dict(kind=kind, mode="wrapper", rank=info.rank,
                         frames=None if frames is None else list(frames.shape),
                         decode=None if wrapped.last_stats.decode is None else wrapped.last_stats.decode.measure))
    with open(f"{out_path}.rank{info.rank}", "w", encoding="utf-8") as f:
        json.dump(rows, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
