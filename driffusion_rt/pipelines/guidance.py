"""Classifier-free guidance arithmetic as the diffusers pipelines compute it, for a float or a 0-d tensor scale (what
CUDA graphs pass, cuda_graphs.py), with the same rounding either way and no host sync."""
import torch


def scaled(scale, x: torch.Tensor) -> torch.Tensor:
    """scale * x for a float or a 0-d tensor scale (what CUDA graphs pass, cuda_graphs.py), with the same rounding:
    a Python float is applied in float32 to half / bfloat16 data, so is the tensor (no host sync either way)."""
    if not isinstance(scale, torch.Tensor):
        return scale * x
    op = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return (scale.to(op) * x.to(op)).to(x.dtype)


def cfg(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    """uncond + scale * (cond - uncond), as the diffusers pipelines compute it; scale a float or a 0-d tensor."""
    return uncond + scaled(scale, cond - uncond)


def guide(out: torch.Tensor, scale) -> tuple:
    """Classifier-free guidance of one batched [uncond; cond] output: (guided, cond)."""
    uncond, cond = out.chunk(2)
    return cfg(uncond, cond, scale), cond


def rescale(out: torch.Tensor, cond: torch.Tensor, factor) -> torch.Tensor:
    """diffusers' rescale_noise_cfg (guidance_rescale, Lin et al. 2023 section 3.4) for a float or 0-d tensor factor."""
    if not isinstance(factor, torch.Tensor):  # heavy import, once a request uses guidance_rescale
        # heavy: diffusers takes seconds to import
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
        return rescale_noise_cfg(out, cond, guidance_rescale=factor)
    dims = list(range(1, cond.ndim))
    rescaled = out * (cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
    return scaled(factor, rescaled) + scaled(1 - factor, out)
