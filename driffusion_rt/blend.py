"""Inpainting's per-step mask blend, as an elementwise map the sampler applies to every state it produces.

diffusers' inpainting pipelines with a 4-channel denoiser blend after every step: x_{j} <- (1 - m) c_j + m x_j,
where m is the latent mask (1: repaint) and c_j the encoded image noised to the level of index j (add_noise at
timesteps[j]; the last state gets the image itself). The map is elementwise, which the runtime's scalar-weighted
rows cannot express, so the sampler applies it right after each combine that produces a state (drafts and refined
anchors, `Sampler.run(blend=...)`).

Exactness: with a binary mask every element either follows the scheduler's chain (m = 1) or is overwritten with
c_j (m = 0) at every state, so blending only the states a combine produces equals blending after every step, and
registers of multistep schedulers in the m = 0 region only ever feed values that are overwritten. The pipelines'
masks are binary (their mask processor binarizes, nearest-neighbour downsampling keeps it); a fractional mask
would make a refine chain differ from the blended steps, so it is refused.
"""
import torch

from .strength import add_noise, positioned


class MaskBlend:
    """x_j <- m x_j + (1 - m) c_j for the states of a run (trajectory index j = 1..S).

    mask: [B, 1 or C, ...] binary, broadcast over the latent; fills: [S, B, ...], fills[j - 1] = (1 - m) c_j."""

    def __init__(self, mask: torch.Tensor, fills: torch.Tensor):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("the inpainting mask must be binary (0 keeps the image, 1 repaints) in latent space: "
                             "a fractional mask cannot be applied per parallel round exactly")
        self.mask, self.fills = mask, fills

    @classmethod
    def for_schedule(cls, scheduler, steps: int, start: int, mask, init, noise, timesteps_kwargs=None):
        """The blend of diffusers' inpainting loop for the run timesteps[start:] of a `steps`-step schedule:
        c_j = add_noise(init, noise, timesteps[start + j]) with the scheduler positioned as the loop leaves it
        after j steps (schedulers that read their step index in add_noise), c_S = init."""
        sched = positioned(scheduler, steps, start, timesteps_kwargs)
        ts = sched.timesteps[start:]
        mask = mask.to(init.dtype)
        keep = 1 - mask
        fills = torch.empty(len(ts), *init.shape, dtype=init.dtype, device=init.device)
        for j in range(1, len(ts)):
            if hasattr(sched, "_step_index"):
                sched._step_index = start + j  # where step() leaves it after j steps from the begin index
            fills[j - 1] = keep * add_noise(sched, init, noise, ts[j: j + 1]).to(init.dtype)
        fills[len(ts) - 1] = keep * init
        return cls(mask, fills)

    def __call__(self, states: torch.Tensor, idx):
        """Blend states [k, B, ...] at trajectory indices idx in place."""
        for r, j in enumerate(idx):
            states[r].mul_(self.mask).add_(self.fills[j - 1])
        return states

    def to(self, device):
        return MaskBlend(self.mask.to(device), self.fills.to(device))
