"""A diffusers scheduler run as affine maps, read off the scheduler's own arithmetic (docs/design.md section 1).

Index convention: i = 0..S, x_0 the initial state, x_S the result. The model is called once per index i < S, with
timestep timesteps[i] on the input x_i / input_divisor[i] (S = len(scheduler.timesteps): PNDM repeats a timestep,
Heun and KDPM2 call the model twice per step). A scheduler's state at index i is the sample x_i and the tensors it
keeps between steps, its registers h^i (DPM-Solver's and UniPC's converted outputs, PNDM's ets, UniPC's corrected
sample, ...). Every supported step is affine in the state, the model output o_i and the step's noise draws z:

    x_{i+1} = wx x_i + wo o_i + sum_k wh_k h^i_k + sum_d wz_d z_{first_draw[i] + d}
    h^{i+1}_k = the same form with its own weights

A history-free scheduler (DDIM, DDPM, Euler, flow matching) has no registers: x_{i+1} = A_i x_i + B_i o_i + C_i z_i.

The weights are probed, not derived per class: a fresh copy of the scheduler runs set_timesteps, scale_model_input
and step in float64, and before each step its sample, the model output, every register and every noise draw is
replaced by a unit vector of a small basis. Each step then computes its own weights with its own arithmetic, so
parity with diffusers holds by construction and a new diffusers scheduler costs nothing. A run on random data
verifies that the steps really are affine (clip_sample, thresholding and the like are not) and that the noise is
drawn the way it was recorded.
"""
import contextlib
import copy
import inspect
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

F32, F64 = torch.float32, torch.float64
NONLINEAR_FLAGS = ("clip_sample", "thresholding")   # config options that make a step nonlinear in the model output
LEARNED_VARIANCE = ("learned", "learned_range")     # the model predicts its own variance: not affine
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
BASIS = 64                                          # probe basis size: x, o, registers and one step's draws
_STEP_ARGS = ("self", "model_output", "timestep", "sample", "generator", "return_dict", "variance_noise")
_PROBE_LOCK = threading.Lock()  # probing swaps a module-level function for a moment
_CACHE, _CACHE_LOCK = OrderedDict(), threading.Lock()  # probed trajectories by key (they are immutable)


class UnsupportedScheduler(ValueError):
    """The scheduler (or one of its options) is not an affine sampler this runtime can run."""


@dataclass(frozen=True)
class StepMap:
    """Step i as weights over its basis [x_i, o_i, h^i_0..h^i_{r-1}, z_{first_draw}..]: the next sample and the
    registers the scheduler keeps for step i + 1 (the live ones only)."""
    x: tuple          # weights of x_{i+1}
    h: tuple          # per register of step i + 1: its weights
    first_draw: int   # global index of this step's first noise draw
    draws: int        # noise draws of this step
    registers: int    # r, registers read (h^i)


@dataclass(frozen=True, eq=False)
class Trajectory:
    """The run of one (scheduler config, steps, start, step options): timesteps, levels and float64 step maps."""

    key: str                    # identity of (class + config, steps, start, options): equal keys, equal trajectories
    scheduler_name: str
    prediction: str             # "epsilon", "v_prediction", "sample" or "flow" (velocity)
    num_inference_steps: int    # what set_timesteps was given
    start: int                  # index of the first model call in the scheduler's timesteps (img2img: > 0)
    timesteps: torch.Tensor     # [S] what the model is given at index i (the scheduler's values and dtype)
    input_divisor: torch.Tensor  # [S] float64: the model sees x_i / input_divisor[i] (scale_model_input)
    init_noise_sigma: float     # start = 0: x_0 = unit noise * init_noise_sigma
    maps: tuple                 # [S] StepMap
    draw_dtypes: tuple          # [Q] per noise draw: None (the latent's dtype) or the dtype the scheduler draws in
    alpha: torch.Tensor         # [S+1] float64 state levels x_i = alpha_i x0 + sigma_i eps (index S: the result,
    sigma: torch.Tensor         #       where a perfect model's run lands); NaN where the scheduler has no levels
    in_alpha: torch.Tensor      # [S] float64 the same levels for the model input x_i / input_divisor[i]
    in_sigma: torch.Tensor

    @property
    def steps(self) -> int:
        """S, the number of model calls on the trajectory."""
        return len(self.timesteps)

    @property
    def noisy(self) -> tuple:
        """Per step: whether it draws noise."""
        return tuple(m.draws > 0 for m in self.maps)

    @property
    def draws(self) -> int:
        return len(self.draw_dtypes)

    def registers(self, i: int) -> int:
        """The number of registers the state at index i carries (0 at i = 0 and for history-free schedulers)."""
        return self.maps[i].registers if i < self.steps else 0

    @property
    def history_free(self) -> bool:
        return all(m.registers == 0 for m in self.maps)

    @classmethod
    def from_scheduler(cls, scheduler, steps: int, timesteps_kwargs: dict | None = None, start: int = 0,
                       **step_kwargs) -> "Trajectory":
        """Probe a diffusers scheduler (never mutated nor kept) for `steps` inference steps, from timestep index
        `start` (the img2img convention: diffusers' pipelines call set_begin_index(start) and loop over
        timesteps[start:]). step_kwargs are step() options such as eta (DDIM) or s_churn (Euler)."""
        key = trajectory_key(scheduler, steps, timesteps_kwargs, step_kwargs, start)
        with _CACHE_LOCK:
            if key in _CACHE:
                _CACHE.move_to_end(key)
                return _CACHE[key]
        traj = build(scheduler, steps, timesteps_kwargs, step_kwargs, start)
        with _CACHE_LOCK:
            _CACHE[key] = traj
            while len(_CACHE) > 128:
                _CACHE.popitem(last=False)
        return traj

    def step(self, i: int) -> tuple:
        """(A_i, B_i, C_i) of a history-free step x_{i+1} = A_i x_i + B_i o_i + C_i z_i (C_i = 0 without noise)."""
        m = self.maps[i]
        if m.registers or m.h or m.draws > 1:
            raise ValueError(f"{self.scheduler_name} step {i} keeps registers or draws twice; use express()")
        return m.x[0], m.x[1], (m.x[2] if m.draws else 0.0)

    def express(self, i: int, targets, output=None, registers_at: int | None = None) -> tuple:
        """States x_j (j in targets, i <= j <= S) as weighted sums over what is known at anchor i.

        Symbols: ("x", i) the anchor sample; ("h", k) its registers; ("z", q) noise draws; ("o", l), l >= i, the
        outputs along the chain, or whatever `output(l)` returns for them (a dict symbol -> weight: the anchor's
        output held, an extrapolation, ...). Also returns the registers at index `registers_at` (a target) in the
        same form. Composed in float64 in the scheduler's step order: ([dict per target], [dict per register])."""
        targets = list(targets)
        last = max(targets + ([registers_at] if registers_at is not None else []), default=i)
        if not (min(targets + [last]) >= i >= 0 and last <= self.steps):
            raise ValueError(f"express({i}, {targets}) leaves the trajectory of {self.steps} steps")
        x = {("x", i): 1.0}
        h = [{("h", k): 1.0} for k in range(self.registers(i))]
        states, regs = {i: x}, {i: h}
        for l in range(i, last):
            m = self.maps[l]
            o = output(l) if output is not None else {("o", l): 1.0}
            basis = [x, o, *h, *({("z", m.first_draw + d): 1.0} for d in range(m.draws))]
            x, h = _combine(m.x, basis), [_combine(w, basis) for w in m.h]
            states[l + 1], regs[l + 1] = x, h
        return [dict(states[j]) for j in targets], (regs[registers_at] if registers_at is not None else [])


    def apply(self, i: int, x, o, h=(), z=()) -> tuple:
        """Step i on tensors: (x_{i+1}, [registers at i + 1]) from x_i, o_i, the registers at i and the step's
        noise draws (the sequential sampler's update, with the probed weights)."""
        m = self.maps[i]
        basis = [x, o, *h, *z]
        return _lin(m.x, basis), [_lin(w, basis) for w in m.h]


def _lin(weights, tensors):
    """sum_k weights[k] * tensors[k], skipping zero weights (an unused register may be absent)."""
    out = None
    for w, t in zip(weights, tensors):
        if w:
            out = w * t if out is None else out + w * t
    return out if out is not None else 0 * tensors[0]


def _combine(weights, basis) -> dict:
    acc = {}
    for w, terms in zip(weights, basis):
        if w:
            for k, v in terms.items():
                acc[k] = acc.get(k, 0.0) + w * v
    return acc


# ---------------------------------------------------------------------------------------------- building


def _config(scheduler, name, default=None):
    return getattr(scheduler.config, name, default)


def prediction_of(scheduler) -> str:
    """What the model predicts for this scheduler: epsilon, v_prediction, sample or flow (velocity)."""
    if type(scheduler).__name__.startswith("FlowMatch") or _config(scheduler, "use_flow_sigmas", False) \
            or _config(scheduler, "prediction_type") == "flow_prediction":
        return "flow"
    return _config(scheduler, "prediction_type", "epsilon")


def _check_options(scheduler, steps, step_kwargs) -> tuple:
    """Reject what cannot be affine before probing; returns (step() accepts a generator, step options)."""
    name = type(scheduler).__name__
    if not (hasattr(scheduler, "set_timesteps") and hasattr(scheduler, "step") and hasattr(scheduler, "config")):
        raise UnsupportedScheduler(f"{name} is not a diffusers scheduler (it needs set_timesteps, step and config)")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    train = _config(scheduler, "num_train_timesteps", None)
    if train is not None and not name.startswith("FlowMatch") and steps > train:
        raise ValueError(f"steps={steps} exceeds the scheduler's num_train_timesteps={train}")
    takes = inspect.signature(type(scheduler).__init__).parameters  # from_config keeps keys a class ignores
    for flag in NONLINEAR_FLAGS:
        if flag in takes and _config(scheduler, flag, False):
            raise UnsupportedScheduler(
                f"{name} has {flag}=True, which makes a step nonlinear in the model output; turn it off with "
                f"`scheduler = {name}.from_config(scheduler.config, {flag}=False)` (SD-family configs have it off)")
    vt = _config(scheduler, "variance_type") if "variance_type" in takes else None
    if vt in LEARNED_VARIANCE:
        raise UnsupportedScheduler(f"{name} variance_type={vt!r} needs a model-predicted variance, which is not "
                                   f"affine in the model output; use variance_type='fixed_small' (or omit it)")
    pred = prediction_of(scheduler)
    if pred not in PREDICTIONS:
        raise UnsupportedScheduler(f"{name} prediction_type={pred!r} is not supported; supported: "
                                   f"epsilon, v_prediction, sample, flow_prediction")
    params = inspect.signature(scheduler.step).parameters
    allowed = sorted(p for p in params if p not in _STEP_ARGS and params[p].kind == params[p].POSITIONAL_OR_KEYWORD)
    unknown = sorted(set(step_kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown step option(s) {unknown} for {name}; allowed: {allowed or 'none'}")
    if "eta" in step_kwargs and not step_kwargs["eta"] >= 0:
        raise ValueError(f"{name} eta must be >= 0, got {step_kwargs['eta']}")
    return "generator" in params, dict(step_kwargs)


@contextlib.contextmanager
def _drawing(sched, draw):
    """Inside the block the scheduler's noise comes from draw(shape, dtype) instead of diffusers' randn_tensor."""
    mods = {sys.modules[c.__module__] for c in type(sched).__mro__ if c.__module__ in sys.modules}
    mods = [m for m in mods if hasattr(m, "randn_tensor")]
    with _PROBE_LOCK:
        saved = [(m, m.randn_tensor) for m in mods]
        for m in mods:
            m.randn_tensor = lambda shape, generator=None, device=None, dtype=None, layout=None: draw(shape, dtype)
        try:
            yield
        finally:
            for m, f in saved:
                m.randn_tensor = f


def _fresh(scheduler, steps, timesteps_kwargs, start):
    """A copy of the scheduler with its timesteps set as a pipeline sets them, and the timesteps it will run."""
    sched = copy.deepcopy(scheduler)  # set_timesteps and step mutate; the caller's scheduler may serve others
    try:
        sched.set_timesteps(steps, device="cpu", **(timesteps_kwargs or {}))
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UnsupportedScheduler(f"{type(sched).__name__}.set_timesteps({steps}) failed: {e}") from e
    ts = sched.timesteps
    if not 0 <= start < len(ts):
        raise ValueError(f"start={start} must be an index into the {len(ts)} timesteps of {steps} steps")
    if start and hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    return sched, ts[start:]


def _run(sched, ts, x, outputs, draw, step_kwargs, accepts_generator) -> tuple:
    """The diffusers loop on given outputs: (model inputs, states x_0..x_S); noise from draw(shape, dtype)."""
    inputs, states = [], [x]
    kw = dict(step_kwargs, **({"generator": None} if accepts_generator else {}))
    with _drawing(sched, draw):
        for i, t in enumerate(ts):
            inputs.append(sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x)
            x = sched.step(outputs(i), t, x, return_dict=True, **kw).prev_sample
            states.append(x)
    return inputs, states


def _slots(sched) -> list:
    """Where the scheduler keeps probe tensors between steps: [(attribute, list index or None)]."""
    out = []
    for name, v in vars(sched).items():
        if _is_probe(v):
            out.append((name, None))
        elif isinstance(v, list):
            out += [(name, j) for j, u in enumerate(v) if _is_probe(u)]
    return out


def _is_probe(v) -> bool:
    return isinstance(v, torch.Tensor) and tuple(v.shape) == (1, BASIS)


def _get(sched, slot):
    v = getattr(sched, slot[0])
    return v if slot[1] is None else v[slot[1]]


def _set(sched, slot, value):
    if slot[1] is None:
        setattr(sched, slot[0], value)
    else:
        getattr(sched, slot[0])[slot[1]] = value


def build(scheduler, steps, timesteps_kwargs=None, step_kwargs=None, start: int = 0) -> Trajectory:
    name = type(scheduler).__name__
    accepts_generator, step_kwargs = _check_options(scheduler, steps, step_kwargs or {})
    sched, ts = _fresh(scheduler, steps, timesteps_kwargs, start)
    S = len(ts)
    if S == 0:
        raise ValueError(f"{name}.set_timesteps({steps}) produced no timesteps")
    unit = torch.eye(BASIS, dtype=F64)
    dtypes, drawn = [], [0]

    def draw(shape, dtype):
        q = drawn[0]
        if tuple(shape) != (1, BASIS) or q >= BASIS:
            raise UnsupportedScheduler(f"{name} draws noise of shape {tuple(shape)} (or too often in a step); "
                                       f"only latent-shaped draws are supported")
        dtypes.append(None if dtype in (None, F64) else dtype)
        drawn[0] += 1
        return unit[q: q + 1].to(dtype or F64)

    # Before each step the sample, the model output, every register and every noise draw become unit vectors
    # [x, o, h_0.., z_0..], so the step's results (the next sample and the registers it leaves) are its weights.
    xs, hs, regs, first, scales = [], [], [], [], []
    kw = dict(step_kwargs, **({"generator": None} if accepts_generator else {}))
    try:
        with _drawing(sched, draw):
            for i, t in enumerate(ts):
                slots = _slots(sched)
                if i:
                    hs.append([_get(sched, sl).to(F64)[0] for sl in slots])
                for k, sl in enumerate(slots):
                    _set(sched, sl, unit[2 + k: 3 + k].clone())
                regs.append(len(slots))
                first.append(len(dtypes))
                drawn[0] = 2 + len(slots)
                x = unit[0:1].clone()
                inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
                scales.append(inp.to(F64)[0])
                xs.append(sched.step(unit[1:2].clone(), t, x, return_dict=True, **kw).prev_sample.to(F64)[0])
    except UnsupportedScheduler:
        raise
    except Exception as e:  # its own step fails on this configuration, or it is no affine sampler
        raise UnsupportedScheduler(f"{name} fails in its own step() with this configuration and {steps} steps "
                                   f"({type(e).__name__}: {e}); it cannot run through the runtime") from e
    hs.append([])
    first.append(len(dtypes))

    divisor = torch.empty(S, dtype=F64)
    for i, v in enumerate(scales):
        c = float(v[0])
        if c == 0 or bool((v[1:] != 0).any()):
            raise UnsupportedScheduler(f"{name}.scale_model_input is not a scaling of the sample at step {i}")
        divisor[i] = 1.0 / c
    for i, v in enumerate(xs + [h for hi in hs for h in hi]):
        if not bool(torch.isfinite(v).all()):
            raise UnsupportedScheduler(f"{name} computes non-finite weights for this configuration and {steps} steps "
                                       f"(its own step() returns NaN or inf); try another final_sigmas_type, "
                                       f"solver or step count")
    maps = _step_maps(name, xs, hs, regs, first)
    pred = prediction_of(scheduler)
    in_alpha, in_sigma, alpha, sigma = _levels(sched, ts, start, divisor, pred)
    init = 1.0 if start else float(getattr(sched, "init_noise_sigma", 1.0))  # flow matching has none: unit noise
    key = trajectory_key(scheduler, steps, timesteps_kwargs, step_kwargs, start)
    traj = Trajectory(key=key, scheduler_name=name, prediction=pred, num_inference_steps=steps, start=start,
                      timesteps=ts.clone(), input_divisor=divisor, init_noise_sigma=init, maps=maps,
                      draw_dtypes=tuple(dtypes), alpha=alpha, sigma=sigma, in_alpha=in_alpha, in_sigma=in_sigma)
    last = perfect_run(traj)[-1]
    alpha[-1], sigma[-1] = last
    _verify(traj, scheduler, steps, timesteps_kwargs, step_kwargs, accepts_generator)
    return traj


def _step_maps(name, xs, hs, regs, first) -> tuple:
    """StepMaps from the probed vectors, keeping only live registers (read by a later step, directly or not)."""
    S = len(xs)
    live = [[] for _ in range(S + 1)]
    for i in range(S - 1, -1, -1):
        n_draw = first[i + 1] - first[i]
        read = [xs[i]] + [hs[i][k] for k in live[i + 1]]
        for v in read:
            if bool((v[2 + regs[i] + n_draw:] != 0).any()):
                raise UnsupportedScheduler(f"{name} step {i} reads something that is neither its sample, its model "
                                           f"output, a register nor its own noise")
        live[i] = [k for k in range(regs[i]) if any(float(v[2 + k]) != 0 for v in read)]
    maps = []
    for i in range(S):
        n_draw = first[i + 1] - first[i]
        cols = [0, 1] + [2 + k for k in live[i]] + list(range(2 + regs[i], 2 + regs[i] + n_draw))
        pick = lambda v: tuple(float(v[c]) for c in cols)  # noqa: E731
        maps.append(StepMap(pick(xs[i]), tuple(pick(hs[i][k]) for k in live[i + 1]), first[i], n_draw,
                            len(live[i])))
    return tuple(maps)


def perfect_run(traj: Trajectory) -> list:
    """(alpha, sigma) of x_0..x_S when a perfect model is sampled from x_0 = alpha_0 x0 + sigma_0 eps: each state
    as a weight of x0 and a vector over the independent noises (eps and every draw), whose norm is sigma.
    A perfect model returns the prediction of the state's own noise direction. For tests and the result's level."""
    Q = traj.draws
    eps = torch.zeros(1 + Q, dtype=F64)
    eps[0] = float(traj.sigma[0])
    x, h = (float(traj.alpha[0]), eps), []
    out = [(x[0], float(x[1].norm()))]
    for i, m in enumerate(traj.maps):
        a, c = x
        s = float(c.norm())
        u, div = c / s if s else c, float(traj.input_divisor[i])
        o = {"epsilon": (0.0, u), "sample": (1.0, 0 * u), "flow": (-1.0, u), "v_prediction": (-s / div, a / div * u)}
        noise = [(0.0, torch.eye(1 + Q, dtype=F64)[1 + m.first_draw + d]) for d in range(m.draws)]
        basis = [x, o[traj.prediction], *h, *noise]
        lin = lambda w: (sum(wi * b[0] for wi, b in zip(w, basis)), sum(wi * b[1] for wi, b in zip(w, basis)))  # noqa: E731
        x, h = lin(m.x), [lin(w) for w in m.h]
        out.append((x[0], float(x[1].norm())))
    return out


def trajectory_key(scheduler, steps, timesteps_kwargs=None, step_kwargs=None, start=0) -> str:
    """Equal keys, equal trajectories: the scheduler's class and config, steps, start and options."""
    config = dict(getattr(scheduler, "config", None) or {})
    return repr((type(scheduler).__name__, sorted((k, _plain(v)) for k, v in config.items()), steps,
                 start, sorted((k, _plain(v)) for k, v in (timesteps_kwargs or {}).items()),
                 sorted((step_kwargs or {}).items())))


def _plain(v):
    """A repr-stable form of a config or set_timesteps value (numpy arrays and tensors as tuples)."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    return tuple(_plain(u) for u in v) if isinstance(v, (list, tuple)) else v


def _levels(sched, ts, start, divisor, pred) -> tuple:
    """Noise levels from the scheduler's tables: the model input at index i is in_alpha x0 + in_sigma eps, the state
    alpha x0 + sigma eps ([S+1]; index S is filled in from a perfect model's run).

    Flow sigmas s: x = (1 - s) x0 + s eps. k-diffusion sigmas k: x0 + k eps for schedulers that scale the model
    input, VP-scaled otherwise (DPM-Solver, UniPC, DEIS). Else alphas_cumprod at the timestep the model is told (a
    DDIM step with linspace or trailing spacing lands between listed timesteps: the model is told the listed one).
    NaN without tables."""
    S = len(ts)
    sig = getattr(sched, "sigmas", None)
    k = sig[start: start + S].to(F64) if isinstance(sig, torch.Tensor) and len(sig) >= start + S else None
    if pred == "flow":
        s = k if k is not None else ts.to(F64) / sched.config.num_train_timesteps
        alpha, sigma = 1 - s, s
    elif bool((divisor != 1).any()):
        # x0 + k eps with the input scaled to unit variance, divisor sqrt(k^2 + 1): the table's k where it is the
        # one the input was scaled with, else k from the divisor (KDPM2's interpolated sigmas)
        k_div = (divisor ** 2 - 1).clamp(min=0).sqrt()
        same = k is not None and bool(((k ** 2 + 1).sqrt() - divisor).abs().le(1e-6 * divisor).all())
        alpha, sigma = torch.ones(S, dtype=F64), (k if same else k_div)
    elif k is not None:  # DPM-Solver, UniPC, DEIS: VP-scaled states at k-diffusion sigmas
        alpha = 1 / (1 + k ** 2).sqrt()
        sigma = k * alpha
    elif isinstance(getattr(sched, "alphas_cumprod", None), torch.Tensor):
        abar = sched.alphas_cumprod.to(F64)[ts.long()]
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    else:
        alpha = sigma = torch.full((S,), float("nan"), dtype=F64)
    nan = torch.full((1,), float("nan"), dtype=F64)
    return alpha / divisor, sigma / divisor, torch.cat([alpha, nan]), torch.cat([sigma, nan])


def _verify(traj: Trajectory, scheduler, steps, timesteps_kwargs, step_kwargs, accepts_generator):
    """Run the scheduler on random data and outputs and compare every state with the probed maps."""
    sched, ts = _fresh(scheduler, steps, timesteps_kwargs, traj.start)
    g = torch.Generator().manual_seed(1234)
    shape = (2, 3)
    x0 = 3 * torch.randn(shape, generator=g, dtype=F64)
    outs = 3 * torch.randn(traj.steps, *shape, generator=g, dtype=F64)
    zs = []

    def draw(shp, dtype):
        z = torch.randn(shp, generator=g, dtype=dtype or F64)
        zs.append(z.to(F64))
        return z

    try:
        _, states = _run(sched, ts, x0, lambda i: outs[i], draw, step_kwargs, accepts_generator)
    except Exception as e:
        raise UnsupportedScheduler(f"{traj.scheduler_name} failed on random data after probing: {e}") from e
    if len(zs) != traj.draws:
        raise UnsupportedScheduler(f"{traj.scheduler_name} draws noise {len(zs)} times on data but "
                                   f"{traj.draws} times on probes: its noise depends on the data")
    x, h = x0, []
    for i, m in enumerate(traj.maps):
        x, h = traj.apply(i, x, outs[i], h, zs[m.first_draw: m.first_draw + m.draws])
        b = states[i + 1].to(F64)
        err = float((x - b).abs().max() / max(float(b.abs().max()), 1e-30))
        if not err <= 1e-4:  # float32 arithmetic inside a scheduler is ~1e-7; nonlinear steps are O(1)
            raise UnsupportedScheduler(
                f"{traj.scheduler_name} is not affine in the model output (step {i} differs by {err:.2g} from "
                f"the probed map); options that make a step nonlinear: clip_sample, thresholding, "
                f"learned variance, sample clipping")
