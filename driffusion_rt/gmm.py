"""An analytic Gaussian-mixture "model": the exact optimal denoiser, the yardstick for sampling quality.

Data x0 ~ sum_k pi_k N(mu_k, s_k^2 I). A noised point x = a x0 + s eps is a mixture of N(a mu_k, (a^2 s_k^2 + s^2) I),
so E[x0 | x] is a responsibility-weighted sum of per-component linear estimates, in closed form.
"""
import math
from dataclasses import dataclass

import torch

from .trajectory import Trajectory


@dataclass
class GaussianMixture:
    means: torch.Tensor    # [K, D]
    stds: torch.Tensor     # [K] isotropic standard deviation of each component
    weights: torch.Tensor  # [K] mixing weights, summing to 1
    shape: tuple           # the latent shape of one sample (prod(shape) == D)

    @classmethod
    def random(cls, components: int, shape=(4, 8, 8), seed: int = 0, spread: float = 1.0, std: float = 0.3,
               dtype=torch.float64) -> "GaussianMixture":
        """A reproducible mixture with well-separated means (|mu| ~ spread) and equal weights."""
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        means = torch.randn(components, d, generator=g, dtype=dtype) * spread
        stds = torch.full((components,), std, dtype=dtype) * (1 + 0.5 * torch.rand(components, generator=g, dtype=dtype))
        return cls(means, stds, torch.full((components,), 1 / components, dtype=dtype), tuple(shape))

    def sample(self, n: int, generator=None) -> tuple:
        """n samples of the true distribution and their component labels."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return (self.means[k] + self.stds[k, None] * z).view(n, *self.shape), k

    def _log_resp(self, x, a, s):
        """Unnormalised log responsibilities [N, K] of noised points x [N, D] with per-row levels a, s [N]."""
        mu, sd = self.means.to(x), self.stds.to(x)
        var = a[:, None] ** 2 * sd[None] ** 2 + s[:, None] ** 2                      # [N, K]
        dist2 = ((x[:, None] - a[:, None, None] * mu[None]) ** 2).sum(-1)            # [N, K]
        return torch.log(self.weights.to(x))[None] - 0.5 * x.shape[1] * torch.log(var) - dist2 / (2 * var), var

    def posterior_mean(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """E[x0 | a x0 + s eps = x] for rows x [N, D] with levels a, s [N]."""
        logw, var = self._log_resp(x, a, s)
        w = torch.softmax(logw, dim=1)                                               # [N, K]
        gain = a[:, None] * self.stds.to(x)[None] ** 2 / var                          # [N, K]
        mu = self.means.to(x)
        resid = x[:, None] - a[:, None, None] * mu[None]                              # [N, K, D]
        return (w[..., None] * (mu[None] + gain[..., None] * resid)).sum(1)

    def classify(self, x0: torch.Tensor) -> torch.Tensor:
        """The most likely component of clean samples x0 [N, ...] (for 'fraction assigned to the right component')."""
        x = x0.reshape(len(x0), -1).to(self.means)
        one = torch.ones(len(x), dtype=x.dtype)
        return self._log_resp(x, one, torch.zeros_like(one))[0].argmax(1)


class GaussianMixtureModel:
    """model(x_in, t) returning the exact optimal prediction (epsilon, v or flow velocity) of a trajectory's scheduler."""

    def __init__(self, mixture: GaussianMixture, traj: Trajectory):
        self.mixture, self.traj = mixture, traj
        self.index = {float(t): i for i, t in enumerate(traj.timesteps.tolist())}

    @classmethod
    def for_scheduler(cls, mixture, scheduler, steps: int, timesteps_kwargs=None, **step_kwargs):
        return cls(mixture, Trajectory.from_scheduler(scheduler, steps, timesteps_kwargs, **step_kwargs))

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
        try:
            idx = torch.tensor([self.index[float(v)] for v in t.reshape(-1).tolist()])
        except KeyError as e:
            raise ValueError(f"timestep {e.args[0]} is not on this model's trajectory") from None
        a = self.traj.in_alpha[idx].to(x_in)
        s = self.traj.in_sigma[idx].to(x_in)
        x = x_in.reshape(len(x_in), -1)
        x0 = self.mixture.posterior_mean(x, a, s)
        eps = (x - a[:, None] * x0) / s[:, None]
        if self.traj.prediction == "epsilon":
            out = eps
        elif self.traj.prediction == "v_prediction":
            out = a[:, None] * eps - s[:, None] * x0
        else:  # flow matching velocity d x / d sigma for x = (1 - sigma) x0 + sigma eps
            out = eps - x0
        return out.view_as(x_in)
