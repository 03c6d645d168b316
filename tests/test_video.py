"""Text-to-video (and Wan image-to-video) through the runtime with tiny random-weight pipelines, saved and loaded.

Parity: mode="sequential" equals the plain diffusers pipeline call (same seed and scheduler, guidance on, float32).
Parallel modes: aggressive / conservative at n = 2 give finite videos of the requested frames and size. Wan 2.2:
the expert switch happens at the same timestep as in diffusers, also for the rows of one batched draft call.
Errors: frame counts, sizes and options are checked before any work, with one line naming the value.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import tiny_video as tv
from driffusion_rt import Sampler, make_plan
from driffusion_rt.pipelines import (DRiffusionPipeline, DRiffusionVideoPipeline, check_frames, make_scheduler,
                                     model_adapter, prepare_video, run, text_to_image, text_to_video)

PROMPTS = ["a photo of a red cat", "a blue house"]
SEQ = {"max_sequence_length": tv.T5_MAX_LEN}
STEPS = 6
FAMILY = {"wan21": "wan", "wan22": "wan", "wan22-5b": "wan", "wan21-i2v": "wan", "wan22-5b-i2v": "wan",
          "wan22-i2v": "wan", "hunyuan15": "hunyuan-video-1.5", "ltx": "ltx"}


def rel_err(a, b) -> float:
    a, b = (v.double() if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v), dtype=torch.float64)
            for v in (a, b))
    return ((a - b).abs().max() / b.abs().max()).item()


def image(color=(200, 30, 30)):
    return Image.new("RGB", (32, 32), color)


def seq_opts(kind) -> dict:
    """Options every request of this kind carries: a short T5 sequence; the image for image-to-video."""
    opts = {} if kind == "hunyuan15" else dict(SEQ)
    if kind.endswith("i2v"):
        opts["image"] = image()
    return opts


@pytest.fixture(scope="session")
def video_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_video")
    return {kind: tv.build(kind, str(root / kind)) for kind in tv.BUILDERS}


@pytest.fixture(scope="session")
def vpipes(video_dirs):
    return {kind: tv.load(path) for kind, path in video_dirs.items()}


def plain_call(pipe, scheduler, **kw):
    """The reference: the diffusers pipeline's own __call__ with `scheduler` swapped in."""
    own = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        return pipe(**kw)
    finally:
        pipe.scheduler = own


# (id, kind, options of both calls, scheduler name or None = the pipeline's own, guidance scale (None: the
# pipeline's; HunyuanVideo 1.5's guider says 6), an override that must change the result)
PARITY = [
    ("wan21-own-unipc-neg", "wan21", dict(negative_prompt="blurry"), None, 4.0, dict(negative_prompt="a red car")),
    ("wan21-flow", "wan21", {}, "flow", 4.0, dict(guidance_scale=2.0)),
    ("wan21-flow-dpm++2m", "wan21", {}, "flow-dpm++2m", 4.0, None),
    ("wan22-two-experts", "wan22", dict(guidance_scale_2=2.0), None, 4.0, dict(guidance_scale_2=3.0)),
    ("wan22-5b-expand", "wan22-5b", {}, None, 4.0, dict(guidance_scale=2.0)),
    ("wan21-i2v", "wan21-i2v", {}, None, 4.0, dict(image=image((10, 200, 30)))),
    ("wan22-5b-i2v", "wan22-5b-i2v", {}, None, 4.0, dict(image=image((10, 200, 30)))),
    ("wan22-i2v-two-experts", "wan22-i2v", dict(guidance_scale_2=2.5), None, 4.0, dict(guidance_scale_2=1.5)),
    ("hunyuan15-own-guider", "hunyuan15", dict(negative_prompt="ugly"), None, None, dict(guidance_scale=2.0)),
    ("hunyuan15-flow-unipc", "hunyuan15", {}, "flow-unipc", None, None),
    ("ltx-own-rescale", "ltx", dict(negative_prompt="ugly", guidance_rescale=0.6), None, 4.0,
     dict(guidance_rescale=0.0)),
    ("ltx-flow-unipc", "ltx", {}, "flow-unipc", 4.0, None),
]


@pytest.mark.parametrize("case,kind,opts,sched,scale,alt", PARITY, ids=[c[0] for c in PARITY])
def test_sequential_latents_equal_the_diffusers_pipeline(vpipes, case, kind, opts, sched, scale, alt):
    pipe = vpipes[kind]
    opts = {**seq_opts(kind), **opts}
    if opts.get("negative_prompt"):
        opts["negative_prompt"] = [opts["negative_prompt"], "a photo of a dog"]
    prompts = PROMPTS[:1] if kind.endswith("i2v") else PROMPTS  # the pipelines repeat image embeds per prompt
    common = dict(height=32, width=32, num_frames=9, output_type="latent")
    g = {} if scale is None else {"guidance_scale": scale}

    def ours(**over):
        o = {**opts, **g, **over}
        return text_to_video(pipe, prompts, steps=STEPS, seed=11, scheduler=sched, mode="sequential", **common, **o)

    lat, stats = ours()
    ref = plain_call(pipe, make_scheduler(pipe, sched), prompt=prompts, num_inference_steps=STEPS,
                     generator=torch.Generator().manual_seed(11), **common, **opts, **g).frames
    assert lat.shape == ref.shape and lat.shape[0] == len(prompts)
    err = rel_err(lat, ref)
    print(f"\n[video parity] {case}: max rel err {err:.2e} ({type(make_scheduler(pipe, sched)).__name__})")
    assert err <= 1e-5, case
    assert stats.serial_rounds == stats.model_evals == STEPS and stats.decode is None  # latent: no decode
    if alt is not None:
        other, _ = ours(**alt)
        assert rel_err(other, ref) > 1e-4, alt


@pytest.mark.parametrize("kind,sched", [("wan21", None), ("wan22", None), ("hunyuan15", None), ("ltx", None),
                                        ("wan22-5b-i2v", None), ("hunyuan15", "flow-dpm++2m"),
                                        ("ltx", "flow-dpm++2m")])
def test_parallel_modes_give_finite_videos_of_the_requested_frames_and_size(vpipes, kind, sched):
    pipe = vpipes[kind]
    width = 64 if FAMILY[kind] in ("ltx",) or kind.startswith("wan22-5b") else 48
    req = prepare_video(pipe, PROMPTS[0], steps=STEPS, guidance_scale=4.0, height=32, width=width, num_frames=13,
                        num_videos=2, seed=5, scheduler=sched, **seq_opts(kind))
    seq = run(pipe, req, mode="sequential").sample
    for mode in ("aggressive", "conservative"):
        frames, stats = text_to_video(pipe, PROMPTS[0], steps=STEPS, guidance_scale=4.0, height=32, width=width,
                                      num_frames=13, num_videos=2, seed=5, scheduler=sched, mode=mode, parallel=2,
                                      **seq_opts(kind))
        plan = make_plan(mode, req.trajectory.steps, 2)
        assert stats.serial_rounds == plan.serial_rounds < STEPS and stats.model_evals == plan.model_evals
        assert 2 in stats.batch_widths  # two drafts (x 2 videos, x 2 for guidance) in one denoiser call
        assert frames.shape == (2, 13, 32, width, 3) and np.isfinite(frames).all()
        assert 0.0 <= frames.min() and frames.max() <= 1.0
        d = stats.decode
        assert d.seconds > 0 and d.slicing and d.tiling and d.measure == "cpu-rss" and d.peak_bytes >= 0
        lat = run(pipe, req, mode=mode, parallel=2).sample
        print(f"\n[video parallel] {kind} {sched or 'own'} {mode}: rel distance to sequential {rel_err(lat, seq):.3f}")
        assert torch.isfinite(lat).all() and rel_err(lat, seq) < 0.1


class Recorder:
    """Forward pre-hooks on Wan 2.2's two experts: (model call number, expert, timesteps of its rows)."""

    def __init__(self, pipe):
        self.calls, self.seen = 0, []
        self.handles = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
                        for name, m in (("transformer", pipe.transformer), ("transformer_2", pipe.transformer_2))]

    def _hook(self, name):
        def hook(module, args, kwargs):
            self.seen.append((self.calls, name, kwargs["timestep"].tolist()))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


class Counting:
    """The Wan adapter with a call counter, so the recorder can tell rows of one runtime call apart."""

    def __init__(self, adapter, recorder):
        self.adapter, self.recorder, self.cuda_graphs = adapter, recorder, False

    def __call__(self, x, t, **kw):
        self.recorder.calls += 1
        return self.adapter(x, t, **kw)


def test_wan22_switches_expert_at_the_same_timestep_as_diffusers_also_within_one_draft_call(vpipes):
    pipe = vpipes["wan22"]
    boundary = tv.WAN22_BOUNDARY * pipe.scheduler.config.num_train_timesteps
    common = dict(height=32, width=32, num_frames=9, guidance_scale=4.0, guidance_scale_2=2.0, **SEQ)
    rec = Recorder(pipe)
    try:
        pipe(prompt=PROMPTS[0], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
             output_type="latent", **common)
        theirs = [(name, ts[0]) for _, name, ts in rec.seen]  # diffusers: one timestep per step (cond, uncond)
        rec.seen.clear()
        text_to_video(pipe, PROMPTS[0], steps=STEPS, seed=0, mode="sequential", output_type="latent", **common)
        ours = [(name, ts[0]) for _, name, ts in rec.seen]
        assert sorted(set(ours)) == sorted(set(theirs))  # the same expert for every timestep
        assert {n for n, _ in theirs} == {"transformer", "transformer_2"}  # the run crosses the boundary
        print(f"\n[wan2.2] boundary {boundary:g}; diffusers: {sorted(set(theirs), key=lambda p: -p[1])}")

        # aggressive n = 3: one runtime call holds drafts on both sides of the boundary
        rec.seen.clear()
        sampler = Sampler(Counting(model_adapter(pipe), rec))
        text_to_video(pipe, PROMPTS[0], steps=STEPS, seed=0, mode="aggressive", parallel=3, output_type="latent",
                      sampler=sampler, **common)
        by_call = {}
        for call, name, ts in rec.seen:
            assert all((t >= boundary) == (name == "transformer") for t in ts), (name, ts, boundary)
            by_call.setdefault(call, set()).add(name)
        straddling = [c for c, names in by_call.items() if len(names) == 2]
        assert straddling, by_call
        expert_of = dict(set(theirs))
        for _, name, ts in rec.seen:  # every row, draft or not, went to the expert diffusers uses at its timestep
            assert all(expert_of.get(t, name) == name for t in ts)
    finally:
        rec.close()


def test_wan22_adapter_on_rows_straddling_the_boundary_equals_each_row_alone(vpipes):
    pipe = vpipes["wan22"]
    req = prepare_video(pipe, PROMPTS, steps=STEPS, guidance_scale=4.0, guidance_scale_2=1.5, height=32, width=32,
                        num_frames=9, seed=2, **SEQ)
    adapter, kw = model_adapter(pipe), req.model_kwargs
    t = torch.tensor([999, 500, 900, 100])  # rows 0 and 2 high-noise, 1 and 3 low-noise
    x = torch.randn(4, *req.latents.shape[1:], generator=torch.Generator().manual_seed(0))
    rows = {k: (v.repeat(2, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    both = adapter(x, t, **rows)
    for r in range(4):
        alone = adapter(x[r: r + 1], t[r: r + 1], **{k: (v[r: r + 1] if isinstance(v, torch.Tensor) else v)
                                                     for k, v in rows.items()})
        assert rel_err(both[r: r + 1], alone) <= 1e-5
    gs2 = adapter(x[1:2], t[1:2], **{**{k: (v[1:2] if isinstance(v, torch.Tensor) else v) for k, v in rows.items()},
                                     "guidance_scale_2": 3.0})
    assert rel_err(gs2, both[1:2]) > 1e-4  # low-noise rows use guidance_scale_2


def test_the_wrapper_returns_the_pipelines_output_class(vpipes):
    pipe = vpipes["wan21"]
    wrapped = DRiffusionPipeline(pipe, mode="sequential")
    assert isinstance(wrapped, DRiffusionVideoPipeline) and isinstance(wrapped, DRiffusionPipeline)
    kw = dict(prompt=PROMPTS[0], num_inference_steps=4, guidance_scale=4.0, height=32, width=48, num_frames=5,
              max_sequence_length=tv.T5_MAX_LEN)
    out = wrapped(generator=torch.Generator().manual_seed(3), **kw)
    ref = pipe(generator=torch.Generator().manual_seed(3), **kw)
    assert type(out) is type(ref) and out.frames.shape == ref.frames.shape == (1, 5, 32, 48, 3)
    err = rel_err(out.frames, ref.frames)
    print(f"\n[video wrapper parity] wan np frames: max rel err {err:.2e}")
    assert err <= 1e-5
    assert wrapped.last_stats.serial_rounds == 4 and wrapped.last_stats.decode.measure == "cpu-rss"
    assert wrapped.vae is pipe.vae
    tup = DRiffusionPipeline(pipe, mode="aggressive", parallel=2)(generator=torch.Generator().manual_seed(3),
                                                                 return_dict=False, output_type="pt", **kw)
    assert isinstance(tup, tuple) and tup[0].shape == (1, 5, 3, 32, 48)
    ltx = DRiffusionPipeline(vpipes["ltx"], mode="conservative", parallel=2)(
        "a cat", num_inference_steps=4, height=32, width=32, num_frames=9, frame_rate=24, **SEQ)
    assert len(ltx.frames) == 1 and len(ltx.frames[0]) == 9 and ltx.frames[0][0].size == (32, 32)  # LTX: PIL


def test_decode_restores_the_vae_settings_and_tiling_can_be_turned_off(vpipes):
    pipe = vpipes["wan21"]
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing
    _, stats = text_to_video(pipe, PROMPTS[0], steps=2, height=32, width=32, num_frames=5, seed=0, vae_tiling=False,
                             **SEQ)
    assert not stats.decode.tiling and stats.decode.slicing
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing


PEAK = """
import json, torch
from driffusion_rt.pipelines.video import peak_memory
with peak_memory(torch.device("cpu")) as mem:
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
print(json.dumps(mem))
"""


def test_peak_memory_measures_what_a_block_allocates():
    """In a fresh process: in a long one the allocator may serve the block from memory the process already holds
    (freed by earlier work), which rightly adds nothing to its peak."""
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    mem = json.loads(r.stdout.strip().splitlines()[-1])
    assert mem["measure"] == "cpu-rss" and 48 * 2**20 <= mem["peak_bytes"] <= 256 * 2**20, mem


@pytest.mark.parametrize("kind,kw,message", [
    ("wan21", dict(num_frames=10), "num_frames=10 is not of the form 4k+1, which the wan pipeline needs (its VAE "
                                   "compresses time by 4 after the first frame); use e.g. 9 or 13"),
    ("wan21", dict(num_frames=0), "num_frames must be a positive integer number of frames, got 0"),
    ("ltx", dict(num_frames=8), "num_frames=8 is not of the form 4k+1"),
    ("hunyuan15", dict(num_frames=4), "num_frames=4 is not of the form 2k+1, which the hunyuan-video-1.5 pipeline"),
    ("wan21", dict(height=40), "height=40 is not a multiple of 16, which the wan pipeline needs"),
    ("wan22-5b", dict(width=48), "width=48 is not a multiple of 32, which the wan pipeline needs"),
    ("ltx", dict(width=48), "width=48 is not a multiple of 32, which the ltx pipeline needs"),
    ("wan21", dict(guidance_scale_2=2.0), "guidance_scale_2=2.0 applies to Wan 2.2 pipelines with two experts"),
    ("wan21", dict(image=image()), "image applies to WanImageToVideoPipeline; this is a WanPipeline"),
    ("wan21-i2v", dict(image=None), "image is required"),
    ("wan21", dict(clip_skip=2), "clip_skip=2 is not an option of the wan pipeline; it takes: max_sequence_length"),
    ("wan21", dict(true_cfg_scale=3.0), "true_cfg_scale=3.0 is not an option of the wan pipeline"),
    ("hunyuan15", dict(max_sequence_length=16), "max_sequence_length=16 is not an option of the hunyuan-video-1.5"),
    ("wan21", dict(frame_rate=24), "frame_rate=24 is not an option of the wan pipeline"),
    ("ltx", dict(frame_rate=0), "frame_rate must be a positive number of frames per second, got 0"),
])
def test_bad_video_input_fails_before_any_work(vpipes, kind, kw, message, monkeypatch):
    pipe = vpipes[kind]

    def no_work(*a, **k):
        raise AssertionError("the prompt was encoded before the input was checked")
    monkeypatch.setattr(pipe, "encode_prompt", no_work)
    opts = {**seq_opts(kind), "height": 32, "width": 64 if kind in ("ltx", "wan22-5b") else 32, "num_frames": 9,
            **kw}
    with pytest.raises(ValueError) as e:
        text_to_video(pipe, PROMPTS[0], steps=2, seed=0, **opts)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_image_and_video_entry_points_refuse_the_other_kind(vpipes, tmp_path):
    import tiny_pipelines as tp
    from driffusion_rt.pipelines import load_pipeline
    sd = load_pipeline(tp.build("sd15", str(tmp_path / "sd")))
    with pytest.raises(ValueError, match=r"the sd pipeline \(StableDiffusionPipeline\) makes images, not videos: "
                                         r"use text_to_image; video pipelines: wan \(WanPipeline, "):
        text_to_video(sd, "a cat", num_frames=9)
    with pytest.raises(ValueError, match="the wan pipeline .WanPipeline. makes videos: use text_to_video"):
        text_to_image(vpipes["wan21"], "a cat")
    with pytest.raises(ValueError, match="makes images, not videos"):
        check_frames(sd, 9)
    with pytest.raises(ValueError, match="the pipeline's guider guides only the steps from start=0.2 to stop=1.0"):
        pipe = vpipes["hunyuan15"]
        own = pipe.guider
        pipe.guider = own.new(start=0.2)
        try:
            text_to_video(pipe, "a cat", height=16, width=16, num_frames=5, steps=2)
        finally:
            pipe.guider = own


def test_named_flow_schedulers_keep_wans_flow_shift(vpipes):
    """Wan ships UniPC with flow_shift=3; the named Euler flow scheduler built from it keeps that shift."""
    pipe = vpipes["wan21"]
    assert make_scheduler(pipe) is pipe.scheduler and pipe.scheduler.config.flow_shift == 3.0
    assert make_scheduler(pipe, "flow").config.shift == 3.0
    assert make_scheduler(pipe, "flow-dpm++2m").config.flow_shift == 3.0


@pytest.mark.slow
def test_two_gloo_ranks_equal_the_local_evaluator(video_dirs, tmp_path):
    """Per family: 2 ranks (gloo) give the latents of a local evaluator; only rank 0 decodes."""
    import json
    import os
    import subprocess
    import sys
    kinds = ["wan22", "hunyuan15", "ltx"]
    out = tmp_path / "video.json"
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "video_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, str(out),
           *[f"{k}={video_dirs[k]}" for k in kinds]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [row for rank in (0, 1) for row in json.loads((tmp_path / f"video.json.rank{rank}").read_text())]
    runs = [row for row in rows if row["mode"] != "wrapper"]
    assert len(runs) == len(kinds) * 2 * 2  # kinds x modes x ranks
    for row in runs:
        plan = make_plan(row["mode"], STEPS, 2)
        assert row["rel_err"] <= 1e-5 and row["serial_rounds"] == plan.serial_rounds, row
        print(f"\n[video 2 ranks] {row['kind']} {row['mode']} rank {row['rank']}: rel err {row['rel_err']:.1e}")
    for row in rows:
        if row["mode"] == "wrapper":
            assert (row["frames"] == [1, 9, 32, 64 if row["kind"] == "ltx" else 32, 3]) == (row["rank"] == 0), row
            assert (row["decode"] == "cpu-rss") == (row["rank"] == 0), row
