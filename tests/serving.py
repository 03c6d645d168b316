"""Helpers for tests that run torchrun jobs and the HTTP server: a torchrun job (2 ranks unless told; in a session of
its own when in the background, so a failing test kills the whole job), the server started on a free port, an
in-process server (`LocalServer`), and HTTP calls."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil


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
    """Kill a background torchrun job and its ranks if it is still running. torchrun starts every rank in a session
    of its own, so killing torchrun's process group alone would leave the ranks running (and holding the pipes)."""
    if proc.poll() is None:
        try:
            ranks = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            ranks = []
        os.killpg(proc.pid, signal.SIGKILL)
        for p in ranks:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.communicate()


def post(port, body, timeout=300, raw=False, headers=None, path="/generate"):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
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


class LocalServer:
    """The HTTP front of an in-process engine on a free loopback port: `port`, the access-log `lines`, and `start()`
    to run the engine's loop in a thread (until the context ends)."""

    def __init__(self, engine, poll_s=0.02):
        import uvicorn

        from driffusion_rt import serve
        self.engine, self.lines, self.stop = engine, [], threading.Event()
        sock = serve.bind("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(serve.make_app(engine, write=self.lines.append, poll_s=poll_s),
                                                    log_level="warning", access_log=False))
        threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True).start()
        self.worker = threading.Thread(target=engine.serve, kwargs={"stop": self.stop}, daemon=True)

    def __enter__(self):
        for _ in range(1000):
            if self.server.started:
                return self
            time.sleep(0.01)
        raise AssertionError("the server did not start")

    def start(self):
        self.worker.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.should_exit = True
        if self.worker.is_alive():
            self.worker.join(timeout=30)

    def statuses(self) -> list:
        return [json.loads(line)["status"] for line in self.lines]


def wait_for(predicate, timeout=30.0, what="a condition"):
    """Poll `predicate` every 10 ms until it holds (AssertionError after `timeout` seconds)."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)


def send_and_leave_later(port, body: dict):
    """A raw POST /generate whose client can go away (close the returned socket) before the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock
