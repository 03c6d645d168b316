"""An analytic Gaussian-mixture "model": the exact optimal denoiser, the yardstick for sampling quality.

Data x0 ~ sum_k pi_k N(mu_k, s_k^2 I). A noised point x = a x0 + s eps is a mixture of N(a mu_k, (a^2 s_k^2 + s^2) I),
so E[x0 | x] is a responsibility-weighted sum of per-component linear estimates, in closed form.
"""
import math
from dataclasses import dataclass, field

import torch

from .evaluator import Shared
from .trajectory import Trajectory


@dataclass
class GaussianMixture:
    means: torch.Tensor    # [K, D]
    stds: torch.Tensor     # [K] isotropic standard deviation of each component
    weights: torch.Tensor  # [K] mixing weights, summing to 1
    shape: tuple           # the latent shape of one sample (prod(shape) == D)
    _copies: dict = field(default_factory=dict, repr=False, compare=False)  # (device, dtype) -> (means, stds, weights)

    def on(self, like: torch.Tensor) -> tuple:
        """(means, stds, weights) on like's device and dtype, copied once: no host-to-device copy per model call
        (which a CUDA graph could not capture)."""
        key = (like.device, like.dtype)
        if key not in self._copies:
            self._copies[key] = tuple(v.to(like) for v in (self.means, self.stds, self.weights))
        return self._copies[key]

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
        mu, sd, w = self.on(x)
        var = a[:, None] ** 2 * sd[None] ** 2 + s[:, None] ** 2                      # [N, K]
        dist2 = ((x[:, None] - a[:, None, None] * mu[None]) ** 2).sum(-1)            # [N, K]
        return torch.log(w)[None] - 0.5 * x.shape[1] * torch.log(var) - dist2 / (2 * var), var

    def posterior_mean(self, x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """E[x0 | a x0 + s eps = x] for rows x [N, D] with levels a, s [N]."""
        logw, var = self._log_resp(x, a, s)
        w = torch.softmax(logw, dim=1)                                               # [N, K]
        mu, sd, _ = self.on(x)
        gain = a[:, None] * sd[None] ** 2 / var                                       # [N, K]
        resid = x[:, None] - a[:, None, None] * mu[None]                              # [N, K, D]
        return (w[..., None] * (mu[None] + gain[..., None] * resid)).sum(1)

    def classify(self, x0: torch.Tensor) -> torch.Tensor:
        """The most likely component of clean samples x0 [N, ...] (for 'fraction assigned to the right component')."""
        x = x0.reshape(len(x0), -1).to(self.means)
        one = torch.ones(len(x), dtype=x.dtype)
        return self._log_resp(x, one, torch.zeros_like(one))[0].argmax(1)


class GaussianMixtureModel:
    """model(x_in, t) returning the exact optimal prediction (epsilon, v, x0 or flow velocity) of a trajectory's
    scheduler.

    Capturable in a CUDA graph: the timestep is looked up on the device in the trajectory's table (no .tolist(), no
    host indices). The table may also come per call as the `trajectory_table` kwarg (`table_kwargs`), so one model
    object, and one captured graph, serves requests of different schedulers (services.py). An unknown timestep gives
    NaN outputs on a GPU (the sampler reports them) and a ValueError on a CPU."""

    cuda_graphs = True

    def __init__(self, mixture: GaussianMixture, traj: Trajectory):
        self.mixture, self.traj = mixture, traj
        self.table = trajectory_table(traj)
        self._tables = {}  # device -> the table there

    @classmethod
    def for_scheduler(cls, mixture, scheduler, steps: int, timesteps_kwargs=None, **step_kwargs):
        return cls(mixture, Trajectory.from_scheduler(scheduler, steps, timesteps_kwargs, **step_kwargs))

    @staticmethod
    def table_kwargs(traj: Trajectory, device) -> dict:
        """model_kwargs that make the model follow `traj` whatever trajectory it was built for."""
        return {"trajectory_table": Shared(trajectory_table(traj).to(device))}

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, trajectory_table=None, **_) -> torch.Tensor:
        table = trajectory_table
        if table is None:
            if x_in.device not in self._tables:
                self._tables[x_in.device] = self.table.to(x_in.device)
            table = self._tables[x_in.device]
        eq = t.reshape(-1, 1).to(torch.float64) == table[None, :, 0]                # [N, S]
        if not x_in.is_cuda and not bool(eq.any(1).all()):
            bad = t.reshape(-1)[~eq.any(1)][0].item()
            raise ValueError(f"timestep {bad:g} is not on this model's trajectory")
        # the last matching index (as a dict from timestep to index would give); NaN levels where none matches
        idx = (eq * torch.arange(table.shape[0], device=table.device)).amax(1)
        row = torch.where(eq.any(1)[:, None], table[idx], torch.full_like(table[idx], float("nan")))
        a, s, ce, cx = (row[:, c].to(x_in.dtype) for c in (1, 2, 3, 4))
        x = x_in.reshape(len(x_in), -1)
        x0 = self.mixture.posterior_mean(x, a, s)
        eps = (x - a[:, None] * x0) / s[:, None]
        return (ce[:, None] * eps + cx[:, None] * x0).view_as(x_in)


def trajectory_table(traj: Trajectory) -> torch.Tensor:
    """[S, 5] float64 per model input: timestep, level alpha and sigma of the input, and the weights of
    (epsilon, x0) in the scheduler's prediction (epsilon (1, 0), v (alpha, -sigma), sample (0, 1), flow (1, -1))."""
    a, s = traj.in_alpha.to(torch.float64), traj.in_sigma.to(torch.float64)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    ce, cx = {"epsilon": (one, zero), "v_prediction": (a, -s), "sample": (zero, one)}.get(traj.prediction, (one, -one))
    return torch.stack([traj.timesteps.to(torch.float64), a, s, ce, cx], dim=1)
