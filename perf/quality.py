#!/usr/bin/env python
"""Sample-quality yardstick: sequential vs aggressive / conservative draft-and-refine (jump and extrapolated drafts),
Picard and ParaSolver, at n = 2, 4, 8.

(a) The shipped digits model (driffusion_rt.digits, DDIM): a digit classifier (a small torch MLP on the 8x8
    digits) is trained on the train part of the fixed split the diffusion model was trained on, and tested on
    the held-out part. Generated digits (equally many per class, label = the requested class) give the class
    accuracy, and a Frechet distance between the classifier's penultimate-layer features of generated digits
    and of the real held-out digits (the reference row is real training digits vs the held-out ones: the floor
    for this sample size). "rel. dev." is the mean of |x - x_seq| / |x_seq| against the sequential sample from
    the same noise.
(b) The analytic Gaussian-mixture model (driffusion_rt.gmm, 8 components in 4x8x8, exact optimal denoiser,
    DDIM): sliced Wasserstein-2 distance to fresh samples of the true mixture (reference row: two fresh true
    sample sets, the floor), the fraction of samples that land on the same mixture component as the sequential
    sample from the same noise, the spread (mean over samples of |x - mu_k|^2 / (s_k^2 D) for the component k a
    sample lands on: 1 for the true mixture, below 1 when a sampler under-disperses), and the relative deviation.
A second reference row runs the sequential sampler with --fine-factor times more steps (same noise): its deviation
from the S-step sequential sample is the scale of the scheduler's own discretization error, against which the
parallel modes' deviations can be read.

Every parallel run uses the local evaluator: all points of a round in one batched call. The distributed
evaluator gives the same results (the runtime's tests check that), so the numbers are those of n ranks.

    python perf/quality.py                 # the full table (about 6-7 minutes on one CPU core)
    python perf/quality.py --quick --out /tmp/q   # smoke run in seconds
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from driffusion_rt import GaussianMixture, GaussianMixtureModel, Sampler, make_plan
from driffusion_rt import digits as dg
from driffusion_rt.outputs import atomic_write

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="folder for quality.json and quality.md (default: perf/results next to this script)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 10 steps, 2 digits per class, 64 mixture samples")
    p.add_argument("--steps", type=int, default=None, help="sampling steps S (default 50; 10 with --quick)")
    p.add_argument("--parallel", type=int, nargs="+", default=None, metavar="N",
                   help="values of n for the parallel modes (default 2 4 8)")
    p.add_argument("--per-class", type=int, default=None,
                   help="generated digits per class (default 50, i.e. 500 digits; 2 with --quick)")
    p.add_argument("--gmm-samples", type=int, default=None,
                   help="Gaussian-mixture samples per configuration (default 2000; 64 with --quick)")
    p.add_argument("--fine-factor", type=int, default=4,
                   help="the reference sequential run uses this many times --steps (default 4; 0 skips it)")
    p.add_argument("--classifier-epochs", type=int, default=150,
                   help="training epochs of the digit classifier (default 150)")
    p.add_argument("--guidance", type=float, default=dg.DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale of the digits model (default {dg.DEFAULT_GUIDANCE})")
    p.add_argument("--model", type=Path, default=None,
                   help="digits model folder (default: the weights shipped in driffusion_rt/assets/digits)")
    p.add_argument("--batch", type=int, default=500,
                   help="digits per sampler call; larger batches are faster, smaller use less memory (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of noises, classifier init and projections (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--tolerance", type=float, default=0.05, help="tolerance of the picard / parasolver rows")
    p.add_argument("--schedulers", nargs="*", default=["dpm++2m", "unipc"],
                   help="further schedulers (short names) with sequential, aggressive and conservative rows "
                        "(default dpm++2m unipc; the main rows use DDIM)")
    p.add_argument("--skip-digits", action="store_true", help="only the Gaussian-mixture part")
    p.add_argument("--skip-gmm", action="store_true", help="only the digits part")
    args = p.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (10 if q else 50)
    args.parallel = args.parallel or [2, 4, 8]
    args.per_class = args.per_class or (2 if q else 50)
    args.gmm_samples = args.gmm_samples or (64 if q else 2000)
    if args.fine_factor < 0:
        p.error("--fine-factor must be >= 0")
    for name in ("steps", "per_class", "gmm_samples", "batch", "threads", "classifier_epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(n < 1 for n in args.parallel):
        p.error("--parallel values must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------ measures

class DigitClassifier(nn.Module):
    """MLP on flattened 8x8 digits in [-1, 1]; `features` is the 64-d penultimate layer used for the FD."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def train_classifier(x, y, seed=0, epochs=150, batch=64) -> DigitClassifier:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-3)
    clf.train()
    with torch.enable_grad():
        _fit(clf, opt, x, y, g, epochs, batch)
    return clf.eval().requires_grad_(False)


def _fit(clf, opt, x, y, g, epochs, batch):
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for k in range(0, len(x), batch):
            idx = perm[k: k + batch]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 8, 8] images (what a user sees) -> classifier input [B, 1, 8, 8] in [-1, 1]."""
    return images.float().div(127.5).sub(1).unsqueeze(1)


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64 with symmetric eigendecompositions."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = torch.cov(f1.T), torch.cov(f2.T)

    def sqrtm_psd(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    r1 = sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r1 @ s2 @ r1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections=512, seed=0) -> float:
    """Sliced Wasserstein-2 distance between equal-size sample sets [N, ...] (random unit directions, seeded)."""
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    if len(a) != len(b):
        raise ValueError(f"sliced_wasserstein needs equal sample counts, got {len(a)} and {len(b)}")
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    d /= d.norm(dim=0, keepdim=True)
    pa, pb = (a @ d).sort(0).values, (b @ d).sort(0).values
    return float((pa - pb).pow(2).mean().sqrt())


def rel_dev(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over samples of |x - ref| / |ref| (L2 over each sample)."""
    x, ref = x.reshape(len(x), -1).double(), ref.reshape(len(ref), -1).double()
    return float(((x - ref).norm(dim=1) / ref.norm(dim=1)).mean())


def spread(mixture: GaussianMixture, x: torch.Tensor, comp: torch.Tensor) -> float:
    """Mean over samples of |x - mu_k|^2 / (s_k^2 D), k = the sample's component: 1 in expectation for true samples."""
    flat = x.reshape(len(x), -1).to(mixture.means)
    return float(((flat - mixture.means[comp]).pow(2).sum(1) / (mixture.stds[comp] ** 2 * flat.shape[1])).mean())


# ------------------------------------------------------------------------------------------------ runs

def digits_part(args, configs, log=print) -> dict:
    x_tr, y_tr, x_te, y_te = dg.digits_split()
    clf = train_classifier(x_tr, y_tr, seed=args.seed, epochs=args.classifier_epochs)
    test_acc = float((clf(x_te).argmax(1) == y_te).double().mean())
    log(f"digit classifier (MLP 64-256-64-10): trained on {len(x_tr)} digits, test accuracy {test_acc:.4f} "
        f"on {len(x_te)} held-out digits")
    real_feat = clf.features(x_te)
    g = torch.Generator().manual_seed(args.seed)
    ref_idx = torch.randperm(len(x_tr), generator=g)[: len(x_te)]
    floor = frechet_distance(clf.features(x_tr[ref_idx]), real_feat)

    unet, _ = dg.load_digits_model(args.model)
    model = dg.DigitsModel(unet, args.guidance)
    sampler = Sampler(model)
    labels = torch.arange(10).repeat(args.per_class)
    noise = torch.randn(len(labels), 1, dg.RESOLUTION, dg.RESOLUTION, generator=g)
    out, seqs = {}, {}
    for cfg in configs + fine_config(args):
        mode, n, steps, opts = cfg
        opts = dict(opts)
        name = opts.pop("scheduler", "ddim")
        sched = dg.load_scheduler(name, args.model)
        t0, finals, rounds = time.perf_counter(), [], 0
        for k in range(0, len(labels), args.batch):
            o = sampler(sched, noise[k: k + args.batch], steps=steps, mode=mode, parallel=n,
                        generator=torch.Generator().manual_seed(args.seed),
                        model_kwargs={"labels": labels[k: k + args.batch]}, **opts)
            finals.append(o.sample)
            rounds = max(rounds, o.stats.serial_rounds)
        lat = torch.cat(finals)
        seq = seqs.setdefault(name, lat)  # each scheduler's first row is its sequential sample
        images = dg.to_images(lat)
        inp = images_to_input(images)
        acc = float((clf(inp).argmax(1) == labels).double().mean())
        fd = frechet_distance(clf.features(inp), real_feat)
        r = {"class_acc": acc, "fd": fd, "rel_dev": rel_dev(lat, seq), "wall_s": time.perf_counter() - t0,
             "serial_rounds": rounds}
        out[cfg] = r
        log(f"digits {label(cfg):>28} n={n} S={steps}: class acc {acc:.4f}  FD {fd:.3f}  rel dev {r['rel_dev']:.4f}  "
            f"rounds {rounds}  ({r['wall_s']:.1f} s)")
    return {"rows": out, "classifier_test_acc": test_acc, "fd_floor": floor, "n_generated": len(labels),
            "n_held_out": len(x_te), "guidance": args.guidance}


def gmm_scheduler(name: str = "ddim"):
    """Stable Diffusion's DDIM configuration (scaled-linear betas, leading spacing), as for the runtime's toy models,
    or another scheduler by short name built from it."""
    from diffusers import DDIMScheduler

    from driffusion_rt import schedulers
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)
    return ddim if name == "ddim" else schedulers.build(name, ddim.config)


def gmm_part(args, configs, log=print) -> dict:
    mixture = GaussianMixture.random(8, shape=(4, 8, 8), seed=0)
    n = args.gmm_samples
    g = torch.Generator().manual_seed(args.seed + 1)
    noise = torch.randn(n, *mixture.shape, generator=g, dtype=torch.float64)
    true_a, _ = mixture.sample(n, generator=torch.Generator().manual_seed(args.seed + 2))
    true_b, comp_b = mixture.sample(n, generator=torch.Generator().manual_seed(args.seed + 3))
    floor = sliced_wasserstein(true_a, true_b, seed=args.seed)
    true_spread = spread(mixture, true_b, comp_b)
    out, seqs, samplers = {}, {}, {}
    for cfg in configs + fine_config(args):
        mode, p, steps, opts = cfg
        opts = dict(opts)
        name = opts.pop("scheduler", "ddim")
        sched = gmm_scheduler(name)
        if (name, steps) not in samplers:  # the model is exact on one trajectory's timesteps
            samplers[name, steps] = Sampler(GaussianMixtureModel.for_scheduler(mixture, sched, steps))
        t0 = time.perf_counter()
        o = samplers[name, steps](sched, noise, steps=steps, mode=mode, parallel=p,
                                  generator=torch.Generator().manual_seed(args.seed), **opts)
        lat = o.sample
        comp = mixture.classify(lat)
        seq, seq_comp = seqs.setdefault(name, (lat, comp))  # each scheduler's first row is its sequential sample
        r = {"sw": sliced_wasserstein(lat, true_a, seed=args.seed),
             "same_comp": float((comp == seq_comp).double().mean()),
             "spread": spread(mixture, lat, comp),
             "rel_dev": rel_dev(lat, seq), "wall_s": time.perf_counter() - t0, "serial_rounds": o.stats.serial_rounds}
        out[cfg] = r
        log(f"gmm    {label(cfg):>28} n={p} S={steps}: SW {r['sw']:.4f}  same comp {r['same_comp']:.4f}  "
            f"spread {r['spread']:.4f}  rel dev {r['rel_dev']:.4f}  rounds {r['serial_rounds']}  ({r['wall_s']:.1f} s)")
    return {"rows": out, "sw_floor": floor, "true_spread": true_spread, "n_samples": n}


# ------------------------------------------------------------------------------------------------ report

def _f(v, fmt):
    return "-" if v is None else format(v, fmt)


def _row_line(label, n, rounds, speedup, d, m) -> str:
    return (f"| {label} | {n} | {rounds} | {speedup} | {_f(d.get('class_acc'), '.3f')} | {_f(d.get('fd'), '.3f')} "
            f"| {_f(d.get('rel_dev'), '.4f')} | {_f(m.get('sw'), '.4f')} | {_f(m.get('same_comp'), '.3f')} "
            f"| {_f(m.get('spread'), '.3f')} | {_f(m.get('rel_dev'), '.4f')} |")


def build(args, configs, dig, gmm) -> tuple:
    rows = []
    for cfg in configs:
        mode, n, steps, opts = cfg
        d = dig["rows"][cfg] if dig else {}
        m = gmm["rows"][cfg] if gmm else {}
        # a static plan's rounds are fixed; the iterative modes' depend on the data (the digits run is reported)
        rounds = make_plan(mode, steps, n).serial_rounds if mode not in ("picard", "parasolver") else \
            (d or m)["serial_rounds"]
        rows.append({"mode": label(cfg), "n": n, "steps": steps, "options": dict(opts), "serial_rounds": rounds,
                     "ideal_speedup": round(steps / rounds, 4),
                     **{f"digits_{k}": v for k, v in d.items()}, **{f"gmm_{k}": v for k, v in m.items()}})
    head = ("| mode | n | serial rounds | ideal speedup | digits class acc | digits FD | digits rel. dev. "
            "| GMM sliced W2 | GMM same component | GMM spread | GMM rel. dev. |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    if dig or gmm:
        real_d = {"class_acc": dig["classifier_test_acc"], "fd": dig["fd_floor"]} if dig else {}
        real_m = {"sw": gmm["sw_floor"], "spread": gmm["true_spread"]} if gmm else {}
        lines.append(_row_line("reference: real data", "-", "-", "-", real_d, real_m))
    fine = ("sequential", 1, args.steps * args.fine_factor, ())
    fine_d, fine_m = (dig or {}).get("rows", {}).get(fine, {}), (gmm or {}).get("rows", {}).get(fine, {})
    if fine_d or fine_m:
        lines.append(_row_line(f"reference: sequential, {fine[2]} steps", 1, fine[2], "-", fine_d, fine_m))
    for r in rows:
        d = {k[7:]: v for k, v in r.items() if k.startswith("digits_")}
        m = {k[4:]: v for k, v in r.items() if k.startswith("gmm_")}
        lines.append(_row_line(r["mode"], r["n"], r["serial_rounds"], f"{r['ideal_speedup']:.2f}x", d, m))
    notes = [f"S = {args.steps} DDIM steps (eta 0), local evaluator (all points of a round in one batched call; "
             f"the distributed evaluator gives the same samples), seed {args.seed}. rel. dev. = mean |x - x_seq| / "
             f"|x_seq| against the {args.steps}-step sequential sample from the same noise (of the same scheduler).",
             "Rows prefixed with a scheduler name use that scheduler (driffusion_rt.schedulers short names, built from "
             "the same noise schedule) with the paper's jump drafts generalised as the scheduler's own chain.",
             "+extrapolate: drafts from extrapolated model outputs (drafts='extrapolate'); the other draft-and-refine "
             "rows use the paper's jumps. picard and parasolver iterate to the tolerance shown with window p = n "
             "(parasolver: N = S/2 subintervals, M = 2 preconditioning); their serial rounds depend on the data: the "
             "digits run's are shown (ideal speedup = S / serial rounds)."]
    if fine_d or fine_m:
        notes.append(f"The second reference row is the sequential sampler at {fine[2]} steps: its rel. dev. is the "
                     f"size of the {args.steps}-step scheduler's own discretization error.")
    if dig:
        notes.append(f"Digits: the shipped model, guidance scale {dig['guidance']:g}, {dig['n_generated']} generated "
                     f"digits ({args.per_class} per class) vs {dig['n_held_out']} real held-out digits. The "
                     f"classifier's test accuracy on the held-out digits is {dig['classifier_test_acc']:.3f} (reference row); the "
                     f"reference FD is real training digits vs the held-out ones (the floor at this sample size).")
    if gmm:
        notes.append(f"Gaussian mixture: 8 components in 4x8x8, exact denoiser, Stable Diffusion's DDIM schedule, "
                     f"{gmm['n_samples']} samples per row; the reference sliced W2 is between two fresh sets of true "
                     f"samples (the floor at this sample size); spread is 1 for the true mixture.")
    md = "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    refs = {"digits_fine": fine_d or None, "gmm_fine": fine_m or None}
    meta = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, **refs,
            "digits": {k: v for k, v in (dig or {}).items() if k != "rows"} or None,
            "gmm": {k: v for k, v in (gmm or {}).items() if k != "rows"} or None,
            "rows": rows, "notes": notes, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return meta, md


def write_atomic(path: Path, text: str):
    atomic_write(path, lambda f: f.write(text.encode()))


def label(cfg) -> str:
    mode, _, _, opts = cfg
    o = dict(opts)
    prefix = f"{o['scheduler']}: " if "scheduler" in o else ""
    if o.get("drafts") == "extrapolate":
        return f"{prefix}{mode} +extrapolate"
    return prefix + (f"{mode} (tol {o['tolerance']:g})" if "tolerance" in o else mode)


def fine_config(args) -> list:
    return [("sequential", 1, args.steps * args.fine_factor, ())] if args.fine_factor else []


def make_configs(args) -> list:
    """(mode, n, steps, options as a tuple of pairs) for every row of the table."""
    S, tol = args.steps, args.tolerance
    cfgs = [("sequential", 1, S, ())]
    for drafts in ("jump", "extrapolate"):
        cfgs += [(m, n, S, (("drafts", drafts),)) for m in ("aggressive", "conservative") for n in args.parallel]
    cfgs += [("picard", n, S, (("tolerance", tol), ("window", n))) for n in args.parallel]
    cfgs += [("parasolver", n, S, (("preconditioning", 2), ("subintervals", S // 2), ("tolerance", tol),
                                   ("window", n))) for n in args.parallel]
    for name in args.schedulers:  # multistep schedulers: their own sequential row first, then the parallel modes
        cfgs += [("sequential", 1, S, (("scheduler", name),))]
        cfgs += [(m, n, S, (("scheduler", name),)) for m in ("aggressive", "conservative") for n in args.parallel]
    return cfgs


def run(args, log=print) -> tuple:
    torch.set_num_threads(args.threads)
    configs = make_configs(args)
    t0 = time.perf_counter()
    with torch.no_grad():
        dig = None if args.skip_digits else digits_part(args, configs, log)
        gmm = None if args.skip_gmm else gmm_part(args, configs, log)
    meta, md = build(args, configs, dig, gmm)
    meta["wall_time_s"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "quality.json", json.dumps(meta, indent=1) + "\n")
    write_atomic(args.out / "quality.md", md)
    log("")
    log(md)
    log(f"wrote {args.out / 'quality.json'} and {args.out / 'quality.md'} ({meta['wall_time_s']:.0f} s)")
    return meta, md


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
