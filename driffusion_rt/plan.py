"""Round plans: a pure function (mode, S, n) -> the rounds a draft-and-refine run executes (docs/design.md section 2).

A round at anchor i advances the trajectory to i + advance. Its model work is, in order:
  1. the anchor evaluation o_i = model(x_i), if `eval_anchor` (one serial model round);
  2. the drafts x^d_j for j in `drafts`, all evaluated in parallel (one serial model round).
The refine uses o_i and the outputs of drafts i+1 .. i+advance-1; in aggressive mode the output of draft
`carry` = i+advance is not used by this round but becomes the next anchor's output.
"""
from dataclasses import dataclass

MODES = ("sequential", "aggressive", "conservative")


@dataclass(frozen=True)
class Round:
    anchor: int
    eval_anchor: bool
    drafts: tuple
    advance: int
    carry: int | None = None

    @property
    def serial(self) -> int:
        """Serial model rounds on the critical path of this round (0, 1 or 2)."""
        return int(self.eval_anchor) + int(bool(self.drafts))

    @property
    def evals(self) -> int:
        return int(self.eval_anchor) + len(self.drafts)


@dataclass(frozen=True)
class Plan:
    mode: str
    steps: int
    parallel: int
    rounds: tuple

    @property
    def serial_rounds(self) -> int:
        """The critical path: model calls that must happen one after another."""
        return sum(r.serial for r in self.rounds)

    @property
    def model_evals(self) -> int:
        return sum(r.evals for r in self.rounds)

    @property
    def ideal_speedup(self) -> float:
        """Sequential serial rounds (S) over this plan's, i.e. the speedup if only model calls cost time."""
        return self.steps / self.serial_rounds

    def describe(self) -> str:
        lines = [f"plan: mode={self.mode} steps={self.steps} parallel={self.parallel} rounds={len(self.rounds)} "
                 f"serial_rounds={self.serial_rounds} model_evals={self.model_evals} "
                 f"ideal_speedup={self.ideal_speedup:.2f}x"]
        for k, r in enumerate(self.rounds):
            d = f"{r.drafts[0]}..{r.drafts[-1]}" if r.drafts else "-"
            lines.append(f"  round {k:3d}: anchor {r.anchor:4d} eval_anchor={int(r.eval_anchor)} drafts {d:>9} "
                         f"-> x_{r.anchor + r.advance}" + (f" carry o_{r.carry}" if r.carry is not None else ""))
        return "\n".join(lines)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def make_plan(mode: str, steps: int, parallel: int) -> Plan:
    """The rounds of a run of `steps` steps with `parallel` model evaluations per parallel round."""
    check_mode(mode)
    for name, v in (("steps", steps), ("parallel", parallel)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    S, n, rounds, i = steps, parallel, [], 0
    if mode == "sequential":
        rounds = [Round(i, True, (), 1) for i in range(S)]
    elif mode == "aggressive":
        # Only round 0 evaluates its anchor; later anchors reuse the carried output of the last draft.
        while i < S:
            m = min(n, S - i)
            drafts = tuple(range(i + 1, min(i + n, S - 1) + 1))
            carry = i + m if i + m < S else None
            rounds.append(Round(i, i == 0, drafts, m, carry))
            i += m
    else:  # conservative: every anchor is evaluated on a refined state, then n drafts beyond it
        while i < S:
            m = min(n + 1, S - i)
            rounds.append(Round(i, True, tuple(range(i + 1, i + m)), m))
            i += m
    return Plan(mode, S, n, tuple(rounds))
