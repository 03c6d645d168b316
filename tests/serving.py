"""Helpers for tests that run torchrun jobs and the HTTP server: a torchrun job (2 ranks unless told) (in a session of its own when in
the background, so a failing test kills the whole job), the server started on a free port, and HTTP calls."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request


def torchrun(*args, timeout=600, env=None, background=False, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    if background:
        # a session of its own: a failing test kills torchrun and its ranks together (kill_job), leaving no orphan
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                start_new_session=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return r, time.monotonic() - t0


def kill_job(proc):
    """Kill a background torchrun job and its ranks (its process group) if it is still running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def post(port, body, timeout=300, raw=False, headers=None):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def get(port, path, timeout=30):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def metric(text: str, name: str, **labels) -> float:
    """A sample's value from a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name + ("{" + want + "}" if want else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def start_server(tmp_path, *args, log_dir=None):
    """torchrun serve on 2 ranks in the background; returns (process, port) once it listens."""
    port_file = tmp_path / "port"
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir else []
    proc = torchrun(*logs, "-m", "driffusion_rt.serve", "--port", "0", "--port-file", str(port_file), *args,
                    background=True)
    for _ in range(600):
        if port_file.exists() and port_file.read_text():
            return proc, int(port_file.read_text())
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError("the server did not start")
