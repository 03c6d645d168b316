"""ParaSolver (papers/parasolver.md) and Picard iteration (as in ParaDiGMS, with another tolerance scale:
docs/iterative.md) on the runtime's evaluator.

The S-step trajectory is cut into N subintervals at boundaries b_0 = 0 < ... < b_N = S; Phi_n(X) runs the
sequential sampler from index b_n to b_{n+1}. A sliding window of p boundaries is solved by the Jacobian-free
Newton iteration of the paper (its Eq. 13):

    Delta_i = Phi_i(X_i) - X_i,   X_{i+1} <- X_{n0} + sum_{j=n0..i} Delta_j        for i in the window,

and the window slides past the leading points that changed by less than the tolerance (Eq. 14):
(1/D) ||X_i(new) - X_i(old)||^2 <= tolerance^2 sigma_i^2. N = S is Picard iteration; N = 1 is sequential.
The Phi_i of a window run side by side: each sub-step is one evaluator round of width <= p.
Multistep schedulers carry registers (trajectory.py): the Newton update acts on the samples, and each boundary's
registers are the ones Phi leaves there, so a converged point is exact and tolerance 0 reproduces the sequential
sampler. Every rank keeps the same states (the outputs are all-gathered); rank 0's stride decision is broadcast.
"""
import time
from dataclasses import dataclass, field

import torch

from .evaluator import ModelCall
from .noise import draw_noise, replica_generator
from .options import IterativeConfig
from .results import Cancelled, Clock, NonFiniteOutputError, SampleOutput, SampleStats
from .trajectory import Trajectory


@dataclass
class IterativeStats(SampleStats):
    iterations: int = 0
    trace: list = field(default_factory=list)  # per iteration: (window start n0, width p, stride)


def boundaries(steps: int, n: int) -> list:
    """b_0 = 0 < ... < b_n = steps with subinterval lengths differing by at most one."""
    return [i * steps // n for i in range(n + 1)]


@torch.no_grad()
def run(ev, model, traj: Trajectory, x: torch.Tensor, mode: str, parallel: int, cfg: IterativeConfig,
        generator=None, model_kwargs=None, cancel=None) -> SampleOutput:
    """Sample `traj` from unit noise x with the iterative mode `mode` on evaluator `ev` (every rank calls this with
    the same arguments); cancel: as in Sampler.run."""
    S = traj.steps
    t0, clock = time.perf_counter(), Clock(x.device)
    stats = IterativeStats(mode, S, parallel)
    call = ModelCall(model, traj, x, model_kwargs)
    b = boundaries(S, cfg.subintervals)
    N = cfg.subintervals
    dims = tuple(range(2, x.dim() + 1))  # per-sample dims of a [points, B, ...] tensor
    sigma2 = traj.sigma.to(x.device, torch.float64) ** 2

    # The noise of every stochastic step, drawn up front in the sequential sampler's order, the same on every rank.
    Z = torch.empty(traj.draws, *x.shape, dtype=x.dtype, device=x.device)
    if traj.draws:
        gen = replica_generator(ev, generator, x.device)
        for q in range(traj.draws):
            draw_noise(Z[q], gen, traj.draw_dtypes[q])

    rows = torch.empty(ev.world * ev.chunk(cfg.window), *x.shape, dtype=x.dtype, device=x.device)

    def evaluate(states, idx):
        """Model outputs [k, B, ...] of k points; rank r evaluates slots [r*c, (r+1)*c), then all-gather."""
        if cancel is not None and ev.agree(cancel.is_set()):  # every rank stops at the same round
            raise Cancelled(f"cancelled after {stats.serial_rounds} rounds")
        k = len(idx)
        c = ev.chunk(k)
        gathered = rows[: ev.world * c]
        send = ev.send_buffer(gathered)
        own = idx[ev.rank * c: ev.rank * c + c]
        clock.start("model")
        if own:
            ev.call(call, states[ev.rank * c: ev.rank * c + len(own)], tuple(own), send[: len(own)])
        clock.start("comm")
        ev.gather(gathered, send)
        clock.start("refine")  # until the next model call: the iteration's own updates
        stats.serial_rounds += 1
        stats.model_evals += k
        stats.batch_widths.append(k)
        return gathered[:k]

    def step(j, y, o, h):
        m = traj.maps[j]
        return traj.apply(j, y, o, h, Z[m.first_draw: m.first_draw + m.draws])

    X = torch.empty(N + 1, *x.shape, dtype=x.dtype, device=x.device)
    H = [[] for _ in range(N + 1)]  # the registers at each boundary
    X[0] = x * traj.init_noise_sigma
    # Preconditioning: the first M subintervals sequentially; the last (state, output, registers) predicts x0.
    y, h, latest = X[0].clone(), [], None
    for j in range(b[cfg.preconditioning]):
        o = evaluate(y.unsqueeze(0), (j,))[0].clone()
        latest = (y, o, h, j)
        y, h = step(j, y, o, h)
        if j + 1 in b:
            X[b.index(j + 1)], H[b.index(j + 1)] = y, h

    def initialise(points):
        """Later boundaries start on the scheduler's chain from the latest evaluated point with its output held
        (through the latest clean-sample prediction; the paper's initialisation), noise included."""
        for n in points:
            if latest is None:  # nothing evaluated yet: every point starts at the initial state (ParaDiGMS)
                X[n], H[n] = X[0], [torch.zeros_like(x) for _ in range(traj.registers(b[n]))]
                continue
            ys, os_, hs, j = latest
            (w,), regs = traj.express(j, [b[n]], output=lambda l: {"o": 1.0}, registers_at=b[n])
            value = lambda terms: sum(c * _symbol(k, ys, os_, hs, Z) for k, c in terms.items())  # noqa: E731
            X[n], H[n] = value(w), [value(r) for r in regs]

    n0 = cfg.preconditioning
    initialise(range(n0 + 1, min(n0 + cfg.window, N) + 1))
    while n0 < N:
        p = min(cfg.window, N - n0)
        pts = list(range(n0, n0 + p))
        lens = [b[i + 1] - b[i] for i in pts]
        Y = X[n0: n0 + p].clone()
        HY = [list(H[i]) for i in pts]
        for s in range(max(lens)):  # the p subproblems side by side, one evaluator round per sub-step
            active = [q for q in range(p) if s < lens[q]]
            idx = tuple(b[pts[q]] + s for q in active)
            outs = evaluate(Y[active], idx)
            last = active[-1]
            latest = (Y[last].clone(), outs[-1].clone(), list(HY[last]), idx[-1])
            for q, j, o in zip(active, idx, outs):
                Y[q], HY[q] = step(j, Y[q], o, HY[q])
        new = X[n0] + torch.cumsum(Y - X[n0: n0 + p], dim=0)  # Eq. 13: X_{i+1} = X_{n0} + sum Delta_j
        if not torch.isfinite(new).all():
            raise NonFiniteOutputError(f"non-finite state in iteration {stats.iterations} "
                                       f"(window of boundaries {n0}..{n0 + p - 1}, trajectory indices {b[n0]}..{b[n0 + p]})")
        err = ((new - X[n0 + 1: n0 + p + 1]) ** 2).mean(dim=dims).to(torch.float64)  # [p, B]
        ok = (err <= cfg.tolerance ** 2 * sigma2[[b[i + 1] for i in pts]][:, None]).all(dim=1)
        X[n0 + 1: n0 + p + 1] = new
        for q in range(p):
            H[n0 + 1 + q] = HY[q]
        ok[0] = True  # X_{n0+1} = Phi(X_{n0}) from a converged point: exact
        stride = torch.tensor([int(ok.long().cumprod(0).sum())], device=x.device)
        ev.broadcast(stride)  # one decision for every rank
        stride = int(stride)
        stats.iterations += 1
        stats.trace.append((n0, p, stride))
        old_end = n0 + p
        n0 += stride
        initialise(range(old_end + 1, min(n0 + cfg.window, N) + 1))
    stats.phases = clock.stop()
    stats.wall_time = time.perf_counter() - t0
    stats.ideal_speedup = S / max(stats.serial_rounds, 1)
    return SampleOutput(X[N].clone(), stats)


def _symbol(name, y, o, h, Z):
    """The tensor an express() symbol stands for at the latest evaluated point."""
    if name == "o":
        return o
    kind, k = name
    return {"x": lambda: y, "h": lambda: h[k], "z": lambda: Z[k]}[kind]()
