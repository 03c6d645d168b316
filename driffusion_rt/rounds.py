"""The weights of a plan's rounds: every draft and every refine as a weighted sum of named quantities (float64).

A round at anchor i reads the anchor block, the gathered outputs of its drafts and its noise draws:

    "x"       x_i, the anchor sample            ("h", k)  the scheduler's registers at i (multistep history)
    "o"       o_i, the anchor's model output    "prev"    an earlier output that extrapolated drafts pair with o_i
    ("d", j)  the model output at draft j       ("z", q)  the round's q-th noise draw (the scheduler's own order)

and writes the next anchor block: "x" = x_{i+m}, its registers, and, where the plan says so, "o" (aggressive: the
output carried from draft i+m) and "prev". Drafts are the scheduler's own chain from the anchor with the outputs not
yet known held at o_i (for DDIM, Euler and flow matching that is the paper's closed-form jump), or extrapolated in
log-SNR from o_prev and o_i; each carries exactly the noise draws the refine will use on its way, so the model sees
the noise it must remove. Nothing here touches a device: the sampler maps names to buffer rows.
"""
import math
from dataclasses import dataclass

import torch

from .plan import Plan
from .trajectory import Trajectory

DRAFT_RULES = ("jump", "extrapolate")


@dataclass(frozen=True)
class RoundWeights:
    drafts: tuple     # per draft index j (the round's order): {name: weight}
    refine: dict      # output name -> {name: weight}
    noise: range      # the scheduler's noise draws this round uses, in order ("z", q) is draw noise[q]
    registers: int    # registers of the anchor block read


def previous_output(plan: Plan, r: int) -> int | None:
    """The index of the output extrapolated drafts pair with round r's anchor output (None: nothing to pair).

    Outputs of equal quality extrapolate well: aggressive anchors carry a draft output, so they pair with the
    previous draft's (index i - 1); conservative anchors are evaluated on refined states, so they pair with the
    previous anchor's. (Measured: pairing a conservative anchor with a draft output amplifies that draft's error.)"""
    if r == 0:
        return None
    return plan.rounds[r].anchor - 1 if plan.mode == "aggressive" else plan.rounds[r - 1].anchor


def log_snr(traj: Trajectory) -> torch.Tensor:
    """v = 2 log(in_alpha / in_sigma), the log-SNR of every model input [S]."""
    return 2 * torch.log(traj.in_alpha / traj.in_sigma)


def _held(i):
    return lambda l: {"o": 1.0}


def extrapolated(traj: Trajectory, i: int, prev: int | None, v: torch.Tensor):
    """o_l ~ o_i + r_l (o_i - o_prev), r_l = (v_l - v_i) / (v_i - v_prev) in log-SNR v; None where ill-defined:
    no earlier output, a repeated level, an infinite log-SNR, or a stochastic step between the two outputs (their
    difference is then mostly injected noise)."""
    if prev is None or any(traj.noisy[prev:i]):
        return None
    dv = float(v[i] - v[prev])
    if dv == 0 or not math.isfinite(dv):
        return None

    def output(l):
        r = float(v[l] - v[i]) / dv
        return {"o": 1.0 + r, "prev": -r} if r else {"o": 1.0}
    return output


def _names(terms: dict, i: int, q0: int) -> dict:
    """express() symbols -> round names: ("x", i) -> "x", ("z", q) -> ("z", q - q0); the rest as they are."""
    out = {}
    for k, w in terms.items():
        if k == ("x", i):
            k = "x"
        elif isinstance(k, tuple) and k[0] == "z":
            k = ("z", k[1] - q0)
        out[k] = out.get(k, 0.0) + w
    return out


def round_weights(traj: Trajectory, plan: Plan, rule: str = "jump") -> list:
    """RoundWeights of every round of `plan` on `traj` with draft rule "jump" (held outputs) or "extrapolate"."""
    if rule not in DRAFT_RULES:
        raise ValueError(f"unknown draft rule {rule!r}; choose one of {', '.join(DRAFT_RULES)}")
    if plan.steps != traj.steps:
        raise ValueError(f"the plan has {plan.steps} steps, the trajectory {traj.steps}")
    v = log_snr(traj) if rule == "extrapolate" else None
    out = []
    for r, rnd in enumerate(plan.rounds):
        i, m = rnd.anchor, rnd.advance
        q0 = traj.maps[i].first_draw
        q1 = traj.maps[i + m - 1].first_draw + traj.maps[i + m - 1].draws
        extra = extrapolated(traj, i, previous_output(plan, r), v) if v is not None else None
        drafts = []
        for j in rnd.drafts:
            (w,), _ = traj.express(i, [j], output=extra or _held(i))
            w = _names(w, i, q0)
            if not all(math.isfinite(c) for c in w.values()):
                (w,), _ = traj.express(i, [j], output=_held(i))
                w = _names(w, i, q0)
            drafts.append(w)
        actual = lambda l: {"o": 1.0} if l == i else {("d", l): 1.0}  # noqa: E731
        (x,), regs = traj.express(i, [i + m], output=actual, registers_at=i + m)
        refine = {"x": _names(x, i, q0)}
        refine.update({("h", k): _names(h, i, q0) for k, h in enumerate(regs)})
        if rnd.carry is not None:
            refine["o"] = {("d", rnd.carry): 1.0}
        if rule == "extrapolate" and r + 1 < len(plan.rounds):
            nxt = previous_output(plan, r + 1)  # i + m - 1 (aggressive) or i (conservative)
            refine["prev"] = {"o": 1.0} if nxt == i else {("d", nxt): 1.0}
        out.append(RoundWeights(tuple(drafts), refine, range(q0, q1), traj.registers(i)))
    return out
