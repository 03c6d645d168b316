"""Train the embedded digits model: a small class-conditional diffusers UNet2DModel on sklearn's 8x8 digits.

    python -m driffusion_rt.train_digits --out /tmp/digits --seed 0
    python -m driffusion_rt.train_digits --out driffusion_rt/assets/digits --seed 0     # refresh the shipped weights

Data: the train part of the fixed stratified split (driffusion_rt.digits.digits_split; the held-out part is
the quality classifier's test set and is never seen here), at the native 8x8 resolution, 1 channel, in [-1, 1].
Model: UNet2DModel (channels 32/64/64, attention at 2x2), 11 class embeddings (digits 0-9 + the null class 10,
which replaces the label with probability --p-uncond so classifier-free guidance works).
Diffusion: 1000 training steps, cosine ("squaredcos_cap_v2") betas, v-prediction; AdamW with warmup and cosine
decay; an exponential moving average of the weights is what gets saved. The saved scheduler config is a
DDIMScheduler (trailing spacing, clip_sample off) that samples well in 50 steps.
Output: --out holds config.json + diffusion_pytorch_model.safetensors (UNet), scheduler_config.json and
train_info.json (the flags, losses and wall time). Reproduces from --seed (bitwise for the same torch build,
thread count and CPU); the default run takes about 10-15 minutes on one CPU core.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .digits import NULL_CLASS, RESOLUTION, digits_split

UNET_CONFIG = dict(
    sample_size=RESOLUTION, in_channels=1, out_channels=1, num_class_embeds=NULL_CLASS + 1,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, attention_head_dim=32,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
    clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing",
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m driffusion_rt.train_digits", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created; existing model files replaced)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights init, batches, noise and label drops (default 0)")
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (default 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default 2e-3)")
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps, then cosine decay to 0 (default 200)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--ema", type=float, default=0.998, help="EMA decay of the saved weights (default 0.998)")
    p.add_argument("--p-uncond", type=float, default=0.15,
                   help="probability a label is replaced by the null class 10, for classifier-free guidance "
                        "(default 0.15)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1; the reference machine has 2 shared cores)")
    p.add_argument("--log-every", type=int, default=200, help="print the mean loss every N steps (default 200)")
    return p


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def train(args) -> dict:
    from diffusers import DDIMScheduler, UNet2DModel  # heavy: diffusers takes seconds to import

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x_train, y_train, _, _ = digits_split()
    n = len(x_train)
    unet = UNet2DModel(**UNET_CONFIG)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = DDIMScheduler(**SCHEDULER_CONFIG)
    ac = sched.alphas_cumprod.float()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    params = sum(p.numel() for p in unet.parameters())
    print(f"train_digits: {n} training digits at {RESOLUTION}x{RESOLUTION}, UNet {params / 1e6:.2f}M parameters, "
          f"{args.steps} steps of batch {args.batch_size}, {args.threads} thread(s), seed {args.seed}", flush=True)

    t0, losses, running, perm, pos = time.perf_counter(), [], 0.0, torch.randperm(n, generator=g), 0
    unet.train()
    for step in range(args.steps):
        if pos + args.batch_size > n:  # epoch-wise shuffling, dropping the ragged tail
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos: pos + args.batch_size]
        pos += args.batch_size
        x0, y = x_train[idx], y_train[idx].clone()
        y[torch.rand(len(y), generator=g) < args.p_uncond] = NULL_CLASS
        t = torch.randint(0, sched.config.num_train_timesteps, (len(y),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * eps
        v = a * eps - s * x0
        loss = F.mse_loss(unet(xt, t, class_labels=y).sample, v)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # warm-started EMA
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            k = (step % args.log_every) + 1
            losses.append((step + 1, running / k))
            el = time.perf_counter() - t0
            print(f"step {step + 1:6d}/{args.steps}  loss {running / k:.4f}  lr {lr_at(step, args):.2e}  "
                  f"{el:7.1f} s  (eta {el / (step + 1) * (args.steps - step - 1):6.1f} s)", flush=True)
            running = 0.0
    wall = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(str(args.out), safe_serialization=True)
    sched.save_pretrained(str(args.out))
    for f in args.out.iterdir():  # diffusers writes the weights through a 0600 temp file
        if f.is_file():
            f.chmod(0o644)
    info = {"seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "warmup": args.warmup, "weight_decay": args.weight_decay, "ema": args.ema, "p_uncond": args.p_uncond,
            "threads": args.threads, "parameters": params, "train_digits": n, "wall_time_s": round(wall, 1),
            "losses": [[s_, round(l_, 5)] for s_, l_ in losses], "torch": torch.__version__,
            "command": "python -m driffusion_rt.train_digits " + " ".join(sys.argv[1:])}
    (args.out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    size = os.path.getsize(args.out / "diffusion_pytorch_model.safetensors")
    print(f"train_digits: wall time {wall:.1f} s ({wall / 60:.1f} min); wrote {args.out} "
          f"(weights {size / 1e6:.2f} MB)", flush=True)
    return info


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.p_uncond < 1 or not 0 <= args.ema < 1:
        p.error("--p-uncond and --ema must be in [0, 1)")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
