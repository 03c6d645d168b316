"""The persistent engine on 2 gloo ranks: request isolation, determinism, memory, HTTP, and dead workers."""
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "engine_worker.py")
sys.path.insert(0, HERE)
from engine_worker import REQUESTS  # noqa: E402
from serving import get, kill_job, metric, post, start_server, torchrun  # noqa: E402




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
            assert row["status"] == (500 if k == 7 else 422), row  # a non-finite output is the model's failure
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
    r, _ = torchrun(WORKER, "die", when, env={"ENGINE_TIMEOUT": str(timeout)})
    assert r.returncode != 0
    stamp = re.search(r"FAULT_AT (\d+\.\d+)", r.stderr)
    assert stamp and time.time() - float(stamp.group(1)) < timeout + 10, r.stderr[-3000:]  # from the death
    text = r.stdout + r.stderr
    assert re.search(r"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: 19", text), text[-3000:]
    # the transport says the peer is gone: reported as a death (after how long), not as a timeout; the rank once
    assert re.search(r"driffusion_rt engine: rank 0: \w+ failed after \d+\.\d\d s: another rank has died", text), \
        text[-3000:]
    assert "rank 0: rank 0" not in text and "did not complete within" not in text


def wait_in_flight(port, n=1):
    for _ in range(600):
        if json.loads(get(port, "/health")[1])["in_flight"] == n:
            return
        time.sleep(0.05)
    raise AssertionError("no request in flight")


def access_lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{") and '"event": "access"' in line]


@pytest.mark.slow
def test_http_over_loopback_with_access_log_and_metrics(tmp_path):
    # the body limit is 64 KiB plus the base64 of --max-image-bytes (3000 bytes: 4000 more)
    proc, port = start_server(tmp_path, "--max-requests", "5", "--max-image-bytes", "3000")
    try:
        status, headers, body = post(port, {"prompt": "2026", "steps": 10, "parallel": 2},
                                     headers={"X-Request-ID": "client-id-1"})
        assert status == 200 and headers["Content-Type"] == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
        assert headers["X-Driffusion-serial-rounds"] == "6" and headers["X-Request-ID"] == "client-id-1"
        # base64 returns every image: num_images 2 of the digits "7" are two PNG grids
        status, _, body = post(port, {"prompt": "7", "steps": 10, "num_images": 2, "response": "base64"})
        data = json.loads(body)
        assert status == 200 and len(data["images"]) == 2 and data["stats"]["steps"] == 10
        assert all(base64.b64decode(im)[:4] == b"\x89PNG" for im in data["images"])
        status, _, body = post(port, {"prompt": "7", "steps": 0})
        assert status == 422 and "steps=0 is out of range" in json.loads(body)["error"]
        status, _, body = post(port, {"prompt": "7", "bogus": 1})
        assert status == 422 and "(and response, over HTTP)" in json.loads(body)["error"]
        assert post(port, b"{not json", raw=True)[0] == 400
        assert post(port, {"prompt": "7", "response": "jpeg"})[0] == 400
        assert post(port, b"[1, 2]", raw=True)[0] == 400
        assert post(port, {"prompt": "7" * 70000})[0] == 413
        assert get(port, "/nope")[0] == 404
        status, body = get(port, "/health")
        assert status == 200 and json.loads(body)["ok"] and json.loads(body)["served"] == 2
        status, text = get(port, "/metrics")
        text = text.decode()
        assert status == 200
        assert metric(text, "driffusion_requests_total", path="/generate", status="200") == 2
        assert metric(text, "driffusion_requests_total", path="/generate", status="422") == 2
        assert metric(text, "driffusion_requests_total", path="/generate", status="400") == 3
        assert metric(text, "driffusion_requests_total", path="/generate", status="413") == 1
        assert metric(text, "driffusion_requests_total", path="other", status="404") == 1
        assert metric(text, "driffusion_request_latency_seconds_count") == 4  # the requests the engine answered
        assert metric(text, "driffusion_queue_wait_seconds_count") == 4
        assert metric(text, "driffusion_rounds_total") == 6 + 6  # two aggressive n=2 requests of 10 steps
        assert metric(text, "driffusion_model_evals_total") == 10 + 10
        assert metric(text, "driffusion_queue_depth") == 0 and metric(text, "driffusion_in_flight") == 0
        assert post(port, {"prompt": "1", "steps": 2})[0] == 200
        out, err = proc.communicate(timeout=120)  # --max-requests 5: a clean shutdown of both ranks
        assert proc.returncode == 0, err[-3000:]
    finally:
        kill_job(proc)
    lines = access_lines(out)
    seen = [(r["method"], r["path"], r["status"]) for r in lines]
    assert seen == [("POST", "/generate", 200)] * 2 + [("POST", "/generate", 422)] * 2 + \
        [("POST", "/generate", 400)] * 3 + [("POST", "/generate", 413), ("GET", "/nope", 404),
                                            ("GET", "/health", 200), ("GET", "/metrics", 200),
                                            ("POST", "/generate", 200)]
    assert lines[0]["id"] == "client-id-1" and len({r["id"] for r in lines}) == len(lines)
    assert lines[0]["rounds"] == 6 and lines[0]["model_evals"] == 10 and lines[0]["queue_s"] >= 0
    assert all(r["latency_s"] >= 0 and r["ts"] for r in lines)


@pytest.mark.slow
def test_a_disconnected_client_cancels_its_request_on_every_rank(tmp_path):
    """A 200-step request (at least 10 s of model calls) whose client leaves stops at its next round on both ranks:
    the next request is answered in a few seconds, not after the cancelled one's remaining 10 s."""
    proc, port = start_server(tmp_path, "--model", "fixed", "--model-cost", "0.05")
    try:
        assert post(port, {"steps": 2})[0] == 200  # a first request: one-time costs out of the way
        body = json.dumps({"steps": 200, "mode": "sequential"}).encode()
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_in_flight(port)
        client.close()
        t0 = time.monotonic()
        status, _, body = post(port, {"steps": 4, "parallel": 2})  # fixed answers its latents
        took = time.monotonic() - t0
        assert status == 200 and json.loads(body)["shape"] == [4, 4, 16, 16]
        assert took < 7, took  # the cancelled request had >= 9 s of model calls left
        text = get(port, "/metrics")[1].decode()
        assert metric(text, "driffusion_requests_total", path="/generate", status="499") == 1
        assert json.loads(get(port, "/health")[1])["served"] == 2  # the first and the last; not the cancelled one
        print(f"\nnext request after a cancelled one: {took:.2f} s")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            kill_job(proc)
    lines = access_lines(out)
    assert [r["status"] for r in lines if r["path"] == "/generate"] == [200, 499, 200]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])  # SIGINT: Ctrl-C in the terminal
def test_sigterm_during_a_request_drains_and_every_rank_exits_cleanly(sig, tmp_path):
    """The signal to torchrun during a request: the job ends within 30 s; the client gets 503; a request that comes
    after the one in flight was answered, while the server drains (--drain-seconds), gets 503 too, not a refused
    connection; every rank prints one line and no traceback or failure message (torchrun's own report of the
    signal is torchrun's)."""
    logs = tmp_path / "logs"
    proc, port = start_server(tmp_path, "--model", "fixed", "--model-cost", "0.05", "--drain-seconds", "3",
                              log_dir=logs)
    answer = {}
    client = threading.Thread(target=lambda: answer.update(r=post(port, {"steps": 200, "mode": "sequential"})))
    client.start()
    try:
        wait_in_flight(port)
        t0 = time.monotonic()
        proc.send_signal(sig)  # torchrun forwards it to both ranks
        client.join(timeout=30)
        time.sleep(0.5)  # the engine has stopped: without a drain time the socket would be closed by now
        late = post(port, {"steps": 2}, timeout=10)
        health = get(port, "/health", timeout=10)
        proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        kill_job(proc)
    status, _, body = answer["r"]
    assert status == 503 and "shutting down" in json.loads(body)["error"]
    assert late[0] == 503 and "shutting down" in json.loads(late[2])["error"] and health[0] == 503
    for rank in (0, 1):
        err = next(logs.glob(f"*/attempt_0/{rank}/stderr.log")).read_text()
        assert err.strip().splitlines() == [f"driffusion_rt engine: rank {rank}: stopped by {sig.name}; exiting"], err
    print(f"\n{sig.name} to exit: {took:.2f} s")


def test_non_loopback_bind_needs_an_explicit_flag():
    r = subprocess.run([sys.executable, "-m", "driffusion_rt.serve", "--host", "0.0.0.0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "needs --allow-remote" in r.stderr
