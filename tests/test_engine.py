"""The persistent engine on 2 gloo ranks: request isolation, determinism, memory, HTTP, and dead workers."""
import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "engine_worker.py")
sys.path.insert(0, HERE)
from engine_worker import REQUESTS  # noqa: E402


def torchrun(*args, timeout=600, env=None, background=False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return r, time.monotonic() - t0


INVALID = {1: "width does not apply to the digits model", 3: "steps=0 is out of range: allowed 1..200",
           4: "unknown mode 'turbo'; choose one of", 5: "the prompt names no digits",
           6: "num_images=50 is out of range: allowed 1..16", 7: "non-finite model output in round",
           12: "prompt 'x1' has characters that are not digits 0-9: 'x'", 14: "unknown request field(s) ['unknown_field']",
           16: "scheduler 'flow' is not available for the digits model", 18: "steps=100000 is out of range"}


@pytest.mark.slow
def test_twenty_mixed_requests(tmp_path):
    r, _ = torchrun(WORKER, "requests", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == len(REQUESTS) + 1 and rows[-1] == {"still_serving": True}
    for row in rows[:-1]:
        k = row["index"]
        if k in INVALID:
            assert not row["ok"] and INVALID[k] in row["error"], row
        else:
            assert row["ok"], row
    # every rank sampled exactly the valid requests (the invalid ones never left rank 0; the NaN one failed on both)
    valid = len(REQUESTS) - len(INVALID) + 1
    assert json.loads((tmp_path / "rank1.json").read_text())["served"] == valid
    # determinism: the same request twice gives the same latent, bit for bit
    assert torch.equal(torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "8.pt"))
    # and equals the one-shot command line for the same request
    for k, args in ((0, ["--prompt", "0123", "--steps", "10", "--parallel", "2", "--seed", "1"]),
                    (2, ["--prompt", "42", "--steps", "12", "--mode", "conservative", "--parallel", "2", "--seed", "2"])):
        out = tmp_path / f"oneshot{k}"
        g = subprocess.run([sys.executable, "-m", "driffusion_rt.generate", *args, "--out", str(out), "--warmup", "0"],
                           capture_output=True, text=True, timeout=300)
        assert g.returncode == 0, g.stderr[-2000:]
        png = next(out.glob("*.png"))
        a, b = np.asarray(Image.open(png), dtype=int), np.asarray(Image.open(tmp_path / f"{k}.png"), dtype=int)
        assert a.shape == b.shape and np.abs(a - b).max() <= 1  # local vs 2 ranks: float rounding only


@pytest.mark.slow
def test_memory_does_not_grow_per_request(tmp_path):
    r, _ = torchrun(WORKER, "memory", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        marks = json.loads((tmp_path / f"rss{rank}.json").read_text())
        after10, after50 = marks["10"], marks["50"]
        print(f"\nrank {rank}: RSS {after10:.1f} MB after 10 requests, {after50:.1f} MB after 50")
        assert after50 <= after10 * 1.05


@pytest.mark.slow
@pytest.mark.parametrize("when", ["idle", "request"])
def test_dead_worker_is_reported_and_the_job_exits(when):
    timeout = 10
    r, took = torchrun(WORKER, "die", when, env={"ENGINE_TIMEOUT": str(timeout)})
    assert r.returncode != 0
    assert took < timeout + 30  # start-up of two ranks and the model load included
    text = r.stdout + r.stderr
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: 19", text), text[-3000:]
    assert "driffusion_rt engine: rank 0:" in text and "another rank is hung or has died" in text


def post(port, body: dict, timeout=120):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.mark.slow
def test_http_over_loopback(tmp_path):
    port_file = tmp_path / "port"
    proc = torchrun("-m", "driffusion_rt.serve", "--port", "0", "--port-file", str(port_file), "--max-requests", "3",
                    background=True)
    try:
        for _ in range(300):
            if port_file.exists() and port_file.read_text():
                break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        port = int(port_file.read_text())
        status, headers, body = post(port, {"prompt": "2026", "steps": 10, "parallel": 2})
        assert status == 200 and headers["Content-Type"] == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
        assert headers["X-Driffusion-serial-rounds"] == "6"
        status, _, body = post(port, {"prompt": "7", "steps": 10, "response": "base64"})
        data = json.loads(body)
        assert status == 200 and base64.b64decode(data["images"][0])[:4] == b"\x89PNG" and data["stats"]["steps"] == 10
        status, _, body = post(port, {"prompt": "7", "steps": 0})
        assert status == 422 and "steps=0 is out of range" in json.loads(body)["error"]
        assert proc.wait(timeout=60) == 0  # --max-requests 3: a clean shutdown of both ranks
    finally:
        if proc.poll() is None:
            proc.kill()


def test_non_loopback_bind_needs_an_explicit_flag():
    r = subprocess.run([sys.executable, "-m", "driffusion_rt.serve", "--host", "0.0.0.0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "needs --allow-remote" in r.stderr
