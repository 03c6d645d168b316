"""How a request is sampled: the mode, n, the draft rule and the iterative modes' settings, validated once into one
frozen `SamplingOptions` that the sampler, the engine and the command line all take (docs/design.md section 2).

    SamplingOptions(mode="aggressive", parallel=4)                 # the draft-and-refine modes (plan.py)
    SamplingOptions(mode="parasolver", window=4, tolerance=0.01)   # the iterative modes (parasolver.py)
    SamplingOptions(mode="adaptive", parallel=4, tolerance=1e-3)   # error-controlled rounds (adaptive.py)
    SamplingOptions.parse({"mode": "conservative", "parallel": 2}, max_parallel=64)   # a request's fields

What depends on the step count (a plan, the iterative modes' subintervals) is resolved by `plan` and `iterative`.
"""
import numbers
from dataclasses import dataclass, fields

from .plan import MODES, Plan, make_plan
from .rounds import DRAFT_RULES

ITERATIVE_MODES = ("picard", "parasolver")
ADAPTIVE = "adaptive"
ALL_MODES = MODES + ITERATIVE_MODES + (ADAPTIVE,)
ITERATIVE_KEYS = ("subintervals", "preconditioning", "window", "tolerance")
TOLERANCE_MODES = ITERATIVE_MODES + (ADAPTIVE,)  # the modes that take `tolerance` (its meaning differs, see below)
DEFAULT_TOLERANCE = 0.05             # picard / parasolver: delta of the stopping test, in units of the noise level
DEFAULT_ADAPTIVE_TOLERANCE = 1e-3    # adaptive: the final sample's allowed relative deviation from sequential
# Conservative rounds with a multistep scheduler need this many model calls per parallel evaluation: below it the
# last round's furthest draft (n steps from its anchor) feeds the final steps through the scheduler's second-order
# update (and UniPC's corrector), and the sample drifts and spreads (docs/schedulers.md,
# perf/results/spread_multistep.md: DDIM stays within 5% from 3 calls per n, DPM++ 2M, UniPC, DEIS and PNDM from 5).
MULTISTEP_CONSERVATIVE_CALLS_PER_N = 5


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _bounded(key: str, v, lo: int, hi):
    """A request field: an integer in lo..hi (hi None: no bound), with the request checks' wording."""
    if v is None:
        return None
    if not _is_int(v):
        raise ValueError(f"{key} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise ValueError(f"{key}={v} is out of range: allowed {lo}..{hi if hi is not None else 'any'}")
    return v


@dataclass(frozen=True)
class IterativeConfig:
    """The iterative modes' parameters for one run, defaults filled in for a step count (parasolver.py)."""
    subintervals: int     # N
    preconditioning: int  # M: subintervals solved sequentially before iterating
    window: int           # p: boundaries solved in parallel per iteration
    tolerance: float      # delta of the stopping rule (0: iterate until exact, which reproduces the sequential sampler)


@dataclass(frozen=True)
class SamplingOptions:
    """mode: sequential, aggressive, conservative, picard, parasolver or adaptive; parallel: n, model evaluations
    per parallel round (None: the number of draft ranks); drafts: jump or extrapolate (aggressive / conservative);
    subintervals, preconditioning, window: picard / parasolver only; tolerance: picard / parasolver (delta of the
    stopping test, default 0.05) and adaptive (the allowed relative deviation from the sequential sample, default
    1e-3). None: the mode's default."""
    mode: str = "aggressive"
    parallel: int | None = None
    drafts: str = "jump"
    subintervals: int | None = None
    preconditioning: int | None = None
    window: int | None = None
    tolerance: float | None = None

    def __post_init__(self):
        if self.mode not in ALL_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(ALL_MODES)}")
        if self.parallel is not None and not (_is_int(self.parallel) and self.parallel >= 1):
            raise ValueError(f"parallel must be an integer >= 1, got {self.parallel!r}")
        if self.drafts not in DRAFT_RULES:
            raise ValueError(f"unknown draft rule {self.drafts!r}; choose one of {', '.join(DRAFT_RULES)}")
        if not self.planned and self.drafts != "jump":
            raise ValueError(f"drafts={self.drafts!r} applies to modes aggressive and conservative, not "
                             f"mode={self.mode!r}")
        extra = [k for k in _keys_refused(self.mode) if getattr(self, k) is not None]
        if extra:
            raise ValueError(_refusal(extra, self.mode))
        for key, lo in (("subintervals", 1), ("preconditioning", 0)):
            v = getattr(self, key)
            if v is not None and not _is_int(v):
                raise ValueError(f"{key} must be an integer, got {v!r}")
        if self.window is not None and not (_is_int(self.window) and self.window >= 1):
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if self.tolerance is not None:
            if not (_is_number(self.tolerance) and self.tolerance >= 0):
                raise ValueError(f"tolerance must be a number >= 0, got {self.tolerance!r}")
            object.__setattr__(self, "tolerance", float(self.tolerance))

    @classmethod
    def parse(cls, spec: dict, max_parallel: int | None = None, max_steps: int | None = None) -> "SamplingOptions":
        """The options among a request's fields (the others are ignored), with the request checks' wording and
        bounds: parallel at most max_parallel, subintervals / preconditioning / window at most max_steps."""
        mode = spec.get("mode", "aggressive")
        if mode not in ALL_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(ALL_MODES)}")
        kw = {"mode": mode, "parallel": _bounded("parallel", spec.get("parallel"), 1, max_parallel)}
        extra = sorted(k for k in _keys_refused(mode) if spec.get(k) is not None)
        if extra:
            raise ValueError(_refusal(extra, mode))
        if mode in ITERATIVE_MODES:
            for key, lo in (("subintervals", 1), ("preconditioning", 0), ("window", 1)):
                kw[key] = _bounded(key, spec.get(key), lo, max_steps)
        if mode in TOLERANCE_MODES:
            kw["tolerance"] = spec.get("tolerance")
        drafts = spec.get("drafts", "jump")
        if mode not in MODES and drafts not in (None, "jump"):
            raise ValueError(f"drafts={drafts!r} applies to modes aggressive and conservative, not mode={mode!r}")
        if mode in MODES:
            if drafts not in DRAFT_RULES:
                raise ValueError(f"unknown drafts {drafts!r}; choose one of {', '.join(DRAFT_RULES)}")
            kw["drafts"] = drafts
        return cls(**kw)

    @property
    def iterative(self) -> bool:
        """picard or parasolver (parasolver.py)."""
        return self.mode in ITERATIVE_MODES

    @property
    def adaptive(self) -> bool:
        """Error-controlled rounds (adaptive.py)."""
        return self.mode == ADAPTIVE

    @property
    def planned(self) -> bool:
        """A fixed plan of rounds (sequential, aggressive, conservative): the rounds do not depend on the data."""
        return self.mode in MODES

    def resolved_tolerance(self) -> float:
        """The tolerance, or the mode's default (picard / parasolver 0.05, adaptive 1e-3)."""
        if self.tolerance is not None:
            return self.tolerance
        return DEFAULT_ADAPTIVE_TOLERANCE if self.adaptive else DEFAULT_TOLERANCE

    def n(self, world: int) -> int:
        """parallel, or the number of draft ranks when none was given."""
        return self.parallel if self.parallel is not None else world

    def plan(self, steps: int, parallel: int) -> Plan:
        """The rounds of a draft-and-refine mode for `steps` steps (make_plan checks steps and parallel)."""
        return make_plan(self.mode, steps, parallel)

    def iterative_config(self, steps: int, parallel: int) -> IterativeConfig:
        """The picard / parasolver parameters for `steps` steps with defaults filled in: picard uses N = steps,
        parasolver N = steps // 2; M = 2 (picard 0); the window defaults to `parallel`, the tolerance to 0.05."""
        if self.mode == "picard":
            if self.subintervals not in (None, steps):
                raise ValueError(f"mode='picard' is ParaSolver with subintervals = steps = {steps}; "
                                 f"got {self.subintervals}")
            n = steps
        else:
            n = self.subintervals if self.subintervals is not None else max(1, steps // 2)
        if not 1 <= n <= steps:
            raise ValueError(f"subintervals must be an integer in 1..steps={steps}, got {n!r}")
        m = self.preconditioning
        if m is None:
            m = 0 if self.mode == "picard" else min(2, n - 1)
        if not 0 <= m < n:
            raise ValueError(f"preconditioning must be an integer in 0..subintervals-1={n - 1}, got {m!r}")
        return IterativeConfig(n, m, self.window if self.window is not None else parallel, self.resolved_tolerance())

    def check(self, steps: int, parallel: int):
        """Everything that depends on the step count and n, before any work: ValueError naming the bad value."""
        if self.iterative:
            self.iterative_config(steps, parallel)
        else:  # adaptive: the same bounds on steps and n as a plan
            make_plan("sequential" if self.adaptive else self.mode, steps, parallel)

    def drift_warning(self, traj, parallel: int) -> str | None:
        """What the sampler warns before any model call (None: nothing): conservative rounds with a multistep
        scheduler (one with registers) below MULTISTEP_CONSERVATIVE_CALLS_PER_N model calls per parallel evaluation,
        naming what to use instead."""
        if self.mode != "conservative" or parallel < 2 or traj.history_free:
            return None
        if traj.steps < MULTISTEP_CONSERVATIVE_CALLS_PER_N * parallel:
            return (
                f"mode='conservative' with {traj.scheduler_name} (a multistep scheduler) needs at least "
                f"{MULTISTEP_CONSERVATIVE_CALLS_PER_N} model calls per parallel evaluation; {traj.steps} calls with "
                f"parallel={parallel} give {traj.steps / parallel:.2f}, where the last round's furthest draft drives "
                f"its final steps and the sample drifts and spreads. Use mode='adaptive' (error-controlled), "
                f"mode='aggressive', parallel <= {max(traj.steps // MULTISTEP_CONSERVATIVE_CALLS_PER_N, 1)}, or "
                f"steps >= {MULTISTEP_CONSERVATIVE_CALLS_PER_N * parallel} (docs/schedulers.md)")
        return None

    def fields(self) -> dict:
        """The options as request fields (None values left out; `parallel` kept): what a run records."""
        out = {"mode": self.mode, "parallel": self.parallel}
        out.update({f.name: getattr(self, f.name) for f in fields(self)
                    if f.name not in ("mode", "parallel") and getattr(self, f.name) is not None
                    and not (f.name == "drafts" and not self.planned)})
        return out


def _keys_refused(mode: str) -> list:
    """The iterative keys a mode does not take."""
    if mode in ITERATIVE_MODES:
        return []
    return [k for k in ITERATIVE_KEYS if k != "tolerance" or mode not in TOLERANCE_MODES]


def _refusal(keys, mode: str) -> str:
    if keys == ["tolerance"]:
        return f"['tolerance'] applies to modes {', '.join(TOLERANCE_MODES)} only, not mode={mode!r}"
    return f"{sorted(keys)} apply to modes picard and parasolver only, not mode={mode!r}"
