#!/usr/bin/env python
"""GPU proof: run every GPU path of the runtime on ONE GPU and report one line per check (issue 14).

    python perf/gpu_proof.py --out /tmp/proof          # on a machine with a CUDA GPU (about 3-5 minutes, estimated)
    python perf/gpu_proof.py --cpu-dry-run --out /tmp/p  # the same flow on CPU with tiny sizes (under a minute)
    python perf/gpu_proof.py --out /tmp/proof --only sd15 --merge   # rerun a section, keep the others' checks

Each check prints `name: PASS|FAIL|INFO key=value ...` (INFO: a measurement or a target reported, not a test).
The run continues past a failing check and exits 1 if any check failed; a sticky CUDA error (the device unusable
after a section) stops it cleanly. --out gets gpu_<device>.md (the report) and gpu_<device>.json (a list of checks,
each {"name", "status", numbers...}), rewritten after every section so that a crash keeps what ran; commit them as
perf/results/gpu_<device>.md / .json. Sections (--only / --skip take their names):

  environment  GPU, SMs, memory, L2, driver, CUDA, torch / triton / diffusers / transformers versions
  kernels      compiled Triton combine vs a float64 reference (fp32 / fp16 / bf16, ragged sizes, in place, one
               case past 2^31 elements); fused vs unfused time and GB/s in and out of L2 against a measured copy
  pipelines    tiny SD / SDXL / SD3 / Flux pipelines (tests/tiny_pipelines.py) per dtype: CUDA graphs on == off,
               sequential == the diffusers pipeline call, a second request and a new guidance value capture nothing
  staging      pinned noise rows survive copies queued behind torch.cuda._sleep; DDPM aggressive n = 4 with a CPU
               generator equals the same run with synchronised draws
  models       the fixed-cost and Gaussian-mixture models with graphs on (equal to eager, the device sleep replays),
               the gmm service across requests of different schedulers, the shipped digits model
  sd15         an SD 1.5-size UNet (its real config, random fp16 weights, CFG, 512 x 512): model-call time at widths
               1 2 4 8 eager and graphed; latency of sequential and aggressive / conservative n = 2 4 on one device
               (local evaluator); speedup, ideal, efficiency, runtime overhead per round from CUDA events; peak and
               extra memory over sequential (allocator and NVML)
  nccl         a world-1 NCCL group: distributed evaluator == local bitwise, broadcast and all-gather into buffer
               slices, the runtime's barrier, destroy; two ranks on one GPU are refused on every rank: status 2
               at once, one message (torchrun; the dry run fakes one CUDA device)
  cli          `python -m driffusion_rt.generate` in one process allocates on the GPU
  nvml         NVML's device (matched by UUID) is the one torch uses, and sees torch's allocation
  scope        a latent on a GPU other than the current one (needs 2 GPUs; INFO with one)

Offline (the device machine has torch and triton but no diffusers, starlette or uvicorn; no network): on a machine
with network run `bash perf/gpu_wheels.sh` (wheels into perf/wheels/, git-ignored), carry perf/wheels/ to the GPU
machine, then there, from the repository root, `bash perf/gpu_device_check.sh --out DIR`: it installs them
(--no-index --no-deps), runs this proof and the GPU tests within 7 minutes. perf/README.md has more.
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, os.path.join(ROOT, "tests"), ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model here is built from a config
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

SECTIONS = ("environment", "kernels", "pipelines", "staging", "models", "sd15", "nccl", "cli", "nvml", "scope")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2, torch.float64: 1e-12}
# SD 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json); weights are random here
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, flip_sin_to_cos=True, freq_shift=0,
                 act_fn="silu", norm_eps=1e-5, downsample_padding=1, mid_block_scale_factor=1)
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=32,
                 attention_head_dim=4, block_out_channels=(32, 64), norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def parser():
    p = argparse.ArgumentParser(prog="python perf/gpu_proof.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "results"),
                   help="directory for gpu_<device>.md and .json (created; default perf/results, where they are "
                        "committed; the dry run's gpu_cpu_dry_run.* are git-ignored)")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run the same flow on CPU with tiny sizes (checks that need a GPU report INFO)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run these sections only")
    p.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="sections to leave out")
    p.add_argument("--merge", nargs="?", const="", default=None, metavar="REPORT_JSON",
                   help="keep the checks of the sections not run now from an earlier report: REPORT_JSON, or without "
                        "it the gpu_<device>.json already in --out (rerun a section with --only SECTION --merge and "
                        "the report keeps the others)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                   help="tiny-pipeline and kernel dtypes (default: all three on GPU, float32 on the dry run)")
    p.add_argument("--steps", type=int, default=6, help="steps of the tiny-pipeline and model checks (default 6)")
    p.add_argument("--sd-steps", type=int, default=None, help="SD 1.5 sampling steps (default 30; dry run 6)")
    p.add_argument("--sd-size", type=int, default=None, help="SD 1.5 image side in pixels (default 512; dry run 64)")
    p.add_argument("--widths", nargs="+", type=int, default=[1, 2, 4, 8],
                   help="SD 1.5 model-call widths (drafts per call) timed eager and graphed (default 1 2 4 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed requests per SD 1.5 mode (default 3; dry run 1)")
    p.add_argument("--big-elements", type=float, default=2.4e9,
                   help="arena elements of the past-2^31 kernel case (default 2.4e9: 4.8 GB in fp16)")
    p.add_argument("--timeout", type=float, default=240, help="seconds for each subprocess (CLI, torchrun)")
    return p


# ---------------------------------------------------------------------------------------------- reporting


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    if isinstance(v, str):
        return json.dumps(v) if (" " in v or not v) else v  # quoted when it has spaces: key=value stays parseable
    return json.dumps(v) if isinstance(v, dict) else str(v)


def section_of(name: str) -> str:
    """The section a check belongs to: its name up to the first dot ("proof" for the run's own records)."""
    return name.split(".", 1)[0]


class Proof:
    """Collects checks: record() prints one line and keeps a JSON-able dict; section() survives exceptions, the
    synchronize after a section included (a sticky CUDA error raises there too, and every later CUDA call fails:
    the section is recorded as failed, `broken` says why, and main() stops cleanly instead of losing the report)."""

    def __init__(self, args):
        self.args, self.checks = args, []
        self.dry = args.cpu_dry_run
        self.device = torch.device("cpu") if self.dry else torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.slug = device_slug(self)  # now: a broken CUDA context later must not stop the report being named
        self.dtypes = [DTYPES[d] for d in (args.dtypes or (["float32"] if self.dry else list(DTYPES)))]
        self.tmp = tempfile.mkdtemp(prefix="gpu_proof_")
        self.broken = None   # set when the device is unusable after a section (a sticky CUDA error)
        self.seconds = {}    # section -> seconds
        self.argv = list(sys.argv[1:])  # for the report's header; main() sets what it parsed

    def record(self, name, ok, **numbers):
        """ok: True PASS, False FAIL, None INFO."""
        status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        self.checks.append({"name": name, "status": status, **numbers})
        line = " ".join(f"{k}={_fmt(v)}" for k, v in numbers.items())
        print(f"{name}: {status} {line}".rstrip(), flush=True)
        return ok

    def settle(self):
        """Wait for the device's queued work and free the cache between sections (raises a sticky CUDA error)."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def section(self, name, fn):
        t0 = time.perf_counter()
        try:
            fn(self)
        except Exception as e:  # a broken section is a failed check; the proof goes on
            self.record(f"{name}.error", False, error=f"{type(e).__name__}: {e}"[:500],
                        where=traceback.format_exc().strip().splitlines()[-3][:200])
        try:
            self.settle()
        except Exception as e:  # the device is gone for this process: say so, keep every check so far
            self.broken = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            self.record(f"{name}.device_after_section", False, error=self.broken,
                        note="the device failed after this section (a sticky CUDA error): the proof stops here")
        self.seconds[name] = time.perf_counter() - t0
        print(f"-- {name}: {self.seconds[name]:.1f} s", flush=True)

    @property
    def failed(self):
        return [c for c in self.checks if c["status"] == "FAIL"]


def device_slug(proof) -> str:
    if proof.dry:
        return "cpu_dry_run"
    name = torch.cuda.get_device_name(proof.device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "gpu"


def _write_atomic(path, text):
    """Write a whole file or leave the old one: a kill mid-write must not leave half a report."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def earlier_checks(path, rerun) -> list:
    """--merge: the checks of the report `path` whose sections are not in `rerun` (nor the run's own proof.*
    records), in their order; [] when there is none (a first run); an error when it does not read."""
    if not os.path.exists(path):
        print(f"gpu_proof: no earlier report {path} to merge into: this run's checks only", flush=True)
        return []
    with open(path) as f:
        old = json.load(f)
    keep = [c for c in old if isinstance(c, dict) and "name" in c and section_of(c["name"]) not in rerun
            and section_of(c["name"]) != "proof"]
    return keep


def report_checks(proof, earlier=(), running=None, todo=()) -> list:
    """The checks a report holds: the earlier report's kept ones (--merge), this run's, then the run's own state:
    a section still running (the run was killed or crashed in it) or sections not run after the device broke."""
    order = {s: i for i, s in enumerate(SECTIONS)}
    checks = sorted([*earlier, *proof.checks], key=lambda c: order.get(section_of(c["name"]), len(order)))
    if running is not None:
        checks.append({"name": "proof.incomplete", "status": "FAIL", "section": running,
                       "note": f"the run stopped in section {running} (killed or crashed) before it finished; "
                               f"rerun it with --only {running} --merge"})
    if proof.broken is not None:
        left = [s for s in todo if s not in proof.seconds]
        checks.append({"name": "proof.stopped", "status": "FAIL", "reason": proof.broken, "not_run": left,
                       "note": "the device was unusable after a section; rerun the rest in a new process: --only "
                               + " ".join(left) + " --merge" if left else "the device was unusable after the last "
                               "section"})
    return checks


def write_reports(proof, out_dir, wall_s, earlier=(), running=None, todo=()) -> tuple:
    """Write gpu_<device>.json and .md; called after every section (and before each, naming it as running), so a
    run that crashes or is killed keeps every section it finished."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"gpu_{proof.slug}")
    checks = report_checks(proof, earlier, running, todo)
    _write_atomic(stem + ".json", json.dumps(checks, indent=1) + "\n")
    env = next((c for c in checks if c["name"] == "environment"), {})
    counts = {s: sum(c["status"] == s for c in checks) for s in ("PASS", "FAIL", "INFO")}
    state = f" **Incomplete: stopped in section {running}.**" if running is not None else (
        " **Stopped early: the device broke.**" if proof.broken is not None else "")
    lines = [f"# GPU proof: {env.get('gpu', 'CPU dry run' if proof.dry else proof.slug)}", "",
             f"`python perf/gpu_proof.py {' '.join(proof.argv)}` on {datetime.date.today().isoformat()}, "
             f"{wall_s:.0f} s: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['INFO']} INFO "
             f"(INFO: a measurement or target, not a test).{state}", ""]
    if proof.seconds:
        lines += ["Seconds per section (this run): " + ", ".join(f"{k} {v:.0f}" for k, v in proof.seconds.items())
                  + "." + (" Sections not rerun are kept from the earlier report (--merge)." if earlier else ""), ""]
    if proof.dry:
        lines += ["**CPU dry run**: tiny sizes, no GPU; checks that need one report INFO. Not GPU evidence.", ""]
    lines += ["| check | status | numbers |", "|---|---|---|"]
    for c in checks:
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in c.items() if k not in ("name", "status"))
        lines.append(f"| {c['name']} | {c['status']} | {nums.replace('|', '/')} |")
    sd = [c for c in checks if c["name"].startswith("sd15.latency.")]
    if sd:
        lines += ["", "## SD 1.5-size UNet on one device (local evaluator, CUDA graphs on)", "",
                  "| mode | n | latency ms | speedup | ideal | efficiency | serial rounds | overhead us/round "
                  "(events) | peak MB | extra MB (allocator) | extra MB (NVML) |", "|---" * 11 + "|"]
        for c in sd:
            lines.append("| {mode} | {n} | {ms} | {sp} | {ideal} | {eff} | {rounds} | {ovh} | {peak} | {extra} | "
                         "{nvml} |".format(
                             mode=c.get("mode"), n=c.get("n"), ms=_fmt(c.get("latency_ms")),
                             sp=_fmt(c.get("speedup")), ideal=_fmt(c.get("ideal")), eff=_fmt(c.get("efficiency")),
                             rounds=c.get("serial_rounds"), ovh=_fmt(c.get("overhead_us_per_round")),
                             peak=_fmt(c.get("peak_mb", "-")), extra=_fmt(c.get("extra_mb", "-")),
                             nvml=_fmt(c.get("extra_nvml_mb", "-"))))
    _write_atomic(stem + ".md", "\n".join(lines) + "\n")
    return stem + ".md", stem + ".json"


# ---------------------------------------------------------------------------------------------- helpers


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def sync(proof):
    if proof.cuda:
        torch.cuda.synchronize(proof.device)


def cuda_time_ms(proof, fn, warmup=2, iters=10) -> float:
    """Median ms of fn: CUDA events per call on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if proof.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ddim():
    from driffusion_rt.schedulers import toy
    return toy("ddim")


# ---------------------------------------------------------------------------------------------- environment


def environment(proof):
    import triton
    info = {"torch": torch.__version__, "python": platform.python_version(), "triton": triton.__version__,
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "unset")}
    for mod in ("diffusers", "transformers", "pynvml"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "present")
        except ImportError:
            info[mod] = "missing"
    if proof.cuda:
        prop = torch.cuda.get_device_properties(proof.device)
        info.update(gpu=prop.name, sms=prop.multi_processor_count, memory_gib=prop.total_memory / 2**30,
                    l2_mib=getattr(prop, "L2_cache_size", 0) / 2**20, capability=f"{prop.major}.{prop.minor}",
                    cuda=torch.version.cuda, visible=torch.cuda.device_count(),
                    CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", "unset"))
        try:
            import pynvml
            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception as e:
            info["driver"] = f"unknown ({type(e).__name__})"
    else:
        info.update(cpu=platform.processor() or platform.machine(), cores=os.cpu_count())
    proof.record("environment", None, **{k: (v.decode() if isinstance(v, bytes) else v) for k, v in info.items()})
    if proof.cuda and info["TRITON_INTERPRET"] == "1":
        proof.record("environment.triton_compiled", False, why="TRITON_INTERPRET=1: kernels would be interpreted")


# ---------------------------------------------------------------------------------------------- kernels


def kernels_section(proof):
    from driffusion_rt import kernels
    dev = proof.device
    backend = "triton" if proof.cuda else "auto"
    g = torch.Generator(device=dev).manual_seed(0)
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    for dtype in proof.dtypes:
        worst, cases = 0.0, 0
        for shape in [(3, 5, 7, 11), (2, 4, 97, 61), (1, 4, 64, 64), (1, 1, 1, 1)]:
            for s, k in [(2, 1), (2, 3), (5, 8), (4, 4)]:
                arena = torch.randn(s + k, *shape, device=dev, generator=g).to(dtype)
                coef = torch.randn(k, s, device=dev, generator=g)
                out, inp = torch.arange(s, s + k, device=dev), torch.arange(s, device=dev)
                ref = (coef.double() @ arena[:s].reshape(s, -1).double()).view(k, *shape)
                with kernels.backend(backend):
                    kernels.combine(arena, out, inp, coef)
                worst, cases = max(worst, rel_err(arena[s:], ref)), cases + 1
        # in place: outputs overwrite inputs (a refine writes the anchor block it read)
        arena = torch.randn(5, 3, 33, 17, device=dev, generator=g).to(dtype)
        coef = torch.randn(2, 3, device=dev, generator=g)
        ref = (coef.double() @ arena[:3].reshape(3, -1).double()).view(2, 3, 33, 17)
        with kernels.backend(backend):
            kernels.combine(arena, torch.tensor([0, 2], device=dev), torch.arange(3, device=dev), coef)
        inplace = max(rel_err(arena[0], ref[0]), rel_err(arena[2], ref[1]))
        name = str(dtype).replace("torch.", "")
        proof.record(f"kernels.{name}.vs_float64", max(worst, inplace) <= tol[dtype], cases=cases + 1,
                     max_rel_err=max(worst, inplace), tol=tol[dtype], inplace_rel_err=inplace, backend=backend)
    big_kernel_case(proof, backend)
    bandwidth(proof)


def big_kernel_case(proof, backend):
    """Row offsets past 2^31 elements (int64 addressing): write a row that crosses 2^31, then read it back."""
    from driffusion_rt import kernels
    total = int(proof.args.big_elements) if proof.cuda else 3 * 4096
    n = total // 3
    dev, dtype = proof.device, torch.float16 if proof.cuda else torch.float32
    try:
        arena = torch.empty(3, n, device=dev, dtype=dtype)
    except torch.OutOfMemoryError as e:
        proof.record("kernels.past_2^31", False, why=f"could not allocate {3 * n} elements: {e}"[:200])
        return
    arena[0].fill_(1.0)
    arena[1].fill_(3.0)
    g = torch.Generator(device=dev).manual_seed(1)
    m = min(65536, n // 4)
    tail = slice(n - m, n)
    arena[0, tail] = torch.randn(m, device=dev, generator=g).to(dtype)
    arena[1, tail] = torch.randn(m, device=dev, generator=g).to(dtype)
    cross = (2**31 - 2 * n) if 2 * n < 2**31 < 3 * n else n // 2  # index in row 2 at global element 2^31
    window = slice(max(cross - 1024, 0), min(cross + 1024, n))
    with kernels.backend(backend):
        kernels.combine(arena, torch.tensor([2], device=dev), torch.tensor([0, 1], device=dev),
                        torch.tensor([[0.5, 2.0]], device=dev))
        want_tail = (0.5 * arena[0, tail].float() + 2.0 * arena[1, tail].float()).to(dtype)
        ok_write = torch.equal(arena[2, tail], want_tail) and bool((arena[2, window] == 6.5).all())
        # read the row past 2^31 back into row 0
        kernels.combine(arena, torch.tensor([0], device=dev), torch.tensor([2], device=dev),
                        torch.tensor([[1.0]], device=dev))
    ok_read = torch.equal(arena[0, tail], arena[2, tail])
    proof.record("kernels.past_2^31", (ok_write and ok_read) if proof.cuda else None, elements=3 * n,
                 crosses_2_31=3 * n > 2**31, write_ok=ok_write, read_ok=ok_read,
                 **({} if proof.cuda else {"note": "CPU dry run: a small arena, the flow only"}))
    del arena


def bandwidth(proof):
    import bench_kernels as bk
    impls = ["fused", "fallback", "unfused"] if proof.cuda else ["fallback", "unfused"]
    sizes = [(2, 4, 64, 64), (256, 4, 128, 128)] if proof.cuda else [(1, 4, 8, 8), (2, 4, 16, 16)]
    dtype = torch.float16 if proof.cuda else torch.float32
    rows = bk.measure(sizes, [4], [4], dtype, proof.device, impls, warmup=3, repeats=20 if proof.cuda else 3,
                      launches=20)
    base = impls[0]
    for r in rows:
        where = ("in_l2" if r.get("in_l2") else "out_of_l2") if proof.cuda else "cpu"
        nums = dict(k_or_m=r["k_or_m"], MB=r["bytes"] / 1e6, copy_GBps=r["copy_GBps"])
        for i in impls:
            nums[f"{i}_us"] = r[f"{i}_ms"] * 1e3
            nums[f"{i}_GBps"] = r[f"{i}_GBps"]
            nums[f"{i}_pct_of_copy"] = r[f"{i}_copy_pct"]
        nums[f"{base}_speedup_vs_unfused"] = r[f"speedup_{base}_vs_unfused"]
        if proof.cuda and not r.get("in_l2"):
            nums["target"] = f">=70% of copy: {'met' if r['fused_copy_pct'] >= 70 else 'NOT met'}"
        proof.record(f"kernels.bandwidth.{r['op']}.{r['size']}.{where}", None, **nums)


# ---------------------------------------------------------------------------------------------- pipelines

TINY = {"sd15": dict(negative_prompt="blurry", guidance_scale=4.0),
        "sdxl": dict(negative_prompt="ugly", guidance_scale=4.0),
        "sd3": dict(negative_prompt="ugly", guidance_scale=4.0),
        "flux": dict(negative_prompt="ugly", true_cfg_scale=3.0)}
NEW_GUIDANCE = {"sd15": dict(guidance_scale=6.5), "sdxl": dict(guidance_scale=6.5), "sd3": dict(guidance_scale=6.5),
                "flux": dict(true_cfg_scale=4.5)}


def pipelines_section(proof):
    import tiny_pipelines as tp
    from driffusion_rt import Sampler, pipelines
    from driffusion_rt.evaluator import LocalEvaluator
    steps = proof.args.steps
    for kind in TINY:
        path = tp.build(kind, os.path.join(proof.tmp, kind))
        seq = {"max_sequence_length": tp.T5_MAX_LEN} if kind in ("sd3", "flux") else {}
        for dtype in proof.dtypes:
            name = f"pipelines.{kind}.{str(dtype).replace('torch.', '')}"
            pipe = pipelines.load_pipeline(path, dtype=dtype, device=proof.device)
            pipe.set_progress_bar_config(disable=True)
            tol = TOL[dtype]
            common = dict(height=32, width=32, steps=steps, **seq)

            def run(sampler, prompt="a red cat", seed=3, **over):
                req = pipelines.prepare(pipe, prompt, seed=seed, **{**common, **TINY[kind], **over})
                return pipelines.run(pipe, req, mode="aggressive", parallel=2, sampler=sampler).sample

            adapter = pipelines.model_adapter(pipe)
            on = Sampler(adapter, LocalEvaluator(adapter), cuda_graphs=True)
            off = Sampler(adapter, LocalEvaluator(adapter), cuda_graphs=False)
            a, b = run(on), run(off)
            err = rel_err(a, b)
            proof.record(f"{name}.graphs_on_eq_off", err <= tol, rel_err=err, bitwise=torch.equal(a, b),
                         captures=on._graphs.captures, tol=tol)
            captured = on._graphs.captures
            run(on, prompt="a blue house", seed=4)
            proof.record(f"{name}.second_request_captures_nothing", on._graphs.captures == captured,
                         captures_before=captured, captures_after=on._graphs.captures)
            c = run(on, **NEW_GUIDANCE[kind])
            d = run(off, **NEW_GUIDANCE[kind])
            err = rel_err(c, d)
            proof.record(f"{name}.new_guidance_captures_nothing", on._graphs.captures == captured and err <= tol
                         and not torch.equal(c, a), captures_after=on._graphs.captures, rel_err_vs_eager=err,
                         differs_from_old_guidance=not torch.equal(c, a), changed=NEW_GUIDANCE[kind])
            # sequential through the runtime (graphs on) == the diffusers pipeline's own call
            opts = {**TINY[kind]}
            if kind == "flux":
                opts["guidance_scale"] = 3.5
            lat, _ = pipelines.text_to_image(pipe, "a red cat", mode="sequential", output_type="latent", seed=5,
                                             **{**common, **opts})
            own = pipe.scheduler
            pipe.scheduler = pipelines.make_scheduler(pipe, None)
            try:
                kw = {k: v for k, v in {**common, **opts}.items() if k != "steps"}
                ref = pipe(prompt="a red cat", num_inference_steps=steps, output_type="latent",
                           generator=torch.Generator().manual_seed(5), **kw).images
            finally:
                pipe.scheduler = own
            err = rel_err(lat, ref)
            stol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-4)
            proof.record(f"{name}.sequential_eq_diffusers", err <= stol, rel_err=err, tol=stol)


# ---------------------------------------------------------------------------------------------- staging


def staging_section(proof):
    from driffusion_rt.noise import PinnedStage, draw_noise
    dev, shape, rounds = proof.device, (2, 4, 64, 64), 4
    if proof.cuda:
        from driffusion_rt.fixed_cost import cycles_per_second
        cycles = int(0.05 * cycles_per_second(dev))
        sleep = lambda: torch.cuda._sleep(cycles)  # noqa: E731  (the copies queue behind 50 ms of device work)
    else:
        sleep = lambda: None  # noqa: E731
    ref = torch.randn(rounds, 2, *shape, generator=torch.Generator().manual_seed(9))

    # control: one pageable-free pinned row reused without an event: the copies read what the host wrote last
    out = torch.zeros(rounds, 2, *shape, device=dev)
    host = torch.empty(shape, pin_memory=proof.cuda)
    gen = torch.Generator().manual_seed(9)
    for r in range(rounds):
        sleep()
        for s in range(2):
            torch.randn(shape, generator=gen, out=host)
            out[r, s].copy_(host, non_blocking=True)
    sync(proof)
    raced = not torch.equal(out.cpu(), ref)
    proof.record("staging.race_is_observable", raced if proof.cuda else None, corrupted=raced,
                 note="one pinned row, no event: proves the copies really queue behind the sleep")

    out = torch.zeros(rounds, 2, *shape, device=dev)
    stage = PinnedStage(2, shape, torch.float32) if proof.cuda else PinnedStage(2, shape, torch.float32,
                                                                                  event=_NoEvent)
    gen = torch.Generator().manual_seed(9)
    t0 = time.perf_counter()
    for r in range(rounds):
        sleep()
        rows = stage.take()
        for s in range(2):
            draw_noise(out[r, s], gen, None, rows[s])
        stage.queued()
    host_s = time.perf_counter() - t0
    sync(proof)
    ok = torch.equal(out.cpu(), ref)
    proof.record("staging.pinned_rows_survive_queued_copies", ok, rounds=rounds, host_ms=host_s * 1e3,
                 pinned=bool(stage.sets[0].is_pinned()))

    # DDPM (a draw per step), aggressive n = 4, CPU generator: equal to the same run with synchronised draws
    from diffusers import DDPMScheduler

    import driffusion_rt.run as run_module
    from driffusion_rt import Sampler
    from driffusion_rt.fixed_cost import FixedCostModel
    sched = DDPMScheduler(clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = FixedCostModel(0.002)
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(2)).to(dev)

    def sample():
        return Sampler(model)(sched, x, steps=12, mode="aggressive", parallel=4,
                              generator=torch.Generator().manual_seed(3)).sample

    fast = sample()
    real = run_module.draw_noise

    def synchronised(out, gen, dtype=None, host=None):
        y = real(out, gen, dtype, None)  # no staging row: a blocking draw
        sync(proof)
        return y
    run_module.draw_noise = synchronised
    try:
        slow = sample()
    finally:
        run_module.draw_noise = real
    proof.record("staging.ddpm_aggressive_n4_cpu_generator", torch.equal(fast, slow), bitwise=torch.equal(fast, slow),
                 rel_err=rel_err(fast, slow))


class _NoEvent:
    def record(self):
        pass

    def synchronize(self):
        pass


# ---------------------------------------------------------------------------------------------- models


def models_section(proof):
    from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler, services
    from driffusion_rt.options import SamplingOptions
    from driffusion_rt.requests import parse
    from driffusion_rt.fixed_cost import FixedCostModel
    dev, steps = proof.device, 10
    cost = 0.004
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dev)
    fixed = FixedCostModel(cost)
    outs, lat = [], []
    for graphs in (True, False):
        s = Sampler(fixed, cuda_graphs=graphs)
        s(ddim(), x, steps=steps, mode="aggressive", parallel=4)  # warm-up (captures)
        t0 = time.perf_counter()
        out = s(ddim(), x, steps=steps, mode="aggressive", parallel=4)
        sync(proof)
        lat.append(time.perf_counter() - t0)
        outs.append(out.sample)
        if graphs:
            captures, rounds = s._graphs.captures, out.stats.serial_rounds
    ideal = rounds * cost
    ok = torch.equal(outs[0], outs[1]) and lat[0] >= 0.9 * ideal and (captures > 0 or not proof.cuda)
    proof.record("models.fixed_cost_graphs", ok, bitwise=torch.equal(outs[0], outs[1]), captures=captures,
                 latency_ms_graphed=lat[0] * 1e3, latency_ms_eager=lat[1] * 1e3, ideal_ms=ideal * 1e3,
                 note="graphed latency >= 0.9 x serial rounds x cost: the (device) sleep replays")

    mix = GaussianMixture.random(4, shape=(4, 16, 16), seed=0)
    model = GaussianMixtureModel.for_scheduler(mix, ddim(), steps)
    res = []
    for graphs in (True, False):
        s = Sampler(model, cuda_graphs=graphs)
        res.append((s(ddim(), x, steps=steps, mode="aggressive", parallel=4).sample, s._graphs.captures))
    err = rel_err(res[0][0], res[1][0])
    proof.record("models.gmm_graphs", err <= 1e-5 and (res[0][1] > 0 or not proof.cuda), rel_err=err,
                 bitwise=torch.equal(res[0][0], res[1][0]), captures=res[0][1])

    # the gmm service: one model object for requests of different schedulers; a replayed graph must follow them
    service = services.load_service("gmm", dev)
    on, off = Sampler(service.model, cuda_graphs=True), Sampler(service.model, cuda_graphs=False)
    errs, caps = [], []
    for sched in ("ddim", "euler", "ddim", "flow"):
        got = []
        for sampler in (on, off):
            req = service.prepare(parse({"steps": 8, "scheduler": sched, "seed": 1}, service))
            got.append(sampler.apply(req, SamplingOptions("aggressive", 2)).sample)
        errs.append(rel_err(got[0], got[1]))
        caps.append(on._graphs.captures)
    proof.record("models.gmm_service_across_schedulers", max(errs) <= 1e-5 and caps[-1] == caps[0],
                 rel_errs=errs, captures=caps)

    # the shipped digits model (generate's default) with graphs on == off
    service = services.load_service("digits", dev)
    got = []
    for graphs in (True, False):
        req = service.prepare(parse({"steps": steps, "seed": 0, "prompt": "07"}, service))
        s = Sampler(service.model, cuda_graphs=graphs)
        got.append(s.apply(req, SamplingOptions("aggressive", 2)).sample)
        if graphs:
            captures = s._graphs.captures
    err = rel_err(got[0], got[1])
    proof.record("models.digits_graphs", err <= 1e-5 and (captures > 0 or not proof.cuda), rel_err=err,
                 bitwise=torch.equal(got[0], got[1]), captures=captures)


# ---------------------------------------------------------------------------------------------- sd15


def sd15_section(proof):
    from diffusers import UNet2DConditionModel

    from driffusion_rt import Sampler
    from driffusion_rt.cuda_graphs import GraphCache
    from driffusion_rt.evaluator import LocalEvaluator, ModelCall
    from driffusion_rt.pipelines.sd import UNetAdapter
    from driffusion_rt.trajectory import Trajectory
    from gpu_monitor import GpuMonitor
    a = proof.args
    dev = proof.device
    dtype = torch.float16 if proof.cuda else torch.float32
    cfg, seq = (SD15_UNET, 77) if proof.cuda else (TINY_UNET, 16)
    size = a.sd_size or (512 if proof.cuda else 64)
    steps = a.sd_steps or (30 if proof.cuda else 6)
    repeats = a.repeats or (3 if proof.cuda else 1)
    torch.manual_seed(0)
    with torch.device(dev):
        unet = UNet2DConditionModel(**cfg).eval()
    unet = unet.to(dtype)
    params = sum(p.numel() for p in unet.parameters())
    model = UNetAdapter(unet)
    g = torch.Generator().manual_seed(0)
    dim = cfg["cross_attention_dim"]
    kw = {"prompt_embeds": torch.randn(1, seq, dim, generator=g).to(dev, dtype),
          "negative_prompt_embeds": torch.randn(1, seq, dim, generator=g).to(dev, dtype), "guidance_scale": 7.5}
    x = torch.randn(1, 4, size // 8, size // 8, generator=g).to(dev, dtype)
    sched = ddim()
    traj = Trajectory.from_scheduler(sched, steps)
    proof.record("sd15.model", None, params_M=params / 1e6, dtype=str(dtype).replace("torch.", ""),
                 latent=list(x.shape), steps=steps, cfg=True, config="SD 1.5" if proof.cuda else "tiny (dry run)")

    # model-call time per width, eager and graphed
    with torch.no_grad():
        for w in a.widths:
            states = torch.randn(w, *x.shape, generator=g).to(dev, dtype)
            out = torch.empty_like(states)
            idx = tuple(i % steps for i in range(w))
            eager = ModelCall(model, traj, x, kw)
            graphed = ModelCall(model, traj, x, kw, GraphCache() if proof.cuda else None)  # CPU: no graphs
            t_e = cuda_time_ms(proof, lambda: eager(states, idx, out), iters=10 if proof.cuda else 2)
            t_g = cuda_time_ms(proof, lambda: graphed(states, idx, out), iters=10 if proof.cuda else 2)
            proof.record(f"sd15.call.width{w}", None, eager_ms=t_e, graphed_ms=t_g, eager_ms_per_draft=t_e / w,
                         graphed_ms_per_draft=t_g / w, graph_gain=t_e / t_g, unet_batch=2 * w)
    sync(proof)

    # latency on one device: sequential vs aggressive / conservative with the local evaluator, graphs on
    sampler = Sampler(model, LocalEvaluator(model), cuda_graphs=True)
    monitor = GpuMonitor(dev)
    seq_row = None
    for mode, n in [("sequential", 1), ("aggressive", 2), ("aggressive", 4), ("conservative", 2),
                    ("conservative", 4)]:
        run = lambda: sampler(sched, x, steps=steps, mode=mode, parallel=n, model_kwargs=kw)  # noqa: E731
        run()  # warm-up: buffers, captures
        monitor.reset_peak()
        times, outs = [], []
        with monitor:
            for _ in range(repeats):
                t0 = time.perf_counter()
                out = run()
                sync(proof)
                times.append(time.perf_counter() - t0)
                outs.append(out)
        st, rounds = outs[-1].stats, max(len(outs[-1].plan.rounds), 1)
        ph = {k: statistics.mean(o.stats.phases[k] for o in outs) for k in st.phases}
        lat = statistics.median(times)
        row = dict(mode=mode, n=n, latency_ms=lat * 1e3, serial_rounds=st.serial_rounds, model_evals=st.model_evals,
                   ideal=st.ideal_speedup,
                   overhead_us_per_round=(ph["draft"] + ph["comm"] + ph["refine"]) / rounds * 1e6,
                   wall_minus_model_us_per_serial_round=(statistics.mean(times) - ph["model"]) / st.serial_rounds * 1e6,
                   model_ms_per_serial_round=ph["model"] / st.serial_rounds * 1e3, rounds=rounds,
                   finite=bool(torch.isfinite(outs[-1].sample).all()))
        mem = monitor.summary()
        if "gpu_peak_allocated_mb" in mem:
            row["peak_mb"] = mem["gpu_peak_allocated_mb"]
        if "gpu_nvml_used_max_mb" in mem:
            row["nvml_used_mb"] = mem["gpu_nvml_used_max_mb"]
        if seq_row is None:
            seq_row = row
        row["speedup"] = seq_row["latency_ms"] / row["latency_ms"]
        row["efficiency"] = row["speedup"] / row["ideal"]
        if "peak_mb" in row:
            row["extra_mb"] = row["peak_mb"] - seq_row["peak_mb"]
        if "nvml_used_mb" in row and "nvml_used_mb" in seq_row:
            row["extra_nvml_mb"] = row["nvml_used_mb"] - seq_row["nvml_used_mb"]
        if mode == "aggressive" and n == 4:
            row["target"] = f">= 1.3x sequential: {'met' if row['speedup'] >= 1.3 else 'NOT met'}"
        proof.record(f"sd15.latency.{mode}.n{n}", None if row["finite"] else False, **row)
    if proof.cuda:
        ovh = [c["overhead_us_per_round"] for c in proof.checks if c["name"].startswith("sd15.latency.")]
        proof.record("sd15.overhead_target", None, max_us_per_round=max(ovh),
                     target=f"<= 100 us per round: {'met' if max(ovh) <= 100 else 'NOT met'}")


# ---------------------------------------------------------------------------------------------- nccl


def nccl_section(proof):
    import torch.distributed as dist

    from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler
    from driffusion_rt.distributed import DistInfo, DistributedEvaluator, all_gather_rows, barrier
    from driffusion_rt.evaluator import LocalEvaluator
    dev = proof.device
    backend = "nccl" if proof.cuda else "gloo"
    store = dist.FileStore(os.path.join(proof.tmp, "store"), 1)
    kw = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60), **kw)
    try:
        info = DistInfo(0, 1, 0, dev, backend)
        mix = GaussianMixture.random(4, shape=(4, 8, 8), seed=0)
        model = GaussianMixtureModel.for_scheduler(mix, ddim(), 12)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(dev)
        results = []
        for mode in ("aggressive", "conservative"):
            for n in (2, 4):
                a = Sampler(model, DistributedEvaluator(model, info))(ddim(), x, steps=12, mode=mode, parallel=n)
                b = Sampler(model, LocalEvaluator(model))(ddim(), x, steps=12, mode=mode, parallel=n)
                results.append(torch.equal(a.sample, b.sample))
        proof.record("nccl.world1_distributed_eq_local", all(results), backend=backend, cases=len(results),
                     bitwise=results)
        buf = torch.zeros(6, 3, device=dev)
        buf[1:3] = torch.arange(6.0, device=dev).view(2, 3)
        dist.broadcast(buf[1:3], 0)
        gathered = torch.zeros(6, 3, device=dev)
        all_gather_rows(gathered[2:4], buf[1:3])
        untouched = bool((gathered[:2] == 0).all()) and bool((gathered[4:] == 0).all())
        ok = torch.equal(gathered[2:4], buf[1:3]) and untouched
        barrier("the proof's barrier", info, datetime.timedelta(seconds=60))  # the runtime's (async + Work.wait)
        sync(proof)
        proof.record("nccl.broadcast_allgather_slices_barrier", ok, backend=backend)
    finally:
        dist.destroy_process_group()
    proof.record("nccl.destroy", not dist.is_initialized(), backend=backend)

    two_ranks_one_gpu(proof)


REFUSAL = "2 ranks on this node but only 1 CUDA device(s) visible"


def two_ranks_one_gpu(proof):
    """Two torchrun ranks on one GPU are refused on EVERY rank before NCCL starts: each exits with status 2 at once
    and rank 0 prints the one message. On a GPU the real generate CLI runs with one GPU visible; the CPU dry run
    runs it in processes faking one CUDA device (tests/one_gpu_worker.py), the same decision."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if proof.cuda:
        from gpu_monitor import torch_uuid
        env["CUDA_VISIBLE_DEVICES"] = "GPU-" + torch_uuid(proof.device)
        target = ["-m", "driffusion_rt.generate"]
    else:
        env["FAKE_CUDA_DEVICES"] = "1"
        target = [os.path.join(ROOT, "tests", "one_gpu_worker.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target,
           "--model", "gmm", "--steps", "4", "--out", os.path.join(proof.tmp, "two")]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=min(proof.args.timeout, 120), env=env,
                           cwd=ROOT)
        text, code = r.stdout + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:  # the defect this checks: a rank waiting for a peer that left
        text, code = ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace"), "timeout"
    seconds = time.perf_counter() - t0
    codes = re.findall(r"exitcode\s+: (-?\d+) ", text)  # torchrun's summary: the root cause comes last
    printed = text.count(REFUSAL)
    ok = (code not in (0, "timeout") and printed == 1 and bool(codes) and codes[-1] == "2"
          and set(codes) <= {"2", "-15"} and seconds < 90)
    line = next((ln.strip() for ln in text.splitlines() if REFUSAL in ln), "")
    nums = dict(exit=code, rank_exit_codes=codes, message_lines=printed, seconds=seconds,
                message=(line or text.strip()[-300:])[:300])
    if not proof.cuda:
        nums["note"] = "CPU dry run: processes faking one CUDA device"
    proof.record("nccl.two_ranks_one_gpu_refused", ok, **nums)


# ---------------------------------------------------------------------------------------------- cli

CLI_RUNNER = """
import runpy, sys, torch
sys.argv = ["driffusion_rt.generate"] + sys.argv[1:]
code = 0
try:
    runpy.run_module("driffusion_rt.generate", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print("PROOF_CUDA_BYTES", torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)
print("PROOF_EXIT", code)
"""


def cli_section(proof):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    help_text = subprocess.run([sys.executable, "-m", "driffusion_rt.generate", "--help"], capture_output=True,
                               text=True, timeout=proof.args.timeout, env=env, cwd=ROOT).stdout
    has_device = "--device" in help_text
    out_dir = os.path.join(proof.tmp, "cli")
    r = subprocess.run([sys.executable, "-c", CLI_RUNNER, "--model", "gmm", "--steps", "4", "--out", out_dir],
                       capture_output=True, text=True, timeout=proof.args.timeout, env=env, cwd=ROOT)
    vals = dict(ln.split(" ", 1) for ln in r.stdout.splitlines() if ln.startswith("PROOF_"))
    cuda_bytes, code = int(vals.get("PROOF_CUDA_BYTES", -1)), vals.get("PROOF_EXIT", "?")
    runs = [f for f in os.listdir(out_dir)] if os.path.isdir(out_dir) else []
    nums = dict(exit=code, cuda_allocated_mb=cuda_bytes / 2**20, has_device_flag=has_device, files=len(runs))
    if r.returncode != 0 or code not in ("0", "None"):
        nums["stderr"] = r.stderr.strip()[-300:]
    if proof.cuda:
        proof.record("cli.generate_one_process_uses_gpu", cuda_bytes > 0 and code in ("0", "None"), **nums)
    else:
        proof.record("cli.generate_one_process_uses_gpu", None if code in ("0", "None") else False,
                     note="CPU dry run: the CLI ran; no GPU to pick", **nums)


# ---------------------------------------------------------------------------------------------- nvml


def nvml_section(proof):
    if not proof.cuda:
        proof.record("nvml.device_is_torch_device", None, note="CPU dry run: no NVML device")
        return
    import pynvml

    from gpu_monitor import nvml_handle, torch_uuid
    uuid = torch_uuid(proof.device)
    pynvml.nvmlInit()
    try:
        handle = nvml_handle(pynvml, uuid)
        index = pynvml.nvmlDeviceGetIndex(handle)
        before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        block = torch.empty(1024 * 2**20, dtype=torch.uint8, device=proof.device).fill_(1)
        sync(proof)
        time.sleep(0.2)
        after = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        del block
        torch.cuda.empty_cache()
        seen_mb = (after - before) / 2**20
        proof.record("nvml.device_is_torch_device", seen_mb >= 900, uuid=uuid, torch_index=proof.device.index,
                     nvml_index=index, nvml_saw_mb_of_1024=seen_mb)
    finally:
        pynvml.nvmlShutdown()


# ---------------------------------------------------------------------------------------------- scope


def scope_section(proof):
    from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler
    if not proof.cuda or torch.cuda.device_count() < 2:
        proof.record("scope.latent_on_another_gpu", None,
                     note=f"needs 2 visible GPUs ({torch.cuda.device_count() if proof.cuda else 0} here)")
        return
    mix = GaussianMixture.random(4, shape=(4, 8, 8), seed=0)
    model = GaussianMixtureModel.for_scheduler(mix, ddim(), 8)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    outs = []
    for i in (0, 1):
        with torch.cuda.device(0):  # the current device stays 0; the latent lives on cuda:i
            outs.append(Sampler(model)(ddim(), x.to(f"cuda:{i}"), steps=8, mode="aggressive", parallel=2,
                                       generator=torch.Generator().manual_seed(2)).sample.cpu())
    proof.record("scope.latent_on_another_gpu", torch.equal(outs[0], outs[1]), bitwise=torch.equal(outs[0], outs[1]))


def quiet():
    """No progress bars or load-time advice from diffusers / transformers: one line per check."""
    import warnings
    warnings.filterwarnings("ignore")
    for mod in ("diffusers", "transformers"):
        try:
            logging = __import__(f"{mod}.utils.logging", fromlist=["logging"])
            logging.disable_progress_bar()
            logging.set_verbosity_error()
        except (ImportError, AttributeError):
            pass


RUN = {"environment": environment, "kernels": kernels_section, "pipelines": pipelines_section,
       "staging": staging_section, "models": models_section, "sd15": sd15_section, "nccl": nccl_section,
       "cli": cli_section, "nvml": nvml_section, "scope": scope_section}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    for name in ("steps", "timeout"):
        if getattr(args, name) <= 0:
            parser().error(f"--{name} must be > 0, got {getattr(args, name)}")
    if any(w < 1 for w in args.widths):
        parser().error(f"--widths must be >= 1, got {args.widths}")
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_proof: error: torch.cuda.is_available() is False (no GPU, or a CPU-only torch build); "
              "use --cpu-dry-run to check the flow on CPU", file=sys.stderr)
        return 2
    if args.cpu_dry_run:
        torch.set_num_threads(1)
    quiet()
    proof = Proof(args)
    proof.argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    todo = [s for s in (args.only or SECTIONS) if s not in args.skip]
    earlier = []
    if args.merge is not None:
        earlier = earlier_checks(args.merge or os.path.join(args.out, f"gpu_{proof.slug}.json"), todo)
    print(f"gpu_proof: {'CPU dry run' if proof.dry else torch.cuda.get_device_name(proof.device)}, sections "
          f"{' '.join(todo)}" + (f" (kept: {len(earlier)} checks of the earlier report)" if earlier else ""),
          flush=True)
    for name in todo:
        write_reports(proof, args.out, time.perf_counter() - t0, earlier, running=name, todo=todo)
        with torch.no_grad() if name != "nccl" else contextlib.nullcontext():
            proof.section(name, RUN[name])
        write_reports(proof, args.out, time.perf_counter() - t0, earlier, todo=todo)
        if proof.broken is not None:
            break
    md, js = write_reports(proof, args.out, time.perf_counter() - t0, earlier, todo=todo)
    checks = report_checks(proof, earlier, todo=todo)
    failed = [c for c in checks if c["status"] == "FAIL"]
    print(f"\ngpu_proof: {len(checks)} checks, {len(failed)} failed, {time.perf_counter() - t0:.0f} s; "
          f"wrote {md} and {js}")
    for c in failed:
        print(f"FAILED {c['name']}")
    if proof.broken is not None:
        print(f"gpu_proof: stopped after section {list(proof.seconds)[-1]}: {proof.broken}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
