"""The benchmark scripts run end to end on a CPU and write the results they document (timings are not checked)."""
import csv
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # benchmarks time the real CPU path, not the interpreter
    return subprocess.run([sys.executable, os.path.join(ROOT, "perf", script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_bench_latency_writes_rows_with_the_documented_fields(tmp_path):
    r = run("bench_latency.py", "--model", "fixed", "--modes", "aggressive", "conservative", "--parallel", "2",
            "--out", str(tmp_path), "--steps", "6", "--repeats", "1", "--warmup", "0", "--model-cost", "0.005")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no GPU" in r.stdout and "| fixed | aggressive | 2 |" in r.stdout
    rows = json.loads((tmp_path / "latency.json").read_text())["rows"]
    assert {(row["mode"], row["parallel"]) for row in rows} == {("sequential", 1), ("aggressive", 2),
                                                                 ("conservative", 2)}
    for row in rows:
        for key in ("mode", "parallel", "model", "latency_s", "speedup", "ideal_speedup", "efficiency",
                    "overhead_ms_per_serial_round", "comm_ms_per_round", "draft_ms_per_round"):
            assert key in row, key
        assert row["latency_s"] > 0 and row["efficiency"] > 0
    agg = next(row for row in rows if row["mode"] == "aggressive")
    assert agg["serial_rounds"] == 4 and agg["ideal_speedup"] == pytest.approx(6 / 4)
    assert len(list(csv.DictReader((tmp_path / "latency.csv").open()))) == 3
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_bench_kernels_on_cpu_times_the_fallback_only(tmp_path):
    r = run("bench_kernels.py", "--sizes", "1x4x8x8", "--k", "2", "--m", "2", "--repeats", "2", "--warmup", "1",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NOT performance numbers" in r.stdout
    assert list(tmp_path.glob("bench_kernels_cpu_*.json")) and list(tmp_path.glob("bench_kernels_cpu_*.csv"))


def test_bench_drafts_table(tmp_path):
    r = run("bench_drafts.py", "--steps", "10", "--parallel", "2", "--samples", "2", "--components", "2",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "drafts.json").read_text())["rows"]
    assert len(rows) == 5 * 2 and all(row["jump"] > 0 for row in rows)
    ddpm = [row for row in rows if row["scheduler"].startswith("DDPM")]
    assert all(row["ratio"] == 1.0 for row in ddpm)  # stochastic steps: extrapolation falls back to jumps
    assert "| DDIM epsilon | aggressive |" in (tmp_path / "drafts.md").read_text()
