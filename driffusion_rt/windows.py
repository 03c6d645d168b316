"""The math of error-controlled rounds (mode "adaptive", docs/adaptive.md): the weights of a window's refine and
next guesses, and the first-order estimate of what a draft error costs the final sample. Pure float64, no device.

A round evaluates a window of k points a .. a+k-1 at once: the newest accepted state x_a and the guesses g_j of the
states after it. Every state the round can reach is one weighted sum over what the round holds (trajectory.py's
`express`), named

    "x"       x_a, the accepted state          ("h", k)  the scheduler's registers at a
    ("d", s)  the model output at point a+s     ("z", q)  the scheduler's q-th noise draw (global numbering)

- the refine r_{j+1} = step_j(r_j, o(g_j)) for j = a .. a+k-1 (r_a = x_a): the scheduler's own chain with the
  window's outputs, the same arithmetic as a draft-and-refine refine;
- the next guesses beyond the refine, g_j for j = a+k+1 .. a+k+n-1: the chain from r_{a+k} with the output
  extrapolated in log-SNR from the window's last two (rounds.extrapolated; held where that is ill-defined);
- the registers at every state the round may accept, and an estimate of the clean sample from x_a and o_a.

The guess g_j of a point j > a was evaluated, the refine used o(g_j) where the chain needs o(r_j); to first order
the final sample moves by w_j |g_j - r_j| (root mean square over elements), with

    w_j = s_j * max(|G_j|, |B_j| m_S / m_{j+1})

s_j the largest |d o / d x| of an optimal model for data of any variance up to 1 (0 and 1 bound it: the slope is
monotone in the variance), G_j = d x_S / d o_j through the rest of the chain (registers included) for unit-variance
Gaussian data (an adjoint pass), B_j = d x_{j+1} / d o_j, and m_l = sqrt(alpha_l^2 + sigma_l^2) that data's state
scale: the second term keeps a relative error of x_{j+1} at least as large at the end (a stochastic step's
contraction of an ideal model's errors is not counted on). Without noise-level tables, w_j = |B_j|.
"""
import math
from dataclasses import dataclass

from .rounds import extrapolated, log_snr
from .trajectory import Trajectory


@dataclass(frozen=True)
class Window:
    """The weights of one round at anchor a with k points. rows: r_{a+1} .. r_{a+k}, then the guesses
    g_{a+k+1} .. (up to index a+k+n-1, below S), then the clean estimate: row j - a - 1 holds state j.
    registers[f - a - 1]: the registers at r_f, for each state f the round may accept."""
    anchor: int
    width: int
    rows: tuple        # {name: weight} per row
    registers: tuple   # per accepted state f = a+1 .. a+k: ({name: weight} per register)

    @property
    def estimate_row(self) -> int:
        return len(self.rows) - 1


def width(traj: Trajectory, a: int, n: int) -> int:
    """Points evaluated by the round at anchor a: one at the start (there is no output to draft from yet: guesses
    from an assumed output cost more rounds than they save, measured on the benchmark models), else min(n, S - a)."""
    return 1 if a == 0 else min(n, traj.steps - a)


def _name(symbol, a: int):
    kind = symbol[0]
    if kind == "x":
        return "x"
    if kind == "d":
        return ("d", symbol[1] - a)
    return symbol  # ("h", k), ("z", q)


def _names(terms: dict, a: int) -> dict:
    out = {}
    for k, w in terms.items():
        if w:
            n = _name(k, a)
            out[n] = out.get(n, 0.0) + w
    return out


def window(traj: Trajectory, a: int, n: int) -> Window:
    """The weights of the round at anchor a with n points per round (see the module docstring)."""
    S = traj.steps
    if not 0 <= a < S:
        raise ValueError(f"anchor {a} is not a state with a model call (0..{S - 1})")
    k = width(traj, a, n)
    last = a + k - 1
    rule = extrapolated(traj, last, last - 1 if k >= 2 else None, log_snr(traj))

    def output(l):
        if l <= last:
            return {("d", l): 1.0}
        if rule is None:
            return {("d", last): 1.0}
        w = rule(l)
        return {("d", last): w["o"], ("d", last - 1): w.get("prev", 0.0)}

    targets = list(range(a + 1, max(a + k, min(a + k + n - 1, S - 1)) + 1))
    states, _ = traj.express(a, targets, output=output)
    if not all(math.isfinite(c) for t in states for c in t.values()):  # an extrapolation that overflows: hold
        states, _ = traj.express(a, targets, output=lambda l: {("d", min(l, last)): 1.0})
    regs = tuple(tuple(_names(h, a) for h in traj.express(a, [f], output=output, registers_at=f)[1])
                 for f in range(a + 1, a + k + 1))
    return Window(a, k, tuple(_names(t, a) for t in states) + (clean_estimate(traj, a),), regs)


def clean_estimate(traj: Trajectory, a: int) -> dict:
    """The model's clean-sample prediction at x_a from o_a (what the final sample's size is measured against):
    with the input u = x / d = in_alpha x0 + in_sigma eps and o = ce eps + cx x0,
    x0 = (o - ce u / in_sigma) / (cx - ce in_alpha / in_sigma). Without levels: x_a itself."""
    a_, s_, d = float(traj.in_alpha[a]), float(traj.in_sigma[a]), float(traj.input_divisor[a])
    ce, cx = _prediction_weights(traj.prediction, a_, s_)
    den = cx - ce * a_ / s_ if s_ else float("nan")
    if not (math.isfinite(den) and den):
        return {"x": 1.0}
    return {("d", 0): 1.0 / den, "x": -ce / (s_ * d) / den}


def _prediction_weights(prediction: str, a: float, s: float) -> tuple:
    """(ce, cx): the prediction as ce eps + cx x0 (gmm.trajectory_table's convention)."""
    return {"epsilon": (1.0, 0.0), "v_prediction": (a, -s), "sample": (0.0, 1.0)}.get(prediction, (1.0, -1.0))


def sensitivities(traj: Trajectory) -> tuple:
    """w_j for j = 0 .. S-1: the first-order change of the final sample per unit RMS error of the point the model
    was evaluated at j (see the module docstring)."""
    S = traj.steps
    B = [m.x[1] for m in traj.maps]
    levels = [float(v) for v in (*traj.in_alpha, *traj.in_sigma, *traj.alpha, *traj.sigma)]
    if not all(math.isfinite(v) for v in levels):
        return tuple(abs(b) for b in B)
    slope1, slope0 = [], []
    for j in range(S):  # d o / d x for data variance 1 and 0, through the input divisor
        a, s, d = float(traj.in_alpha[j]), float(traj.in_sigma[j]), float(traj.input_divisor[j])
        ce, cx = _prediction_weights(traj.prediction, a, s)
        slope1.append((ce * s + cx * a) / (a * a + s * s) / d)
        slope0.append(ce / s / d if s else math.inf)
    G = _adjoint(traj, slope1)
    m = [math.hypot(float(traj.alpha[l]), float(traj.sigma[l])) for l in range(S + 1)]
    return tuple(max(abs(slope1[j]), abs(slope0[j])) * max(abs(G[j]), abs(B[j]) * m[S] / m[j + 1])
                 for j in range(S))


def _adjoint(traj: Trajectory, slope: list) -> list:
    """G_j = d x_S / d o_j when every later output responds to its state as o_l = slope_l x_l (one backward pass
    over the step maps; registers included)."""
    lam = [1.0]  # d x_S / d (x, h_0, ...) at index S
    G = [0.0] * traj.steps
    for l in range(traj.steps - 1, -1, -1):
        m = traj.maps[l]
        lx, lh = lam[0], lam[1:]

        def grad(c):
            return lx * m.x[c] + sum(lh[k] * m.h[k][c] for k in range(len(m.h)))
        G[l] = grad(1)
        lam = [grad(0) + G[l] * slope[l]] + [grad(2 + k) for k in range(m.registers)]
    return G
