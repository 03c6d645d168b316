"""The command line on one process (the torchrun runs are in test_distributed.py)."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from driffusion_rt import generate


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "driffusion_rt.generate", *args], capture_output=True, text=True,
                          timeout=300)


def test_default_model_writes_one_digit_grid_and_the_run_json(tmp_path, capsys):
    assert generate.main(["--prompt", "0123", "--steps", "12", "--parallel", "2", "--out", str(tmp_path),
                          "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "model digits" in out and "efficiency (ideal / measured)" in out
    png = tmp_path / "digits-aggressive-n2-s12-seed0.png"
    run = json.loads((tmp_path / "digits-aggressive-n2-s12-seed0.json").read_text())
    assert f"wrote {png}" in out
    assert Image.open(png).size[0] > Image.open(png).size[1] > 0  # one row of 4 digits
    assert run["serial_rounds"] == run["serial_rounds_plan"] == 7 and run["model_evals"] == 12
    assert run["files"] == [png.name]


def test_gmm_reports_plan_and_measured_rounds(tmp_path, capsys):
    assert generate.main(["--model", "gmm", "--parallel", "4", "--steps", "50", "--num-images", "2",
                          "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "serial_rounds=14" in out and "ideal_speedup=3.57x" in out and "14 / 14" in out and "50 / 50" in out
    assert (tmp_path / "gmm-aggressive-n4-s50-seed0.pt").exists()


def test_conservative_plan_and_iterative_modes(tmp_path, capsys):
    assert generate.main(["--model", "gmm", "--mode", "conservative", "--parallel", "2", "--steps", "10",
                          "--show-plan", "--scheduler", "euler", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "round   3: anchor    9" in out and "serial_rounds=7" in out  # 3 rounds of 2, a final one-step round
    assert generate.main(["--model", "gmm", "--mode", "parasolver", "--window", "4", "--steps", "20",
                          "--tolerance", "0.01", "--out", str(tmp_path)]) == 0
    assert "parasolver: " in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--parallel", "0"], "--parallel must be >= 1, got 0"),
    (["--steps", "-2"], "--steps must be >= 1, got -2"),
    (["--mode", "fast"], "invalid choice: 'fast'"),
    (["--height", "64"], "--height, --width and --negative-prompt apply to diffusers pipelines"),
    (["--prompt", "12a"], "prompt '12a' has characters that are not digits 0-9: 'a'"),
    (["--scheduler", "flow"], "scheduler 'flow' is not available for the digits model; choose one of ddim, ddpm, euler"),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_input_exits_2_with_a_clear_message_and_no_output(args, message, tmp_path):
    r = run_cli(*args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_help_documents_every_flag():
    text = generate.parser().format_help()
    for flag in ("--model", "--prompt", "--negative-prompt", "--steps", "--guidance-scale", "--height", "--width",
                 "--seed", "--num-images", "--scheduler", "--mode", "--parallel", "--out", "--dtype", "--drafts",
                 "--timeout", "--no-cuda-graphs", "--tolerance", "--window"):
        assert flag in text
