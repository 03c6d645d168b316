"""The command line on one process (no torchrun)."""
import subprocess
import sys

import pytest

from driffusion_rt import generate


def test_generate_reports_plan_and_measured_rounds(capsys):
    assert generate.main(["--parallel", "4", "--steps", "50", "--num-images", "2"]) == 0
    out = capsys.readouterr().out
    assert "serial_rounds=14" in out and "ideal_speedup=3.57x" in out
    assert "serial model rounds (plan / measured)" in out and "14 / 14" in out and "50 / 50" in out


def test_generate_conservative_with_plan(capsys):
    assert generate.main(["--mode", "conservative", "--parallel", "2", "--steps", "10", "--show-plan",
                          "--scheduler", "euler"]) == 0
    out = capsys.readouterr().out
    assert "round   3: anchor    9" in out and "serial_rounds=7" in out  # 3 rounds of 2, a final one-step round


@pytest.mark.parametrize("args,message", [
    (["--parallel", "0"], "--parallel must be >= 1, got 0"),
    (["--steps", "-2"], "--steps must be >= 1, got -2"),
    (["--mode", "fast"], "invalid choice: 'fast'"),
])
def test_generate_rejects_bad_flags(args, message):
    r = subprocess.run([sys.executable, "-m", "driffusion_rt.generate", *args], capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and r.stdout == ""


def test_help_documents_every_flag():
    text = generate.parser().format_help()
    for flag in ("--mode", "--parallel", "--steps", "--scheduler", "--seed", "--num-images", "--show-plan"):
        assert flag in text
