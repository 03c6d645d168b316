"""A sampler run as affine maps: step(i), jump(i, j) and whole refine chains, from a diffusers scheduler.

Index convention (DESIGN.md section 1): i = 0..S, x_0 the initial noise, x_S the result; the model sees
timestep tau_i = timesteps[i] at index i < S. Every supported step is

    x_{i+1} = A_i x_i + B_i o_i + C_i z_i        (z_i drawn only where `noisy[i]`)

and a jump i -> j is the same formula aimed at the level step j-1 lands on, so jump(i, i+1) is step(i).

Scalars are computed the way the scheduler computes them (float32 tensors, same operation order) and then
composed in float64, so step(i) reproduces `scheduler.step` to float64 rounding, not to float32 rounding.
"""
import copy
from dataclasses import dataclass

import torch

F32, F64 = torch.float32, torch.float64

SUPPORTED = {
    "DDIMScheduler": ("epsilon", "v_prediction"),
    "DDPMScheduler": ("epsilon", "v_prediction"),
    "EulerDiscreteScheduler": ("epsilon", "v_prediction"),
    "FlowMatchEulerDiscreteScheduler": ("flow",),
}
SPACINGS = ("leading", "trailing", "linspace")
DDPM_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large")
STEP_KWARGS = {
    "DDIMScheduler": {"eta": 0.0, "use_clipped_model_output": False},
    "DDPMScheduler": {},
    "EulerDiscreteScheduler": {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0},
    "FlowMatchEulerDiscreteScheduler": {},
}


class UnsupportedScheduler(ValueError):
    """The scheduler (or one of its options) is not an affine sampler this runtime supports."""


def supported_text() -> str:
    return "; ".join(f"{name} ({', '.join(preds)})" for name, preds in SUPPORTED.items())


@dataclass(frozen=True, eq=False)
class Trajectory:
    """The S-step trajectory of one (scheduler config, steps, step options): timesteps and float64 coefficients."""

    key: str                    # identity of (scheduler class + config, steps, options): equal keys, equal trajectories
    scheduler_name: str
    prediction: str             # "epsilon", "v_prediction" or "flow" (velocity)
    timesteps: torch.Tensor     # [S] what the model is given at index i (the scheduler's values and dtype)
    input_divisor: torch.Tensor  # [S] float64: the model sees x_i / input_divisor[i] (scale_model_input)
    init_noise_sigma: float     # x_0 = unit noise * init_noise_sigma
    A: torch.Tensor             # [S] float64 step coefficient of x_i
    B: torch.Tensor             # [S] float64 step coefficient of o_i
    C: torch.Tensor             # [S] float64 step coefficient of z_i (0 where not noisy)
    noisy: tuple                # [S] bools: step i draws noise (exactly where the scheduler draws it)
    alpha: torch.Tensor         # [S+1] float64 state levels: x_i = alpha_i x0 + sigma_i eps (level told to the model;
    sigma: torch.Tensor         #       index S is where the last step lands)
    in_alpha: torch.Tensor      # [S] float64 the same levels for the model input x_i / input_divisor[i]
    in_sigma: torch.Tensor
    _map: object                # (i, j) int64 tensors -> (A, B, C) float64 of the map from index i to index j

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @classmethod
    def from_scheduler(cls, scheduler, steps: int, timesteps_kwargs: dict | None = None, **step_kwargs) -> "Trajectory":
        """Build from a diffusers scheduler and step count; the scheduler itself is neither mutated nor kept."""
        return build(scheduler, steps, timesteps_kwargs, step_kwargs)

    def step(self, i: int) -> tuple:
        """(A_i, B_i, C_i) as floats."""
        return float(self.A[i]), float(self.B[i]), float(self.C[i])

    def jump(self, i: int, j: int) -> tuple:
        """Noise-free skip x_j = a x_i + b o_i (j > i), the k-step form of the scheduler's own update."""
        if not 0 <= i < j <= self.steps:
            raise ValueError(f"jump({i}, {j}) needs 0 <= i < j <= S = {self.steps}")
        a, b, _ = self._map(torch.tensor([i]), torch.tensor([j]))
        return float(a[0]), float(b[0])

    def jumps(self, i: int, targets) -> torch.Tensor:
        """[k, 2] float64 jump coefficients from index i to each target index."""
        j = torch.as_tensor(list(targets), dtype=torch.long)
        if len(j) and not (j.min() > i and j.max() <= self.steps):
            raise ValueError(f"jump targets {j.tolist()} must lie in ({i}, {self.steps}]")
        a, b, _ = self._map(torch.full_like(j, i), j)
        return torch.stack([a, b], dim=1)

    def extrapolated(self, i: int, prev: int, targets) -> torch.Tensor:
        """[k, 3] coefficients over (x_i, o_i, o_prev) of drafts built with extrapolated outputs.

        The model output is extrapolated linearly in log-SNR from o_prev (index prev < i) and o_i:
        o_l ~ o_i + r_l (o_i - o_prev) with r_l = (v_l - v_i) / (v_i - v_prev), v = log(alpha^2 / sigma^2), and the
        draft x_j is the refine chain from x_i with those outputs, x_j = P x_i + sum_l Q_l o_l: affine in the three
        inputs. log-SNR was chosen by measurement over timestep and sigma (README, "Better drafts"). A draft whose
        extrapolation is ill-defined is the plain jump: a repeated level, an infinite log-SNR (sigma = 1 or 0), or
        a stochastic step between the two outputs (their difference is then mostly injected noise)."""
        v = 2 * torch.log(self.alpha[:-1] / self.sigma[:-1])
        out = torch.zeros(len(targets), 3, dtype=F64)
        out[:, :2] = self.jumps(i, targets)
        dv = v[i] - v[prev]
        if dv == 0 or not torch.isfinite(dv) or any(self.noisy[prev:i]):
            return out
        for q, j in enumerate(targets):
            r = (v[i:j] - v[i]) / dv
            if not torch.isfinite(r).all():
                continue  # keep the jump
            w, _ = self.chain(i, j - i)
            out[q] = torch.stack([w[0], (w[1:] * (1 + r)).sum(), -(w[1:] * r).sum()])
        return out

    def chain(self, i: int, m: int) -> tuple:
        """Refine chain from anchor i over m steps as one weighted sum, in float64:

        x_{i+m} = P x_i + sum_{s<m} Q[s] o_{i+s} + sum_q R[q] z_q   (R over the noisy steps, in draw order).
        Returns (weights [m+1] = [P, Q...], noise_weights [q])."""
        if not (0 <= i and m >= 1 and i + m <= self.steps):
            raise ValueError(f"chain({i}, {m}) leaves the trajectory of {self.steps} steps")
        w = torch.ones(1, dtype=F64)
        r = torch.zeros(0, dtype=F64)
        for s in range(i, i + m):
            w = torch.cat([w * self.A[s], self.B[s:s + 1]])
            if self.noisy[s]:
                r = torch.cat([r * self.A[s], self.C[s:s + 1]])
            else:
                r = r * self.A[s]
        return w, r


# ---------------------------------------------------------------------------------------------- builders


def _config_value(scheduler, name, default=None):
    return getattr(scheduler.config, name, default)


def _check_common(scheduler, steps, step_kwargs):
    name = type(scheduler).__name__
    if name not in SUPPORTED:
        raise UnsupportedScheduler(f"scheduler {name} is not supported; supported: {supported_text()}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    train = _config_value(scheduler, "num_train_timesteps", 1000)
    if name != "FlowMatchEulerDiscreteScheduler" and steps > train:
        raise ValueError(f"steps={steps} exceeds the scheduler's num_train_timesteps={train}")
    pred = "flow" if name == "FlowMatchEulerDiscreteScheduler" else _config_value(scheduler, "prediction_type")
    if pred not in SUPPORTED[name]:
        raise UnsupportedScheduler(
            f"{name} with prediction_type={pred!r} is not supported; supported: {', '.join(SUPPORTED[name])}")
    spacing = _config_value(scheduler, "timestep_spacing")
    if spacing is not None and spacing not in SPACINGS:
        raise UnsupportedScheduler(f"timestep_spacing={spacing!r} is not supported; supported: {', '.join(SPACINGS)}")
    for flag in ("clip_sample", "thresholding"):
        if _config_value(scheduler, flag, False):
            raise UnsupportedScheduler(
                f"{name} has {flag}=True, which makes a step nonlinear in the model output; turn it off with "
                f"`scheduler = {name}.from_config(scheduler.config, {flag}=False)` (SD-family configs have it off)")
    allowed = STEP_KWARGS[name]
    unknown = sorted(set(step_kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown step option(s) {unknown} for {name}; allowed: {sorted(allowed) or 'none'}")
    return name, pred, {**allowed, **step_kwargs}


def build(scheduler, steps, timesteps_kwargs, step_kwargs) -> Trajectory:
    name, pred, opts = _check_common(scheduler, steps, step_kwargs)
    sched = copy.deepcopy(scheduler)  # set_timesteps mutates; the caller's scheduler may be serving others
    sched.set_timesteps(steps, device="cpu", **(timesteps_kwargs or {}))
    if len(sched.timesteps) != steps:
        raise ValueError(f"{name}.set_timesteps({steps}) produced {len(sched.timesteps)} timesteps")
    family = {"DDIMScheduler": _ddim, "DDPMScheduler": _ddpm,
              "EulerDiscreteScheduler": _euler, "FlowMatchEulerDiscreteScheduler": _flow}[name]
    parts = family(sched, steps, pred, opts)
    i = torch.arange(steps)
    A, B, C = parts["map"](i, i + 1)
    C = torch.where(torch.tensor(parts["noisy"]), C, torch.zeros_like(C))
    init = getattr(sched, "init_noise_sigma", 1.0)  # flow matching has none: the pipelines use unit noise
    key = repr((name, sorted(dict(scheduler.config).items()), steps, sorted((timesteps_kwargs or {}).items()),
                sorted(opts.items())))
    return Trajectory(
        key=key, scheduler_name=name, prediction=pred, timesteps=sched.timesteps.clone(),
        input_divisor=parts.get("divisor", torch.ones(steps, dtype=F32)).to(F64),
        init_noise_sigma=float(init), A=A, B=B, C=C, noisy=tuple(parts["noisy"]),
        alpha=parts["alpha"].to(F64), sigma=parts["sigma"].to(F64),
        in_alpha=parts["in_alpha"].to(F64), in_sigma=parts["in_sigma"].to(F64), _map=parts["map"])


def _vp_levels(abar: torch.Tensor):
    return abar.to(F64).sqrt(), (1 - abar.to(F64)).sqrt()


def _ddim(sched, steps, pred, opts):
    eta = float(opts["eta"])
    if eta < 0:
        raise ValueError(f"DDIM eta must be >= 0, got {eta}")
    ac = sched.alphas_cumprod.to(F32)
    ts = sched.timesteps.long()
    # DDIM's step lands on tau_i - T // S (not always tau_{i+1}: linspace/trailing rounding), or the final alpha.
    prev = ts - sched.config.num_train_timesteps // steps
    final = sched.final_alpha_cumprod.to(F32)
    a_src = ac[ts]
    a_land = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)  # a_land[j-1]: level of index j

    def map_(i, j):
        a_t, a_p = a_src[i], a_land[j - 1]
        b_t = 1 - a_t
        var = ((1 - a_p) / b_t) * (1 - a_t / a_p)
        std = eta * var ** 0.5
        dir_ = (1 - a_p - std ** 2) ** 0.5
        sa_t, sb_t, sa_p = (v.to(F64) for v in (a_t ** 0.5, b_t ** 0.5, a_p ** 0.5))
        dir_ = dir_.to(F64)
        if pred == "epsilon":   # x0 = (x - sb_t o) / sa_t, eps = o
            A, B = sa_p / sa_t, dir_ - sa_p * sb_t / sa_t
        else:                   # x0 = sa_t x - sb_t o, eps = sa_t o + sb_t x
            A, B = sa_p * sa_t + dir_ * sb_t, dir_ * sa_t - sa_p * sb_t
        return A, B, std.to(F64)

    alpha, sigma = _vp_levels(torch.cat([a_src, a_land[-1:]]))
    return dict(map=map_, noisy=[eta > 0] * steps, alpha=alpha, sigma=sigma,
                in_alpha=alpha[:-1], in_sigma=sigma[:-1])


def _ddpm(sched, steps, pred, opts):
    vt = sched.config.variance_type
    if vt not in DDPM_VARIANCES:
        raise UnsupportedScheduler(f"DDPMScheduler variance_type={vt!r} is not supported (it is not affine in the "
                                   f"model output); supported: {', '.join(DDPM_VARIANCES)}")
    ac = sched.alphas_cumprod.to(F32)
    ts = sched.timesteps.long()
    a_src = ac[ts]
    a_land = torch.cat([a_src[1:], torch.ones(1, dtype=F32)])  # DDPM steps to the next listed timestep, then to 1

    def map_(i, j):
        a_t, a_p = a_src[i], a_land[j - 1]
        b_t, b_p = 1 - a_t, 1 - a_p
        cur_a = a_t / a_p
        cur_b = 1 - cur_a
        c0 = ((a_p ** 0.5 * cur_b) / b_t).to(F64)
        cs = (cur_a ** 0.5 * b_p / b_t).to(F64)
        var = torch.clamp((1 - a_p) / (1 - a_t) * cur_b, min=1e-20)
        std = {"fixed_small": var ** 0.5, "fixed_small_log": torch.exp(0.5 * torch.log(var)),
               "fixed_large": cur_b ** 0.5}[vt]
        sa_t, sb_t = (a_t ** 0.5).to(F64), (b_t ** 0.5).to(F64)
        if pred == "epsilon":
            A, B = c0 / sa_t + cs, -c0 * sb_t / sa_t
        else:
            A, B = c0 * sa_t + cs, -c0 * sb_t
        return A, B, std.to(F64)

    alpha, sigma = _vp_levels(torch.cat([a_src, a_land[-1:]]))
    return dict(map=map_, noisy=[bool(t > 0) for t in ts], alpha=alpha, sigma=sigma,
                in_alpha=alpha[:-1], in_sigma=sigma[:-1])


def _euler(sched, steps, pred, opts):
    sig = sched.sigmas.to(F32)  # [S+1]
    churn, tmin, tmax, s_noise = (float(opts[k]) for k in ("s_churn", "s_tmin", "s_tmax", "s_noise"))
    gamma = torch.tensor([min(churn / (len(sig) - 1), 2 ** 0.5 - 1) if tmin <= s <= tmax else 0.0
                          for s in sig[:-1].tolist()], dtype=F64)
    sig_hat = sig[:-1] * (gamma + 1).to(F32)
    churn_std = ((sig_hat ** 2 - sig[:-1] ** 2) ** 0.5).to(F64) * s_noise  # x_hat = x + churn_std z
    divisor = (sig[:-1] ** 2 + 1) ** 0.5

    def map_(i, j):
        s, sh = sig[i], sig_hat[i]
        dt = (sig[j] - sh).to(F64)
        sh64 = sh.to(F64)
        if pred == "epsilon":   # x0 = x_hat - sigma_hat o: the derivative is o
            A, B = torch.ones_like(dt), dt
        else:                   # x0 = c_out o + x_hat / (sigma^2 + 1); derivative = (x_hat - x0) / sigma_hat
            c_out = (-s / (s ** 2 + 1) ** 0.5).to(F64)
            d2 = (s ** 2 + 1).to(F64)
            A, B = 1 + dt / sh64 - dt / (sh64 * d2), -dt * c_out / sh64
        return A, B, A * churn_std[i]

    s64 = sig.to(F64)
    return dict(map=map_, noisy=(gamma > 0).tolist(), divisor=divisor,
                alpha=torch.ones_like(s64), sigma=s64,
                in_alpha=1 / (1 + s64[:-1] ** 2).sqrt(), in_sigma=s64[:-1] / (1 + s64[:-1] ** 2).sqrt())


def _flow(sched, steps, pred, opts):
    if _config_value(sched, "stochastic_sampling", False):
        raise UnsupportedScheduler("FlowMatchEulerDiscreteScheduler with stochastic_sampling=True is not supported; "
                                   "use stochastic_sampling=False (the default)")
    sig = sched.sigmas.to(F32)

    def map_(i, j):
        dt = (sig[j] - sig[i]).to(F64)
        return torch.ones_like(dt), dt, torch.zeros_like(dt)

    s64 = sig.to(F64)
    return dict(map=map_, noisy=[False] * steps, alpha=1 - s64, sigma=s64,
                in_alpha=1 - s64[:-1], in_sigma=s64[:-1])
