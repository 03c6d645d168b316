"""The command line: outputs, names, the run's JSON, and bad input (exit 2, one message, before any model loads,
nothing written) in one process and under torchrun; device choice; all-or-nothing writes."""
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from driffusion_rt import distributed, generate, model_ref, outputs, requests

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "driffusion_rt.generate", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **(env or {})))


def test_default_model_writes_one_digit_grid_and_the_run_json(tmp_path, capsys):
    assert generate.main(["--prompt", "0123", "--steps", "12", "--parallel", "2", "--out", str(tmp_path),
                          "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "model digits" in out and "device cpu" in out and "efficiency (ideal / measured)" in out
    png, = tmp_path.glob("*.png")
    stem = png.name[:-4]
    assert re.fullmatch(r"digits-aggressive-n2-s12-ddim-jump-float32-seed0-[0-9a-f]{8}", stem), stem
    run = json.loads((tmp_path / f"{stem}.json").read_text())
    assert f"wrote {png}" in out
    assert Image.open(png).size[0] > Image.open(png).size[1] > 0  # one row of 4 digits
    assert run["serial_rounds"] == run["serial_rounds_plan"] == 7 and run["model_evals"] == 12
    assert run["files"] == [png.name] and sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", png.name]
    # every resolved value is recorded (none left null), and the measured-versus-ideal table
    req = run["request"]
    assert req["scheduler"] == "ddim" and req["guidance_scale"] == 1.25 and req["steps"] == 12
    assert req["seed"] == 0 and req["num_images"] == 1 and req["prompt"] == "0123"
    t = run["table"]
    assert t["serial_rounds_plan"] == 7 and t["ideal_latency_s"] > 0 and 0 < t["efficiency"] <= 1.5
    assert t["ideal_latency_s"] == pytest.approx(7 * t["phases_s"]["model"] / 7)


def test_digits_num_images_means_images(tmp_path):
    """--num-images 3 with prompt 42: three PNG grids of the two digits, each from its own noise."""
    assert generate.main(["--prompt", "42", "--num-images", "3", "--steps", "6", "--out", str(tmp_path),
                          "--warmup", "0"]) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name[-6:] for p in pngs] == ["-0.png", "-1.png", "-2.png"]
    images = [Image.open(p) for p in pngs]
    assert len({im.size for im in images}) == 1 and images[0].size[0] > images[0].size[1]  # 2 digits in a row
    assert len({im.tobytes() for im in images}) == 3
    run = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert run["files"] == [p.name for p in pngs] and run["request"]["num_images"] == 3


def test_gmm_reports_plan_and_measured_rounds(tmp_path, capsys):
    assert generate.main(["--model", "gmm", "--parallel", "4", "--steps", "50", "--num-images", "2",
                          "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "serial_rounds=14" in out and "ideal_speedup=3.57x" in out and "14 / 14" in out and "50 / 50" in out
    pt, = tmp_path.glob("gmm-aggressive-n4-s50-ddim-jump-float32-seed0-*.pt")
    assert torch.load(pt).shape == (2, 4, 16, 16)


def test_conservative_plan_and_iterative_modes(tmp_path, capsys):
    assert generate.main(["--model", "gmm", "--mode", "conservative", "--parallel", "2", "--steps", "10",
                          "--show-plan", "--scheduler", "euler", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "round   3: anchor    9" in out and "serial_rounds=7" in out  # 3 rounds of 2, a final one-step round
    assert generate.main(["--model", "gmm", "--mode", "parasolver", "--window", "4", "--steps", "20",
                          "--tolerance", "0.01", "--out", str(tmp_path)]) == 0
    assert "parasolver: " in capsys.readouterr().out
    run = json.loads(next(tmp_path.glob("gmm-parasolver-*.json")).read_text())
    assert run["table"]["iterations"] >= 1 and run["sampling"]["tolerance"] == 0.01


def test_names_differ_whenever_a_setting_differs():
    ref = model_ref.inspect_model("digits")

    def stem(**changes):
        a = generate.parser().parse_args(sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in changes.items()), []))
        return generate.output_stem(a, ref, requests.parse(generate.request_spec(a), ref), 1)
    base = stem()
    assert base == stem() and base.startswith("digits-aggressive-n1-s50-ddim-jump-float32-seed0-")
    others = [stem(prompt="12"), stem(guidance_scale=2.0), stem(num_images=2), stem(seed=1), stem(drafts="extrapolate"),
              stem(scheduler="euler"), stem(dtype="float64"), stem(mode="conservative"), stem(parallel=2)]
    assert len({base, *others}) == len(others) + 1


# ------------------------------------------------------------------------------------------------ bad input

UNWRITABLE = "/proc/self/driffusion-out"  # no file can be created there, not even by root

BAD = [
    (["--parallel", "0"], "parallel=0 is out of range: allowed 1..64"),
    (["--steps", "-2"], "steps=-2 is out of range: allowed 1..200"),
    (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["--height", "64"], "height does not apply to the digits model"),
    (["--prompt", "12a"], "prompt '12a' has characters that are not digits 0-9: 'a'"),
    (["--scheduler", "flow"], "scheduler 'flow' is not available for the digits model; choose one of ddim, ddpm"),
    (["--guidance-scale", "1000"], "guidance_scale must be a number in -100..100, got 1000.0"),
    (["--seed", "-1"], "seed=-1 is out of range"),
    (["--num-images", "100000"], "num_images=100000 is out of range: allowed 1..16"),
    (["--steps", "300"], "steps=300 is out of range: allowed 1..200"),
    (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    (["--model", "gmm", "--prompt", "7"], "prompt does not apply to the gmm model"),
    (["--mode", "picard", "--subintervals", "3", "--steps", "10"], "mode='picard' is ParaSolver with subintervals"),
    (["--mode", "aggressive", "--window", "2"], "apply to modes picard and parasolver only"),
    (["--mode", "adaptive", "--window", "2"], "['window'] apply to modes picard and parasolver only, not mode='adaptive'"),
    (["--mode", "adaptive", "--drafts", "extrapolate"], "drafts='extrapolate' applies to modes aggressive and conservative"),
    (["--mode", "adaptive", "--tolerance", "-1"], "tolerance must be a number >= 0, got -1.0"),
    (["--device", "tpu"], "device 'tpu' is not one of auto, cpu, cuda or cuda:N"),
    (["--timeout", "0"], "--timeout must be > 0 seconds, got 0.0"),
    (["--model", "fixed", "--model-cost-per-row", "-0.5"], "--model-cost-per-row must be >= 0 seconds, got -0.5"),
    (["--model", "/nonexistent/model"], "model '/nonexistent/model': no such local directory"),
    (["--model", "org/model"], "as a hub id it is not in the local cache"),  # tests run with HF_HUB_OFFLINE=1
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_before_the_model_loads(args, message, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    def never(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(generate, "load_service", never)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the hub-id case: offline, whatever the environment
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        generate.main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("driffusion_rt: error:") == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_model_cost_per_row_reaches_the_fixed_cost_model(tmp_path, monkeypatch):
    seen = {}

    def load(model, device, dtype, cost, **kw):  # records the costs, then stops as bad input would
        seen.update(cost=cost, per_row=kw["cost_per_row"])
        raise requests.RequestError("stop here")
    monkeypatch.setattr(generate, "load_service", load)
    with pytest.raises(SystemExit):
        generate.main(["--model", "fixed", "--model-cost", "0.04", "--model-cost-per-row", "0.005",
                       "--out", str(tmp_path / "out")])
    assert seen == {"cost": 0.04, "per_row": 0.005}
    from driffusion_rt.services import load_service
    assert load_service("fixed", torch.device("cpu"), cost=0.04, cost_per_row=0.005).model.denoiser.per_row == 0.005


@pytest.mark.parametrize("kind", ["file", "under a file", "unwritable"])
def test_unwritable_out_exits_2_before_the_model_loads(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "load_service", lambda *a, **k: pytest.fail("the model was loaded"))
    f = tmp_path / "taken"
    f.write_text("x")
    out, message = {"file": (f, "is a file, not a directory"),
                    "under a file": (f / "sub", "cannot be created: "),
                    "unwritable": (UNWRITABLE, "cannot be created: '/proc/self' is not writable")}[kind]
    with pytest.raises(SystemExit) as e:
        generate.main(["--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("error") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and f.read_text() == "x"


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    r = run_cli("--prompt", "12a", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.strip() == \
        "driffusion_rt: error: prompt '12a' has characters that are not digits 0-9: 'a'"
    assert r.stdout == "" and not (tmp_path / "out").exists()


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """A hub that knows no model."""

    def do_GET(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "Repository not found"}')

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_hub_ids_fail_fast_saying_why(tmp_path):
    """No network (a closed port as the hub), and a hub that does not know the id; both within seconds."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        for endpoint, message in ((f"http://127.0.0.1:{closed}", "there is no network to the hub"),
                                  (f"http://127.0.0.1:{hub.server_address[1]}", "has no such model")):
            t0 = time.monotonic()
            r = run_cli("--model", "someorg/some-model", "--out", str(tmp_path / "out"),
                        env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint})
            assert r.returncode == 2 and message in r.stderr and "someorg/some-model" in r.stderr, r.stderr
            assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
            print(f"\n{message}: {time.monotonic() - t0:.1f} s (interpreter start included)")
    finally:
        hub.shutdown()


def test_a_failed_write_keeps_no_file(tmp_path, monkeypatch, capsys):
    """The JSON fails after the PNG was staged: neither is left, the run exits 1 and says so."""
    real = generate.json.dumps

    def failing(obj, **kw):
        if isinstance(obj, dict) and "table" in obj:
            raise OSError(28, "No space left on device")
        return real(obj, **kw)
    monkeypatch.setattr(generate.json, "dumps", failing)
    assert generate.main(["--prompt", "1", "--steps", "4", "--out", str(tmp_path), "--warmup", "0"]) == 1
    assert "could not write the outputs" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_write_all_is_all_or_nothing(tmp_path):
    (tmp_path / "b").write_bytes(b"old")

    def boom(f):
        raise OSError("disk full")
    with pytest.raises(OSError):
        outputs.write_all([(tmp_path / "a", lambda f: f.write(b"a")), (tmp_path / "c", boom)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    # a rename that fails (the target is a directory) after another file was placed: that one is removed too
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        outputs.write_all([(tmp_path / "a", lambda f: f.write(b"a")), (tmp_path / "d", lambda f: f.write(b"d"))])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "d"]
    assert outputs.write_all([(tmp_path / "a", lambda f: f.write(b"1")), (tmp_path / "b", lambda f: f.write(b"2"))])
    assert (tmp_path / "a").read_bytes() == b"1" and (tmp_path / "b").read_bytes() == b"2"


def test_help_documents_every_flag():
    text = generate.parser().format_help()
    for flag in ("--model", "--prompt", "--negative-prompt", "--steps", "--guidance-scale", "--height", "--width",
                 "--seed", "--num-images", "--scheduler", "--mode", "--parallel", "--out", "--dtype", "--drafts",
                 "--timeout", "--load-timeout", "--device", "--no-cuda-graphs", "--tolerance", "--window",
                 "--max-steps", "--max-images", "--max-side", "--max-prompt-chars", "--max-parallel"):
        assert flag in text


# ------------------------------------------------------------------------------------------------ devices


class _FakeCuda:
    """torch.cuda as a machine with `n` GPUs shows it (only what device selection reads)."""

    def __init__(self, n):
        self.n, self.current = n, 0

    def is_available(self):
        return self.n > 0

    def device_count(self):
        return self.n

    def current_device(self):
        return self.current

    def set_device(self, d):
        self.current = d.index if isinstance(d, torch.device) else int(d)


@pytest.mark.parametrize("gpus,spec,expect", [
    (0, "auto", "cpu"), (0, "cpu", "cpu"), (2, "auto", "cuda:0"), (2, "cuda", "cuda:0"), (2, "cuda:1", "cuda:1"),
    (2, "cpu", "cpu"), (0, "cuda", "CUDA is not available"), (2, "cuda:5", "only 2 CUDA device(s) are visible"),
])
def test_one_process_uses_cuda_when_available(gpus, spec, expect, monkeypatch):
    fake = _FakeCuda(gpus)
    for name in ("is_available", "device_count", "current_device", "set_device"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    if ":" in expect or expect == "cpu":
        assert str(distributed.pick_device(spec)) == expect
        if expect.startswith("cuda:"):
            assert fake.current == int(expect[5:])  # the chosen GPU is the current device
    else:
        with pytest.raises(ValueError, match=re.escape(expect)):
            distributed.pick_device(spec)


@pytest.mark.parametrize("gpus,spec,local_rank,expect", [
    (0, "auto", 1, ("cpu", "gloo")), (4, "auto", 1, ("cuda:1", "nccl")), (4, "cuda", 3, ("cuda:3", "nccl")),
    (4, "cpu", 1, ("cpu", "gloo")), (4, "cuda:2", 1, "every rank uses cuda:LOCAL_RANK"),
    (1, "auto", 1, "NCCL cannot share a device"),
])
def test_a_torchrun_rank_uses_its_local_gpu(gpus, spec, local_rank, expect, monkeypatch):
    fake = _FakeCuda(gpus)
    for name in ("is_available", "device_count"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    if isinstance(expect, tuple):
        dev, backend = distributed.rank_device(spec, local_rank)
        assert (str(dev), backend) == expect
    else:
        with pytest.raises(ValueError, match=re.escape(expect)):
            distributed.rank_device(spec, local_rank)


# ------------------------------------------------------------------------------------------------ torchrun

TORCHRUN_BAD = [
    (["--prompt", "12a"], "prompt '12a' has characters that are not digits 0-9: 'a'"),  # rank 0's verdict
    (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),                    # every rank's parser
    (["--num-images", "100000"], "num_images=100000 is out of range: allowed 1..16"),
    (["--out", "/etc/hostname"], "--out '/etc/hostname' is a file, not a directory"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,message", TORCHRUN_BAD, ids=[" ".join(a) for a, _ in TORCHRUN_BAD])
def test_bad_input_under_torchrun_is_reported_once(args, message, tmp_path):
    marker = tmp_path / "loaded"
    out = ["--out", str(tmp_path / "out")] if "--out" not in args else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, "cli",
           str(marker), "--", *args, *out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    text = r.stdout + r.stderr
    assert r.returncode != 0 and text.count(message) == 1 and text.count("driffusion_rt: error:") == 1, text[-3000:]
    # the first rank to leave exited with status 2 (torchrun's root cause) and the other with 2 too, or by the
    # SIGTERM torchrun sends once one rank has exited; no rank printed a traceback; no model was loaded
    codes = re.findall(r"exitcode\s+: (-?\d+) ", text)
    assert len(codes) == 2 and codes[-1] == "2" and set(codes) <= {"2", "-15"}, text[-3000:]
    assert text.count("Traceback (most recent call last)") <= 1  # torchrun's own ChildFailedError, if any
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_request_only_the_loaded_model_can_refuse_exits_2_with_one_message(tmp_path, monkeypatch, capsys):
    """A scheduler the runtime cannot run (the trajectory probe fails) is known once the request is built after
    loading: still bad input, status 2, one message, nothing written."""
    from driffusion_rt.trajectory import Trajectory, UnsupportedScheduler

    def unsupported(*a, **k):
        raise UnsupportedScheduler("SomeScheduler could not be probed as an affine sampler")
    monkeypatch.setattr(Trajectory, "from_scheduler", unsupported)
    with pytest.raises(SystemExit) as e:
        generate.main(["--prompt", "1", "--steps", "4", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == "driffusion_rt: error: SomeScheduler could not be probed as an " \
                                               "affine sampler", err
    assert not (tmp_path / "out").exists()
