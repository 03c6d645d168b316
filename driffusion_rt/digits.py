"""The embedded default model: a small class-conditional UNet trained on scikit-learn's 8x8 digits (issue 6).

The weights ship inside the package (driffusion_rt/assets/digits/, diffusers save_pretrained layout, flat:
config.json + diffusion_pytorch_model.safetensors for the UNet, scheduler_config.json for the scheduler) and
load offline by path; the hub is never contacted. `driffusion_rt.train_digits` reproduces them from a seed.

    from driffusion_rt.digits import sample_digits, save_grid
    images, out = sample_digits("0123456789", steps=50, mode="aggressive", parallel=4)
    save_grid(images, "digits.png")

Conventions: latents are [B, 1, 8, 8] in [-1, 1] (the dataset's 0..16 ink values, rescaled; ink is +1); the
UNet predicts v; class labels are 0..9 and NULL_CLASS (10) is the unconditional class of classifier-free
guidance. `DigitsModel` is the runtime model: model(x_in, t, labels=[B] tensor) runs the unconditional and
the conditional branch as one UNet batch and combines them with the guidance scale.
"""
import functools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import schedulers as named
from .outputs import atomic_write
from .sampler import sample

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "digits"
NULL_CLASS = 10
NUM_CLASSES = 10
RESOLUTION = 8
DEFAULT_GUIDANCE = 1.25
SPLIT_SEED = 0          # the fixed train / held-out split shared by the diffusion model and the quality classifier
HELD_OUT_FRACTION = 0.3
# Every short name for noise-prediction models but dpm++2m-karras: Karras sigmas on this cosine schedule round
# to one timestep many times over and diffusers' own DPM-Solver step fails on them (an IndexError at any step count).
SCHEDULER_NAMES = tuple(n for n in named.VP if n != "dpm++2m-karras")


# ---------------------------------------------------------------------------------------------------- data

def digits_split(seed: int = SPLIT_SEED, held_out: float = HELD_OUT_FRACTION):
    """The fixed stratified split of sklearn's digits: (x_train, y_train, x_test, y_test).

    x are float32 [N, 1, 8, 8] in [-1, 1], y int64 [N]. The diffusion model is trained on the train part only;
    the quality classifier is trained on the same train part and its test part is never seen by either model.
    """
    from sklearn.datasets import load_digits  # optional (the test and perf extras): training and quality only
    from sklearn.model_selection import train_test_split  # optional, as above

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16).mul(2).sub(1).unsqueeze(1)  # 0..16 -> [-1, 1]
    y = torch.from_numpy(d.target).long()
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=held_out, random_state=seed, stratify=d.target)
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return x[tr], y[tr], x[te], y[te]


# ---------------------------------------------------------------------------------------------------- loading

def load_scheduler(name: str = "ddim", path=None):
    """A fresh scheduler of the shipped model's noise schedule: ddim (the saved config) or any other VP short name
    of driffusion_rt.schedulers (dpm++2m, unipc, euler-a, ...), built from the same config."""
    from diffusers import DDIMScheduler  # heavy: diffusers takes seconds to import
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler {name!r} is not one of {', '.join(SCHEDULER_NAMES)}")
    return named.build(name, DDIMScheduler.load_config(str(_path(path)), local_files_only=True))


def _path(path) -> Path:
    p = Path(path) if path is not None else ASSET_DIR
    if not (p / "config.json").is_file() or not (p / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"{p} does not hold a digits model (config.json, diffusion_pytorch_model.safetensors "
                                f"and scheduler_config.json); train one with `python -m driffusion_rt.train_digits`")
    return p


def load_digits_model(path=None, scheduler: str = "ddim", device="cpu", dtype=torch.float32):
    """(UNet2DModel in eval mode, scheduler) from `path` (default: the weights shipped in the package). Offline."""
    from diffusers import UNet2DModel  # heavy: diffusers takes seconds to import
    p = _path(path)
    unet = UNet2DModel.from_pretrained(str(p), local_files_only=True, use_safetensors=True, torch_dtype=dtype,
                                       low_cpu_mem_usage=False)
    unet = unet.to(device=device).eval().requires_grad_(False)
    return unet, load_scheduler(scheduler, p)


@functools.lru_cache(maxsize=4)
def _cached_unet(path: str):
    return load_digits_model(path)[0]


# ---------------------------------------------------------------------------------------------------- model

class DigitsModel:
    """The runtime model: model(x_in, t, labels=..., guidance_scale=None) -> v prediction shaped like x_in.

    labels: [N] int tensor of classes 0..9 (NULL_CLASS = unconditional), one per row of x_in; pass it in
    `model_kwargs` as a [B] tensor and the runtime tiles it for batched drafts. With guidance scale s > 0 and
    s != 1 the unconditional and conditional rows go through the UNet as one batch of 2N and the output is
    uncond + s * (cond - uncond); s = 1 is the conditional model alone, s = 0 the unconditional one. The scale may
    also be one value per row (a [N] tensor: requests with different scales batched into one call, batch.py); both
    branches then run for every row and each row takes its own combination.
    """

    row_scalars = True  # guidance_scale may come as one value per row

    def __init__(self, unet, guidance_scale: float = DEFAULT_GUIDANCE):
        self.unet = unet
        self.guidance_scale = float(guidance_scale)
        p = next(unet.parameters())
        self.device, self.dtype = p.device, p.dtype

    def guided(self, model_kwargs: dict) -> bool:
        """Whether calls with these kwargs run the uncond and cond branches as one doubled UNet call."""
        s = model_kwargs.get("guidance_scale")
        s = self.guidance_scale if s is None else float(s)
        return model_kwargs.get("labels") is not None and s not in (0.0, 1.0)

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, labels=None, guidance_scale=None, **_) -> torch.Tensor:
        if isinstance(guidance_scale, torch.Tensor) and guidance_scale.dim() == 1:
            return self._per_row(x_in, t, labels, guidance_scale)
        s = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        n = x_in.shape[0]
        if labels is None:
            labels = torch.full((n,), NULL_CLASS, dtype=torch.long, device=x_in.device)
            s = 1.0
        labels = torch.as_tensor(labels, device=x_in.device).long().reshape(-1)
        if labels.numel() == 1 and n != 1:
            labels = labels.expand(n)
        if labels.shape[0] != n:
            raise ValueError(f"labels has {labels.shape[0]} entries for a model batch of {n}")
        t = torch.as_tensor(t, device=x_in.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(n)
        x = x_in.to(self.dtype)
        with torch.no_grad():
            if s == 1.0:
                out = self.unet(x, t, class_labels=labels).sample
            elif s == 0.0:
                out = self.unet(x, t, class_labels=torch.full_like(labels, NULL_CLASS)).sample
            else:
                both = self.unet(torch.cat([x, x]), torch.cat([t, t]),
                                 class_labels=torch.cat([torch.full_like(labels, NULL_CLASS), labels])).sample
                uncond, cond = both.chunk(2)
                out = uncond + s * (cond - uncond)
        return out.to(x_in.dtype)

    def _per_row(self, x_in, t, labels, scales) -> torch.Tensor:
        """Guidance with one scale per row: both branches for every row; rows with scale 1 (0) take the conditional
        (unconditional) output itself, the others uncond + s * (cond - uncond) in the data's precision."""
        x = x_in.to(self.dtype)
        labels = torch.as_tensor(labels, device=x.device).long().reshape(-1)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        both = torch.cat([torch.full_like(labels, NULL_CLASS), labels])
        with torch.no_grad():
            uncond, cond = self.unet(torch.cat([x, x]), torch.cat([t, t]), class_labels=both).sample.chunk(2)
        s = scales.to(x.device).view(-1, *[1] * (x.dim() - 1))
        out = uncond + s.to(x.dtype) * (cond - uncond)
        out = torch.where(s == 1, cond, torch.where(s == 0, uncond, out))
        return out.to(x_in.dtype)


# ---------------------------------------------------------------------------------------------------- helpers

def parse_prompt(prompt) -> torch.Tensor:
    """Digit labels [B] from a prompt of digit characters ("0123456789"); whitespace and commas are ignored.

    Also accepts a sequence of ints 0..9 or a tensor. Raises ValueError naming any other character."""
    if isinstance(prompt, torch.Tensor):
        labels = prompt.long().reshape(-1)
    elif isinstance(prompt, str):
        chars = [c for c in prompt if not c.isspace() and c != ","]
        bad = sorted({c for c in chars if c not in "0123456789"})
        if bad:
            raise ValueError(f"prompt {prompt!r} has characters that are not digits 0-9: "
                             f"{', '.join(repr(c) for c in bad)}")
        labels = torch.tensor([int(c) for c in chars], dtype=torch.long)
    else:
        try:
            labels = torch.tensor([int(v) for v in prompt], dtype=torch.long)
        except (TypeError, ValueError):
            raise ValueError(f"labels must be a string of digits, ints 0-9 or a tensor, got {prompt!r}") from None
    if labels.numel() == 0:
        raise ValueError("the prompt names no digits (give e.g. '0123456789')")
    if ((labels < 0) | (labels >= NUM_CLASSES)).any():
        raise ValueError(f"digit labels must be in 0..9, got {labels.tolist()}")
    return labels


def to_images(latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, 1, H, W] (or [B, H, W]) in [-1, 1] -> uint8 images [B, H, W] in 0..255 (ink is bright)."""
    x = latents.detach().float().cpu()
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected one channel, got latents of shape {tuple(latents.shape)}")
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected latents [B, 1, H, W] or [B, H, W], got {tuple(latents.shape)}")
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid(images, ncol=None, scale: int = 4, pad: int = 1):
    """A uint8 [rows*(H*scale+pad)+pad, cols*(W*scale+pad)+pad] canvas of images [B, H, W] (nearest upscaling)."""
    imgs = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if imgs.ndim != 3 or imgs.dtype != np.uint8 or len(imgs) == 0:
        raise ValueError(f"images must be a non-empty uint8 [B, H, W] array, got {imgs.dtype} {imgs.shape}")
    if scale < 1 or pad < 0:
        raise ValueError(f"scale must be >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    b, h, w = imgs.shape
    ncol = min(b, 10) if ncol is None else max(1, min(int(ncol), b))
    nrow = -(-b // ncol)
    big = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    hs, ws = h * scale, w * scale
    canvas = np.full((nrow * (hs + pad) + pad, ncol * (ws + pad) + pad), 64, dtype=np.uint8)
    for k in range(b):
        r, c = divmod(k, ncol)
        y0, x0 = pad + r * (hs + pad), pad + c * (ws + pad)
        canvas[y0: y0 + hs, x0: x0 + ws] = big[k]
    return canvas


def save_grid(images, path, ncol=None, scale: int = 4, pad: int = 1) -> Path:
    """Write images [B, H, W] uint8 as ONE PNG grid, atomically (temp file in the same directory, then os.replace).

    ncol defaults to min(B, 10); each image is upscaled `scale` times (nearest) with `pad` pixel gaps."""
    canvas = Image.fromarray(grid(images, ncol, scale, pad), mode="L")
    return Path(atomic_write(path, lambda f: canvas.save(f, format="PNG")))


def sample_digits(labels, *, steps: int = 50, mode: str = "aggressive", parallel=None, seed: int = 0,
                  guidance_scale: float = DEFAULT_GUIDANCE, scheduler: str = "ddim", path=None, sampler=None,
                  **step_kwargs):
    """Sample digits of the given labels ("0123456789", ints or a [B] tensor) -> (uint8 images [B, 8, 8], SampleOutput).

    The model is loaded once per path and kept. Uses driffusion_rt.sample (so under torchrun every rank must call
    this; each gets the result), or `sampler` (a driffusion_rt.Sampler around a DigitsModel) when given.
    The initial noise is torch.randn(B, 1, 8, 8) from a generator seeded with `seed`.
    """
    labels = parse_prompt(labels)
    sched = load_scheduler(scheduler, path)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 1, RESOLUTION, RESOLUTION, generator=g)
    kw = dict(steps=steps, mode=mode, parallel=parallel, generator=g,
              model_kwargs={"labels": labels, "guidance_scale": guidance_scale}, **step_kwargs)
    if sampler is not None:
        out = sampler(sched, x, **kw)
    else:
        model = DigitsModel(_cached_unet(str(_path(path))), guidance_scale)
        out = sample(model, sched, x, **kw)
    return to_images(out.sample), out
