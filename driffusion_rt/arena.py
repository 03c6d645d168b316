"""A run's rows and the tables that combine them (docs/design.md section 3).

All rows of a request live in one buffer, the arena [rows, B, ...]: two anchor blocks used in turn (x, o, prev,
registers; a round reads one and writes the other), the round's noise draws, a rank's drafts and the gathered
outputs (`Rows` numbers them). Every draft and every refine is one `kernels.combine` call whose row numbers and
weights (`RoundTable`) are built once per (trajectory, plan, draft rule) from rounds.py, for every rank of the
draft dim: rank r drafts the slots [r c, (r + 1) c) of a round of k drafts, c = ceil(k / world).

An `ArenaPool` keeps arenas across requests: a run takes one that fits and gives it back when it ends, so runs that
are in flight together (step-level batching) each hold their own, and nothing is allocated per round.
"""
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .noise import PinnedStage
from .plan import Plan
from .rounds import round_weights
from .trajectory import Trajectory


class LRU(OrderedDict):
    """A small least-recently-used cache: a long-lived server sees many shapes and step counts."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __getitem__(self, key):
        self.move_to_end(key)
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


@dataclass(frozen=True)
class Rows:
    """Row numbers of the arena for a plan: block b's x, o, prev and registers; noise; drafts; gathered outputs."""
    registers: int
    noise: int        # first noise row
    drafts: int       # first row of this rank's drafts
    gathered: int     # first row of the gathered outputs (world * chunk rows)
    rows: int         # total

    def block(self, b: int) -> int:
        return b * (3 + self.registers)

    @classmethod
    def make(cls, registers, noise_rows, chunk, world):
        noise = 2 * (3 + registers)
        drafts = noise + noise_rows
        gathered = drafts + chunk
        return cls(registers, noise, drafts, gathered, gathered + world * chunk)


@dataclass(frozen=True)
class Table:
    """One combine call: rows written, rows read, weights [written, read] (on the device)."""
    out: torch.Tensor
    inp: torch.Tensor
    coef: torch.Tensor


@dataclass(frozen=True)
class RoundTable:
    draft: Table | None     # the rank's drafts (None: no draft of its own this round)
    refine: Table           # the same on every rank
    own: tuple              # the rank's draft indices
    chunk: int              # draft slots per rank this round
    noise: range            # the scheduler's draws this round
    block: int              # the anchor block read (0 or 1); the refine writes the other
    eval_offset: int        # index of the round's first model evaluation (for error reports)


def _row(name, lay: Rows, block: int, anchor: int) -> int:
    base = lay.block(block)
    if name == "x":
        return base
    if name == "o":
        return base + 1
    if name == "prev":
        return base + 2
    kind, k = name
    if kind == "h":
        return base + 3 + k
    if kind == "z":
        return lay.noise + k
    return lay.gathered + (k - anchor - 1)  # ("d", j): slot s holds draft anchor + 1 + s


def _table(terms: list, lay, block, anchor, out_rows, device, acc) -> Table:
    names = sorted({k for t in terms for k in t}, key=repr)
    coef = torch.tensor([[t.get(n, 0.0) for n in names] for t in terms], dtype=torch.float64)
    rows = [_row(n, lay, block, anchor) for n in names]
    return Table(torch.tensor(out_rows, dtype=torch.long, device=device),
                 torch.tensor(rows, dtype=torch.long, device=device), coef.to(device, acc))


def chunk(k: int, world: int) -> int:
    """Slots per rank for a round of k points over `world` ranks (equal chunks, so an all-gather concatenates them)."""
    return -(-k // world)


def round_tables(traj: Trajectory, plan: Plan, rule: str, world: int, device, acc) -> tuple:
    """(Rows, tables) of `plan` over `world` draft ranks: tables[rank][round] holds the rows and weights of that rank's
    drafts and of the refine (one Table shared by every rank)."""
    weights = round_weights(traj, plan, rule)
    width = max([chunk(len(r.drafts), world) for r in plan.rounds if r.drafts] + [0])
    lay = Rows.make(max(traj.registers(r.anchor + r.advance) for r in plan.rounds) if plan.rounds else 0,
                    max(len(w.noise) for w in weights), width, world)
    tables, offset = [[] for _ in range(world)], 0
    for r, (rnd, w) in enumerate(zip(plan.rounds, weights)):
        b, k = r % 2, len(rnd.drafts)
        c = chunk(k, world) if k else 0
        outs = list(w.refine)
        refine = _table([w.refine[o] for o in outs], lay, b, rnd.anchor, [_row(o, lay, 1 - b, 0) for o in outs],
                        device, acc)
        for rank in range(world):
            lo = rank * c
            own = rnd.drafts[lo: lo + c]
            draft = None
            if own:
                draft = _table(list(w.drafts[lo: lo + len(own)]), lay, b, rnd.anchor,
                               list(range(lay.drafts, lay.drafts + len(own))), device, acc)
            tables[rank].append(RoundTable(draft, refine, own, c, w.noise, b, offset))
        offset += rnd.evals
    return lay, tables


class Arena:
    """The rows of a request [rows, B, ...] on the latent's device, with page-locked noise staging and result
    rows for CUDA latents."""

    def __init__(self, latent: torch.Tensor, rows: int, evals: int, noise_rows: int):
        kw = dict(device=latent.device, dtype=latent.dtype)
        self.key = (tuple(latent.shape), latent.dtype, latent.device)
        self.rows = torch.empty(rows, *latent.shape, **kw)
        self.flags = torch.empty(max(evals, 1), device=latent.device, dtype=torch.float32)
        self.stages, self.noise_rows, self.result = {}, noise_rows, None
        if latent.is_cuda:
            self.result = torch.empty(latent.shape, dtype=latent.dtype, pin_memory=True)

    def fits(self, rows, evals, noise_rows) -> bool:
        return self.rows.shape[0] >= rows and self.flags.shape[0] >= evals and self.noise_rows >= noise_rows

    def stage(self, dtype) -> PinnedStage:
        if dtype not in self.stages:
            self.stages[dtype] = PinnedStage(max(self.noise_rows, 1), self.rows.shape[1:], dtype)
        return self.stages[dtype]


class ArenaPool:
    """Idle arenas by (latent shape, dtype, device): `take` hands out one that fits (or a new one), `give` takes it
    back. At most `keep` idle arenas per key and `keys` keys are kept (least recently used dropped), so memory is
    bounded by the runs in flight plus the idle ones."""

    def __init__(self, keys: int = 8, keep: int = 4):
        self.idle, self.keep = LRU(keys), keep

    def take(self, x: torch.Tensor, lay: Rows, evals: int) -> Arena:
        key = (tuple(x.shape), x.dtype, x.device)
        free = self.idle.get(key, [])
        noise_rows = lay.drafts - lay.noise
        for k in range(len(free) - 1, -1, -1):  # the most recently given back first
            if free[k].fits(lay.rows, evals, noise_rows):
                return free.pop(k)
        if free:
            free.pop(0)  # an idle arena too small for this plan: drop it rather than keep both
        return Arena(x, lay.rows, evals, noise_rows)

    def give(self, arena: Arena):
        free = self.idle.get(arena.key)
        if free is None:
            free = self.idle[arena.key] = []
        free.append(arena)
        del free[: -self.keep]
