"""Round plans: exact critical paths and structure (docs/design.md section 2)."""
import pytest

from driffusion_rt import make_plan


@pytest.mark.parametrize("steps,n,aggressive,conservative", [
    (50, 4, 14, 20), (50, 2, 26, 34), (28, 4, 8, 12), (50, 1, 50, 50), (1, 4, 1, 1), (2, 8, 2, 2), (5, 2, 3, 4),
])
def test_critical_paths(steps, n, aggressive, conservative):
    a, c = make_plan("aggressive", steps, n), make_plan("conservative", steps, n)
    assert (a.serial_rounds, c.serial_rounds) == (aggressive, conservative)
    assert a.model_evals == c.model_evals == steps
    assert a.ideal_speedup == pytest.approx(steps / aggressive)


def test_sequential_plan():
    p = make_plan("sequential", 7, 4)
    assert p.serial_rounds == p.model_evals == 7
    assert [(r.anchor, r.eval_anchor, r.drafts, r.advance) for r in p.rounds] == [(i, True, (), 1) for i in range(7)]


@pytest.mark.parametrize("mode", ["aggressive", "conservative"])
@pytest.mark.parametrize("steps,n", [(50, 4), (28, 3), (9, 8), (1, 1), (17, 2)])
def test_rounds_tile_the_trajectory(mode, steps, n):
    p = make_plan(mode, steps, n)
    i = 0
    for k, r in enumerate(p.rounds):
        assert r.anchor == i and r.advance >= 1
        assert len(r.drafts) <= n and all(i < j < steps for j in r.drafts)
        assert r.drafts == tuple(range(i + 1, i + 1 + len(r.drafts)))
        if mode == "aggressive":
            assert r.eval_anchor == (k == 0)
            # the refine needs outputs i+1..i+m-1; the carried draft i+m is the next anchor's output
            assert r.drafts[: r.advance - 1] == tuple(range(i + 1, i + r.advance))
            assert r.carry == (i + r.advance if i + r.advance < steps else None)
            assert r.carry is None or r.carry in r.drafts
        else:
            assert r.eval_anchor and r.carry is None and len(r.drafts) == r.advance - 1
        i += r.advance
    assert i == steps


def test_plan_describe_reports_the_critical_path():
    text = make_plan("aggressive", 50, 4).describe()
    assert "serial_rounds=14" in text and "ideal_speedup=3.57x" in text and "round  12" in text


@pytest.mark.parametrize("args,message", [
    (("turbo", 10, 2), "unknown mode 'turbo'; choose one of sequential, aggressive, conservative"),
    (("aggressive", 0, 2), "steps must be an integer >= 1, got 0"),
    (("aggressive", 10, 0), "parallel must be an integer >= 1, got 0"),
    (("conservative", 10, -1), "parallel must be an integer >= 1, got -1"),
    (("conservative", 10, 2.0), "parallel must be an integer >= 1, got 2.0"),
])
def test_bad_plans(args, message):
    with pytest.raises(ValueError, match=message):
        make_plan(*args)
