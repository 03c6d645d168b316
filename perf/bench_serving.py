"""Serving under load: Poisson arrivals against a live 2-rank server on loopback, --max-batch 1 against batched.

    python perf/bench_serving.py                                  # the documented sweep (about 15 minutes on 2 cores)
    python perf/bench_serving.py --models fixed --max-batch 1 4 --loads 4 --requests 6 --steps 4 --out /tmp/s

For each model (fixed: --model-cost + --model-cost-per-row seconds per call, 40 ms + 5 ms per row by default, a
stand-in for a GPU's batch economics; digits: the shipped UNet, compute-bound on CPU) and each --max-batch (with
each --policies entry for batched servers), one server runs under torchrun (2 gloo ranks, 127.0.0.1 only) and is
measured three ways, every loop bounded in count (--requests) and time (--duration):

  alone       one request at a time (a closed loop of one client): a lone request's latency;
  poisson     requests arriving as a Poisson process at each offered load in --loads (req/s): p50 / p95 / p99
              latency of the answered ones, throughput (answered / (last answer - first arrival)), 503s;
  saturation  --clients clients sending back to back: the most requests per second the server answers.

Requests are text-to-image: --images images (default one), --steps steps, aggressive with n = --parallel (default
2, the ranks), seeds varying. Writes NAME.json (every row, the arguments, the machine), NAME.md (the table and the
targets) and NAME.png (p95 latency and throughput against offered load) to --out (NAME: --name, default serving).
Targets (issue 25; reported, not asserted): with the fixed model, saturation throughput batched >= 3x --max-batch 1,
and a lone request's latency batched within 5%.
"""
import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIELDS = ("model", "max_batch", "policy", "scenario", "offered", "sent", "answered", "refused", "p50_s", "p95_s",
          "p99_s", "throughput")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["fixed", "digits"], choices=("fixed", "digits"))
    p.add_argument("--max-batch", nargs="+", type=int, default=[1, 16], help="servers' --max-batch (rows per call)")
    p.add_argument("--policies", nargs="+", default=["shrink"], choices=("shrink", "wait"),
                   help="--draft-policy of the batched servers (max-batch > 1)")
    p.add_argument("--parallel", type=int, default=2, help="n of every request (default 2: the ranks)")
    p.add_argument("--images", nargs="+", type=int, default=[1],
                   help="images per request, cycled over the requests (default 1; several sizes fragment the rows)")
    p.add_argument("--loads", nargs="+", type=float, default=[1, 2, 4, 8, 16], help="offered loads, requests/s")
    p.add_argument("--requests", type=int, default=48, help="most requests per load (and per saturation run)")
    p.add_argument("--duration", type=float, default=20.0, help="most seconds of arrivals per load")
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients at saturation (0: skip)")
    p.add_argument("--alone", type=int, default=5, help="requests one at a time (0: skip)")
    p.add_argument("--steps", type=int, default=20, help="steps per request")
    p.add_argument("--model-cost", type=float, default=0.04, help="fixed model: seconds per call")
    p.add_argument("--model-cost-per-row", type=float, default=0.005, help="fixed model: seconds more per row")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a server may take to start, a request to end")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="directory for NAME.json/.md/.png")
    p.add_argument("--name", default="serving", help="base name of the result files (default serving)")
    return p


def machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "python": platform.python_version(), "ranks": 2, "backend": "gloo"}


class Server:
    """`torchrun --nproc_per_node=2 -m driffusion_rt.serve` on a free loopback port, in a session of its own."""

    def __init__(self, model: str, max_batch: int, policy: str, args, log):
        self.dir = tempfile.mkdtemp(prefix="bench_serving_")
        port_file = os.path.join(self.dir, "port")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "driffusion_rt.serve", "--model", model, "--port", "0", "--port-file", port_file, "--max-batch",
               str(max_batch), "--draft-policy", policy, "--max-queue", str(max(args.requests, args.clients) + 8),
               "--drain-seconds", "0", "--model-cost", str(args.model_cost), "--model-cost-per-row",
               str(args.model_cost_per_row)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
        self.log = open(os.path.join(self.dir, "server.log"), "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.monotonic()
        while not (os.path.exists(port_file) and open(port_file).read()):
            if self.proc.poll() is not None or time.monotonic() - t0 > args.timeout:
                self.stop()
                raise RuntimeError(f"the server did not start; see {self.log.name}")
            time.sleep(0.2)
        self.port = int(open(port_file).read())
        log(f"[bench] {model} --max-batch {max_batch} --draft-policy {policy}: port {self.port}")

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def request(port: int, body: dict, timeout: float) -> tuple:
    """(HTTP status, seconds) of one POST /generate."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=data,
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except (urllib.error.URLError, OSError):
        status = 0
    return status, time.monotonic() - t0


def spec(model: str, args, k: int) -> dict:
    body = {"steps": args.steps, "mode": "aggressive", "parallel": args.parallel, "seed": k,
            "num_images": args.images[k % len(args.images)]}
    if model == "digits":
        body["prompt"] = str(k % 10)
    return body


def row(model, max_batch, policy, scenario, offered, results, t_first, t_last) -> dict:
    ok = sorted(s for status, s, _ in results if status == 200)

    def pct(q):
        return statistics.quantiles(ok, n=100, method="inclusive")[q - 1] if len(ok) > 1 else (ok or [None])[0]
    span = t_last - t_first
    return {"model": model, "max_batch": max_batch, "policy": policy, "scenario": scenario, "offered": offered,
            "sent": len(results), "answered": len(ok), "refused": sum(1 for st, _, _ in results if st == 503),
            "p50_s": pct(50), "p95_s": pct(95), "p99_s": pct(99),
            "throughput": len(ok) / span if ok and span > 0 else None}


def poisson(server, model, args, rate: float, rng) -> tuple:
    """Requests at Poisson arrival times of `rate` per second (at most --requests, over at most --duration s)."""
    results, threads, lock = [], [], threading.Lock()

    def send(k):
        status, took = request(server.port, spec(model, args, k), args.timeout)
        with lock:
            results.append((status, took, time.monotonic()))
    t0, at = time.monotonic(), 0.0
    for k in range(args.requests):
        at += rng.expovariate(rate)
        if at > args.duration:
            break
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        threads.append(threading.Thread(target=send, args=(k,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join(timeout=args.timeout)
    return results, t0, max((t for _, _, t in results), default=t0)


def closed_loop(server, model, args, clients: int, count: int) -> tuple:
    """`clients` clients each sending back to back until `count` requests were sent or --duration passed."""
    results, lock, sent = [], threading.Lock(), [0]
    t0 = time.monotonic()

    def client():
        while True:
            with lock:
                if sent[0] >= count or time.monotonic() - t0 > args.duration:
                    return
                k = sent[0] = sent[0] + 1
            status, took = request(server.port, spec(model, args, k), args.timeout)
            with lock:
                results.append((status, took, time.monotonic()))
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.timeout + args.duration)
    return results, t0, max((t for _, _, t in results), default=t0)


def measure(model, max_batch, policy, args, log) -> list:
    server = Server(model, max_batch, policy, args, log)
    rows, rng = [], random.Random(args.seed)
    try:
        closed_loop(server, model, args, 1, 2)  # warm-up: buffers, the first requests' one-time costs
        if args.alone:
            rows.append(row(model, max_batch, policy, "alone", None, *closed_loop(server, model, args, 1, args.alone)))
        for rate in args.loads:
            rows.append(row(model, max_batch, policy, "poisson", rate, *poisson(server, model, args, rate, rng)))
        if args.clients:
            rows.append(row(model, max_batch, policy, "saturation", None,
                            *closed_loop(server, model, args, args.clients, args.requests)))
    finally:
        server.stop()
    for r in rows:
        log(f"[bench] {' '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in r.items())}")
    return rows


def targets(rows: list) -> list:
    """The issue's targets for the fixed model: (what, measured, met)."""
    out = []
    fixed = [r for r in rows if r["model"] == "fixed"]
    one = {r["scenario"]: r for r in fixed if r["max_batch"] == 1 and r["scenario"] in ("alone", "saturation")}
    for r in fixed:
        if r["max_batch"] == 1 or r["scenario"] not in ("alone", "saturation"):
            continue
        base = one.get(r["scenario"])
        if base is None:
            continue
        if r["scenario"] == "saturation" and base["throughput"] and r["throughput"]:
            ratio = r["throughput"] / base["throughput"]
            out.append((f"saturation throughput, --max-batch {r['max_batch']} ({r['policy']}) / --max-batch 1",
                        f"{ratio:.2f}x", ratio >= 3))
        if r["scenario"] == "alone" and base["p50_s"] and r["p50_s"]:
            ratio = r["p50_s"] / base["p50_s"]
            out.append((f"a lone request's median latency, --max-batch {r['max_batch']} / --max-batch 1",
                        f"{ratio:.3f}", ratio <= 1.05))
    return out


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(rows, meta) -> str:
    m = meta["machine"]
    a = meta["args"]
    lines = [f"Measured on {m['cpu']}, {m['cores']} cores, {m['gpus']} GPUs, torch {m['torch']}, 2 gloo ranks on "
             f"loopback; {a['steps']} steps, aggressive n = {a['parallel']}, images per request "
             f"{' / '.join(map(str, a['images']))}; fixed model {a['model_cost'] * 1e3:g} ms + "
             f"{a['model_cost_per_row'] * 1e3:g} ms per row and call.", "",
             "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in FIELDS) + " |" for r in rows]
    if meta["targets"]:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {what} | {value} | {'yes' if met else 'no'} |" for what, value, met in meta["targets"]]
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib  # optional: the perf extra
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # optional: the perf extra
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for col, model in enumerate(models):
        configs = sorted({(r["max_batch"], r["policy"]) for r in rows if r["model"] == model})
        for mb, policy in configs:
            pts = sorted((r["offered"], r) for r in rows if r["model"] == model and r["max_batch"] == mb
                         and r["policy"] == policy and r["scenario"] == "poisson")
            label = f"--max-batch {mb}" + (f" ({policy})" if mb > 1 else "")
            axes[0][col].plot([x for x, _ in pts], [r["p95_s"] for _, r in pts], marker="o", label=label)
            axes[1][col].plot([x for x, _ in pts], [r["throughput"] for _, r in pts], marker="o", label=label)
        axes[0][col].set(title=f"{model}: p95 latency", xlabel="offered load (req/s)", ylabel="seconds",
                         xscale="log", yscale="log")
        axes[1][col].set(title=f"{model}: throughput", xlabel="offered load (req/s)", ylabel="answered req/s",
                         xscale="log")
        for ax in axes[:, col]:
            ax.legend()
            ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if min(args.max_batch) < 1 or args.requests < 1 or args.duration <= 0 or min(args.loads) <= 0:
        print("bench_serving: --max-batch, --requests, --duration and --loads must be positive", file=sys.stderr)
        return 2
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    rows = []
    for model in args.models:
        for mb in args.max_batch:
            for policy in (args.policies if mb > 1 else ["shrink"]):
                rows += measure(model, mb, policy, args, log)
    meta = {"args": vars(args), "machine": machine(), "targets": targets(rows)}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    with open(base + ".json", "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    md = markdown(rows, meta)
    with open(base + ".md", "w") as f:
        f.write(md)
    plot(rows, base + ".png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
