"""Error-controlled parallel sampling (mode "adaptive", docs/adaptive.md) on the runtime's evaluator.

Ask for a deviation from the sequential sample and get it in few serial rounds. Every round evaluates a window of
n points at once: the newest accepted state x_a and the guesses g_{a+1} .. g_{a+n-1} after it. The refine walks the
scheduler's own steps from x_a with those outputs (r_{j+1} = step_j(r_j, o(g_j))) and every guess is verified:
step j used the output at g_j where it needed the one at r_j, which moves the final sample by about
w_j |g_j - r_j| (windows.py). The round accepts the refined states up to the first whose running estimate exceeds
its share of the tolerance,

    E_b + sum_{l = a+1}^{j} w_l |g_l - r_l|_b / |x0_b|  <=  tolerance (j + 1) / S       for every sample b,

(|.|: root mean square over a sample's elements; x0: the model's clean-sample estimate at x_a; E_b: what earlier
rounds spent), so the estimate of the final relative deviation never exceeds the tolerance. The next window starts
at the newest accepted state: its output is evaluated in the same call as the new guesses, so no round is spent on
an anchor alone and a short acceptance leaves no rank idle. The guesses are this round's refined states where it
reached (Picard-like iterates, better than fresh drafts) and, beyond, the chain from its last refined state with the
output extrapolated in log-SNR from the window's last two. With every guess accepted a round advances n states and
the run is the aggressive plan's (the same drafts, refines and serial rounds); at tolerance 0 only states computed
from exact outputs are accepted, one per round, which is the sequential sampler.

All noise is drawn up front in the scheduler's order (replica generators: the same on every rank), so drafts and
refines carry the draws the sequential loop would make. Every rank evaluates its share of a window, the outputs
are all-gathered, every rank refines the same rows with the same weights, and rank 0's acceptance is broadcast.
"""
import time
from dataclasses import dataclass, field

import torch

from . import kernels
from .evaluator import ModelCall
from .noise import draw_noise, replica_generator
from .results import Cancelled, Clock, NonFiniteOutputError, SampleOutput, SampleStats
from .trajectory import Trajectory
from .windows import Window, sensitivities, width, window


@dataclass
class AdaptiveStats(SampleStats):
    tolerance: float = 0.0
    accepted: list = field(default_factory=list)  # per round: the states it accepted (>= 1)
    trace: list = field(default_factory=list)     # per round: (anchor, points evaluated, states accepted)
    estimate: float = 0.0  # the largest per-sample first-order estimate of the final relative deviation


@dataclass(frozen=True)
class _Combine:
    """One kernels.combine call: rows written, rows read, weights [written, read] (on the device)."""
    out: torch.Tensor
    inp: torch.Tensor
    coef: torch.Tensor

    def __call__(self, rows):
        kernels.combine(rows, self.out, self.inp, self.coef)


@dataclass(frozen=True)
class _Layout:
    """Rows of the arena [rows, B, ...]: window states, anchor registers, noise, gathered outputs, the chain
    (refined states, guesses, clean estimate) and the registers of the accepted state."""
    window: int
    registers: int
    noise: int
    outputs: int
    chain: int
    accepted: int
    rows: int

    @classmethod
    def make(cls, n: int, registers: int, draws: int, gathered: int):
        noise = n + registers
        outputs = noise + draws
        chain = outputs + gathered
        accepted = chain + 2 * n
        return cls(0, n, noise, outputs, chain, accepted, accepted + registers)

    def row(self, name) -> int:
        if name == "x":
            return self.window
        kind, k = name
        return {"h": self.registers, "z": self.noise, "d": self.outputs}[kind] + k


def _combine(terms: list, lay: _Layout, out_rows: list, device, acc) -> _Combine:
    names = sorted({k for t in terms for k in t}, key=repr)
    coef = torch.tensor([[t.get(k, 0.0) for k in names] for t in terms], dtype=torch.float64)
    return _Combine(torch.tensor(out_rows, dtype=torch.long, device=device),
                    torch.tensor([lay.row(k) for k in names], dtype=torch.long, device=device), coef.to(device, acc))


class WindowTables:
    """The device tables of one (trajectory, n, device, accumulation type), built per anchor on first use: the
    chain combine of the window at a, and the registers combine of every state it may accept."""

    def __init__(self, traj: Trajectory, n: int, lay: _Layout, device, acc):
        self.traj, self.n, self.lay, self.device, self.acc = traj, n, lay, device, acc
        self.weights = torch.tensor(sensitivities(traj), dtype=torch.float64)
        self._windows = {}

    def __getitem__(self, a: int) -> tuple:
        if a not in self._windows:
            w: Window = window(self.traj, a, self.n)
            lay = self.lay
            chain = _combine(list(w.rows), lay, [lay.chain + i for i in range(len(w.rows))], self.device, self.acc)
            regs = [_combine(list(r), lay, [lay.accepted + k for k in range(len(r))], self.device, self.acc)
                    if r else None for r in w.registers]
            self._windows[a] = (w, chain, regs)
        return self._windows[a]


@torch.no_grad()
def run(ev, model, traj: Trajectory, x: torch.Tensor, parallel: int, tolerance: float, generator=None,
        model_kwargs=None, cancel=None, graphs=None, cache=None) -> SampleOutput:
    """Sample `traj` from unit noise x (img2img: the noised start state) with windows of `parallel` points on
    evaluator `ev`, accepting states while the estimated final relative deviation stays within `tolerance`.
    Every rank calls this with the same arguments. cancel: as in Sampler.run; graphs: a cuda_graphs.GraphCache
    or None; cache: a dict keeping the device tables across requests (None: built for this run)."""
    S, n, B = traj.steps, parallel, x.shape[0]
    t0, clock = time.perf_counter(), Clock(x.device)
    stats = AdaptiveStats("adaptive", S, n, tolerance=tolerance)
    call = ModelCall(model, traj, x, model_kwargs, graphs)
    R = max(traj.registers(i) for i in range(S + 1))
    lay = _Layout.make(n, R, traj.draws, ev.world * ev.chunk(n))
    acc = kernels.fallback.accum_dtype(x.dtype)
    key = ("adaptive", traj.key, n, ev.world, x.device, acc)
    tables = cache.get(key) if cache is not None else None
    if tables is None:
        tables = WindowTables(traj, n, lay, x.device, acc)
        if cache is not None:
            cache[key] = tables
    rows = torch.zeros(lay.rows, *x.shape, dtype=x.dtype, device=x.device)
    if traj.draws:  # every draw of the run, in the sequential sampler's order, the same on every rank
        gen = replica_generator(ev, generator, x.device)
        for q in range(traj.draws):
            draw_noise(rows[lay.noise + q], gen, traj.draw_dtypes[q])
    dims = tuple(range(2, x.dim() + 1))  # a sample's elements in [rows, B, ...]
    sample_dims = tuple(d - 1 for d in dims)  # ... and in [B, ...]
    spent = torch.zeros(B, dtype=torch.float64)  # per sample: the estimate accepted so far
    allow = [tolerance * (j + 1) / S for j in range(S)]  # the share of the tolerance up to state j + 1
    torch.mul(x, traj.init_noise_sigma, out=rows[lay.window])
    a, r = 0, 0
    while a < S:
        if cancel is not None and ev.agree(cancel.is_set()):  # every rank stops at the same round
            raise Cancelled(f"cancelled after {stats.serial_rounds} rounds")
        win, chain, regs = tables[a]
        k = win.width
        c = ev.chunk(k)
        gathered = rows[lay.outputs: lay.outputs + ev.world * c]
        send = ev.send_buffer(gathered)
        own = tuple(range(a + ev.rank * c, min(a + ev.rank * c + c, a + k)))
        clock.start("model")
        if own:
            ev.call(call, rows[ev.rank * c: ev.rank * c + len(own)], own, send[: len(own)])
        clock.start("comm")
        ev.gather(gathered, send)
        clock.start("refine")
        stats.serial_rounds += 1
        stats.model_evals += k
        stats.batch_widths.append(k)
        chain(rows)
        # per guess and sample: |g_j - r_j|, the clean estimate's size, and a finiteness check of the outputs
        diff = (rows[lay.chain: lay.chain + k - 1] - rows[lay.window + 1: lay.window + k]).to(torch.float64)
        est = rows[lay.chain + win.estimate_row].to(torch.float64)
        check = torch.cat([diff.pow(2).mean(dim=dims).sqrt(), est.pow(2).mean(dim=sample_dims).sqrt()[None],
                           gathered[:k].to(torch.float64).sum(dim=dims)]).cpu()
        if not bool(torch.isfinite(check).all()):
            raise NonFiniteOutputError(f"non-finite model output in round {r} (trajectory indices {a}..{a + k - 1}, "
                                       f"timesteps {traj.timesteps[a].item():g}..{traj.timesteps[a + k - 1].item():g}"
                                       f" of {S})")
        cost = tables.weights[a + 1: a + k, None] * check[: k - 1] / check[k - 1].clamp(min=1e-30)
        ok = (spent + cost.cumsum(0) <= torch.tensor(allow[a + 1: a + k], dtype=torch.float64)[:, None]).all(1)
        lead = torch.tensor([int(ok.long().cumprod(0).sum())], device=x.device)
        ev.broadcast(lead)  # one decision for every rank
        lead = int(lead)
        spent += cost[:lead].sum(0)
        f = a + 1 + lead  # the newest accepted state: r_f used outputs at points whose guesses passed
        stats.accepted.append(f - a)
        stats.trace.append((a, k, f - a))
        if regs[f - a - 1] is not None:
            regs[f - a - 1](rows)
        if f == S:
            result = rows[lay.chain + S - a - 1]
            break
        k2 = width(traj, f, n)
        rows[lay.window: lay.window + k2] = rows[lay.chain + f - a - 1: lay.chain + f - a - 1 + k2]
        nr = traj.registers(f)
        rows[lay.registers: lay.registers + nr] = rows[lay.accepted: lay.accepted + nr]
        a, r = f, r + 1
    stats.estimate = float(spent.max()) if B else 0.0
    stats.phases = clock.stop()
    stats.wall_time = time.perf_counter() - t0
    stats.ideal_speedup = S / max(stats.serial_rounds, 1)
    return SampleOutput(result.clone(), stats)
