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
    # the 2-rank job times the floor its overhead is compared with; the one-process baseline has none
    assert all(row["all_gather_floor_ms"] > 0 for row in rows if row["ranks"] == 2)
    assert "all_gather_floor_ms" not in next(row for row in rows if row["mode"] == "sequential")
    assert len(list(csv.DictReader((tmp_path / "latency.csv").open()))) == 3
    assert (tmp_path / "latency.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_collectives_times_one_all_gather_and_one_broadcast(tmp_path):
    out = tmp_path / "c.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "perf", "bench_collectives.py"), "--iters", "3", "--wake", "0.001",
                        "--shape", "1x2x4x4", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["world"] == 2 and row["backend"] == "gloo" and row["iters"] == 3
    for name in ("all_gather", "broadcast"):
        assert 0 < row[name]["min_ms"] <= row[name]["median_ms"], row


@pytest.mark.slow
def test_bench_latency_one_rank_batches_the_drafts(tmp_path):
    """--ranks 1: n above the ranks, the local evaluator evaluates a round's drafts in one call."""
    r = run("bench_latency.py", "--model", "fixed", "--modes", "aggressive", "--parallel", "2", "4", "--ranks", "1",
            "--out", str(tmp_path), "--steps", "6", "--repeats", "1", "--warmup", "0", "--model-cost", "0.005")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "latency.json").read_text())["rows"]
    assert {(row["mode"], row["parallel"], row["ranks"]) for row in rows} == {
        ("sequential", 1, 1), ("aggressive", 2, 1), ("aggressive", 4, 1)}
    agg4 = next(row for row in rows if row["parallel"] == 4)
    assert agg4["serial_rounds"] == 3 and agg4["backend"] == "local"  # 1 + ceil(5 / 4) rounds, one process
    assert "| fixed | aggressive | 4 | 1 |" in r.stdout


@pytest.mark.slow
def test_bench_serving_table(tmp_path):
    """A tiny sweep: two live 2-rank servers (--max-batch 1 and 4) of the fixed model, each measured alone, at one
    Poisson load and at saturation; the table, the JSON rows, the targets and the plot are written."""
    r = run("bench_serving.py", "--models", "fixed", "--max-batch", "1", "4", "--loads", "8", "--requests", "4",
            "--duration", "5", "--clients", "3", "--alone", "1", "--steps", "3", "--model-cost", "0.002",
            "--model-cost-per-row", "0.001", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    data = json.loads((tmp_path / "serving.json").read_text())
    rows = data["rows"]
    assert [(row["max_batch"], row["scenario"]) for row in rows] == [(mb, s) for mb in (1, 4)
                                                                     for s in ("alone", "poisson", "saturation")]
    for row in rows:
        assert row["answered"] == row["sent"] >= 1 and row["refused"] == 0, row
        assert 0 < row["p50_s"] <= row["p95_s"] <= row["p99_s"] and row["throughput"] > 0, row
    assert data["machine"]["ranks"] == 2 and data["args"]["model_cost_per_row"] == 0.001
    assert [t[0].split(",")[0] for t in data["targets"]] == ["a lone request's median latency",
                                                             "saturation throughput"]
    md = (tmp_path / "serving.md").read_text()
    assert "| fixed | 4 | shrink | saturation |" in md and "| target | measured | met |" in md
    assert "Measured on" in md and (tmp_path / "serving.png").stat().st_size > 0


def test_bench_kernels_on_cpu_times_the_fallback_only(tmp_path):
    r = run("bench_kernels.py", "--sizes", "1x4x8x8", "--k", "2", "--m", "2", "--repeats", "2", "--warmup", "1",
            "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NOT performance numbers" in r.stdout
    rows = json.loads(next(tmp_path.glob("bench_kernels_cpu_*.json")).read_text())["results"]
    assert rows and all(row["copy_GBps"] > 0 and row["fallback_copy_pct"] > 0 for row in rows)
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


# ---------------------------------------------------------------------------------------------- gpu_monitor


class FakeNVML:
    """A pynvml stand-in: devices by UUID, a per-device memory reading, power not supported on every device."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 (pynvml's name)
        pass

    def __init__(self, uuids):
        self.uuids, self.inits, self.shutdowns = uuids, 0, 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return self.uuids[h].encode()  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("Mem", (), {"used": (h + 1) * 2**30})()

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("Util", (), {"gpu": 10 * (h + 1)})()

    def nvmlDeviceGetPowerUsage(self, h):
        raise self.NVMLError_NotSupported("power readings are not supported")


@pytest.fixture
def monitor_module(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "perf"))
    import gpu_monitor
    monkeypatch.setattr(gpu_monitor, "_allocator_peak_mb", lambda device: 123.0)
    return gpu_monitor


def test_gpu_monitor_matches_the_nvml_device_by_uuid(monkeypatch, monitor_module):
    import torch
    nv = FakeNVML(["GPU-aaaa-1111", "GPU-BBBB-2222", "GPU-cccc-3333"])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    # torch's cuda:0 under CUDA_VISIBLE_DEVICES=1 is NVML's device 1: the index must not be used
    monkeypatch.setattr(monitor_module, "torch_uuid", lambda device: monitor_module.normalise_uuid("bbbb-2222"))
    mon = monitor_module.GpuMonitor(torch.device("cuda", 0), period=0.01)
    for _ in range(2):
        with mon:
            pass
    s = mon.summary()
    assert s["gpu_nvml_used_max_mb"] == 2 * 1024 and s["gpu_util_mean_pct"] == 20
    assert s["gpu_unsupported"] == ["power"] and "gpu_power_mean_w" not in s  # dropped alone
    assert s["gpu_peak_allocated_mb"] == 123.0
    assert nv.inits == nv.shutdowns == 2  # NVML shut down after every window


def test_gpu_monitor_without_a_matching_device_keeps_the_allocator_numbers(monkeypatch, monitor_module):
    import torch
    nv = FakeNVML(["GPU-aaaa"])
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setattr(monitor_module, "torch_uuid", lambda device: "ffff")
    mon = monitor_module.GpuMonitor(torch.device("cuda", 0))
    with mon:
        pass
    s = mon.summary()
    assert "no NVML device has torch's UUID ffff" in s["gpu_note"] and "aaaa" in s["gpu_note"]
    assert "gpu_nvml_used_max_mb" not in s and s["gpu_peak_allocated_mb"] == 123.0
    assert nv.inits == nv.shutdowns == 1
    assert monitor_module.GpuMonitor(torch.device("cpu")).summary() == {"gpu_note": "no GPU"}


# ---------------------------------------------------------------------------------------------- gpu_proof


@pytest.mark.slow
def test_gpu_proof_cpu_dry_run_runs_every_section(tmp_path):
    """The proof's flow on CPU with tiny sizes, so a run on a GPU is never wasted on a typo."""
    r = run("gpu_proof.py", "--cpu-dry-run", "--out", str(tmp_path), timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    checks = json.loads((tmp_path / "gpu_cpu_dry_run.json").read_text())
    names = [c["name"] for c in checks]
    assert len(names) == len(set(names))
    assert all(c["status"] in ("PASS", "INFO") for c in checks), [c for c in checks if c["status"] == "FAIL"]
    for section in ("environment", "kernels.", "pipelines.", "staging.", "models.", "sd15.", "nccl.", "cli.",
                    "nvml.", "scope."):
        assert any(n.startswith(section) for n in names), section
    for kind in ("sd15", "sdxl", "sd3", "flux"):
        assert f"pipelines.{kind}.float32.sequential_eq_diffusers" in names
    assert {"sd15.latency.sequential.n1", "sd15.latency.aggressive.n4", "sd15.latency.conservative.n2"} <= set(names)
    for line in r.stdout.splitlines():  # one line per check: name: STATUS numbers
        if line.split(":")[0] in names:
            assert line.split(": ", 1)[1].split(" ")[0] in ("PASS", "INFO"), line
    md = (tmp_path / "gpu_cpu_dry_run.md").read_text()
    assert "CPU dry run" in md and "| staging.ddpm_aggressive_n4_cpu_generator | PASS |" in md


def test_gpu_proof_without_a_gpu_says_how_to_dry_run(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this checks the message a GPU-less machine prints")
    r = run("gpu_proof.py", "--out", str(tmp_path), "--only", "environment", timeout=300)
    assert r.returncode == 2 and "--cpu-dry-run" in r.stderr and not list(tmp_path.iterdir())


@pytest.fixture
def gpu_proof(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "perf"))
    import gpu_proof
    return gpu_proof


def _fake_section(checks):
    def section(proof):
        for name in checks:
            proof.record(name, True, fake=1)
    return section


def test_proof_report_survives_a_sticky_cuda_error(gpu_proof, tmp_path, monkeypatch):
    """A section hits a sticky CUDA error: the section raises it, and so does the synchronize after it (every CUDA
    call fails from then on). The report keeps every check so far, records the section as failed and the proof as
    stopped (with the sections left to rerun), and the run exits 1 instead of losing everything."""
    import torch
    error = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported"
    later = []

    def crashing(proof):
        proof.record("pipelines.before_the_error", True)
        proof.cuda = True  # from here the proof settles the device after each section, as on a GPU

        def synchronize(*args, **kwargs):
            raise RuntimeError(error)
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        raise RuntimeError(error)
    monkeypatch.setitem(gpu_proof.RUN, "kernels", _fake_section(["kernels.fake"]))
    monkeypatch.setitem(gpu_proof.RUN, "pipelines", crashing)
    monkeypatch.setitem(gpu_proof.RUN, "staging", lambda proof: later.append("ran"))
    code = gpu_proof.main(["--cpu-dry-run", "--only", "environment", "kernels", "pipelines", "staging",
                           "--out", str(tmp_path)])
    assert code == 1 and later == []
    checks = {c["name"]: c for c in json.loads((tmp_path / "gpu_cpu_dry_run.json").read_text())}
    assert [checks[n]["status"] for n in ("environment", "kernels.fake", "pipelines.before_the_error")] == \
        ["INFO", "PASS", "PASS"]
    error_check = checks["pipelines.error"]
    assert error_check["status"] == "FAIL" and "illegal memory access" in error_check["error"]
    assert checks["pipelines.device_after_section"]["status"] == "FAIL"
    stopped = checks["proof.stopped"]
    assert stopped["not_run"] == ["staging"] and "--only staging --merge" in stopped["note"]
    md = (tmp_path / "gpu_cpu_dry_run.md").read_text()
    assert "| kernels.fake | PASS |" in md and "| pipelines.error | FAIL |" in md and "Stopped early" in md


KILLED_RUN = """
import os, sys
sys.path.insert(0, sys.argv[1])
import gpu_proof
gpu_proof.RUN["kernels"] = lambda proof: proof.record("kernels.fake", True)
gpu_proof.RUN["pipelines"] = lambda proof: (proof.record("pipelines.half", True), os._exit(9))
gpu_proof.main(["--cpu-dry-run", "--only", "environment", "kernels", "pipelines", "staging", "--out", sys.argv[2]])
"""


def test_proof_report_is_rewritten_after_every_section(tmp_path):
    """The process dies in the middle of a section (a crash, or a kill at the device's time limit): the report on
    disk holds every section that finished and says which one it stopped in."""
    r = subprocess.run([sys.executable, "-c", KILLED_RUN, os.path.join(ROOT, "perf"), str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr[-3000:]
    checks = json.loads((tmp_path / "gpu_cpu_dry_run.json").read_text())
    assert [c["name"] for c in checks] == ["environment", "kernels.fake", "proof.incomplete"]
    assert checks[-1]["status"] == "FAIL" and checks[-1]["section"] == "pipelines"
    md = (tmp_path / "gpu_cpu_dry_run.md").read_text()
    assert "Incomplete: stopped in section pipelines" in md and "| kernels.fake | PASS |" in md
    assert sorted(os.listdir(tmp_path)) == ["gpu_cpu_dry_run.json", "gpu_cpu_dry_run.md"]  # no half-written file


def test_proof_rerun_of_one_section_merges_into_the_report(gpu_proof, tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_proof.RUN, "kernels", _fake_section(["kernels.a", "kernels.b"]))
    monkeypatch.setitem(gpu_proof.RUN, "staging", _fake_section(["staging.old"]))
    out = ["--cpu-dry-run", "--out", str(tmp_path)]
    assert gpu_proof.main([*out, "--only", "environment", "kernels", "staging"]) == 0
    monkeypatch.setitem(gpu_proof.RUN, "staging", _fake_section(["staging.new"]))
    assert gpu_proof.main([*out, "--only", "staging", "--merge"]) == 0
    names = [c["name"] for c in json.loads((tmp_path / "gpu_cpu_dry_run.json").read_text())]
    assert names == ["environment", "kernels.a", "kernels.b", "staging.new"]
    (tmp_path / "first.json").write_text((tmp_path / "gpu_cpu_dry_run.json").read_text())
    assert gpu_proof.main([*out, "--only", "staging"]) == 0  # without --merge: this run's checks only
    assert [c["name"] for c in json.loads((tmp_path / "gpu_cpu_dry_run.json").read_text())] == ["staging.new"]
    # merged into a report carried from elsewhere (a fresh device machine's output folder starts empty)
    monkeypatch.setitem(gpu_proof.RUN, "kernels", _fake_section(["kernels.c"]))
    assert gpu_proof.main([*out, "--only", "kernels", "--merge", str(tmp_path / "first.json")]) == 0
    names = [c["name"] for c in json.loads((tmp_path / "gpu_cpu_dry_run.json").read_text())]
    assert names == ["environment", "kernels.c", "staging.new"]


def test_proof_two_ranks_on_one_gpu_check_on_the_dry_run(gpu_proof, tmp_path):
    """The proof's check itself, on CPU ranks faking one CUDA device: refused on every rank, status 2, one line."""
    args = gpu_proof.parser().parse_args(["--cpu-dry-run", "--out", str(tmp_path)])
    p = gpu_proof.Proof(args)
    gpu_proof.two_ranks_one_gpu(p)
    [check] = p.checks
    assert check["status"] == "PASS", check
    assert check["message_lines"] == 1 and check["rank_exit_codes"][-1] == "2"


def test_gpu_device_check_without_a_gpu_fails_before_installing_anything(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this checks what a GPU-less machine prints")
    r = subprocess.run(["bash", os.path.join(ROOT, "perf", "gpu_device_check.sh"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 1 and "torch.cuda.is_available() is False" in r.stdout
    assert "install" not in r.stdout and sorted(os.listdir(tmp_path)) == ["summary.txt"]


def _stub_interpreters(bin_dir):
    """`python` and `python3` on PATH that fail loudly: the device check must use $PYTHON for everything."""
    bin_dir.mkdir()
    for name in ("python", "python3"):
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\necho \"STUB INTERPRETER $0 $*\" >&2\nexit 97\n")
        stub.chmod(0o755)
    return str(bin_dir)


@pytest.mark.slow
def test_gpu_device_check_flow_on_cpu(tmp_path):
    """The device command's plumbing on CPU (--cpu-dry-run): $PYTHON throughout (plain python / python3 on PATH are
    stubs that fail), --only passed to the proof, the tests, the launcher, and at most 6 files in the output folder."""
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    wheels.mkdir()
    env = dict(os.environ, PYTHON=sys.executable, WHEELS=str(wheels), PATH=_stub_interpreters(tmp_path / "bin") + ":"
               + os.environ["PATH"], TESTS="tests/test_sampler.py::test_same_result_with_fused_kernels_on_and_off")
    env.pop("OUT", None)
    r = subprocess.run(["bash", os.path.join(ROOT, "perf", "gpu_device_check.sh"), "--cpu-dry-run", "--out", str(out),
                        "--only", "environment", "--tests"], capture_output=True, text=True, timeout=600, env=env)
    logs = {f: (out / f).read_text() for f in os.listdir(out)}
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:], logs.get("tests.log", "")[-3000:])
    assert sorted(logs) == ["gpu_cpu_dry_run.json", "gpu_cpu_dry_run.md", "install.log", "proof.log", "summary.txt",
                            "tests.log"]
    assert not any("STUB INTERPRETER" in text for text in [r.stdout, r.stderr, *logs.values()])
    assert [c["name"] for c in json.loads(logs["gpu_cpu_dry_run.json"])] == ["environment"]
    assert "--only environment --merge" in logs["gpu_cpu_dry_run.md"]
    summary = logs["summary.txt"]
    for step in ("PASS    proof", "PASS    tests", "PASS    generate on every GPU", "ALL PASSED"):
        assert step in summary, summary
    assert "2 passed" in logs["tests.log"] and "launch: " + sys.executable in logs["tests.log"]


def test_bench_latency_models_layouts_with_a_sequence_axis():
    """--layouts: every (draft, cfg, ulysses) layout of a GPU count, modeled exactly as documented: the plan's serial
    rounds times one call, a call costing its per-row share over the sequence degree plus the exchange."""
    import importlib.util
    from driffusion_rt.plan import make_plan
    spec = importlib.util.spec_from_file_location("bench_latency", os.path.join(ROOT, "perf", "bench_latency.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.modeled_layouts(8, 28, guided=False, per_row=1.0, comm=0.1)
    assert {(r["draft"], r["cfg"], r["ulysses"]) for r in rows} == {(8, 1, 1), (4, 1, 2), (2, 1, 4), (1, 1, 8)}
    best = rows[0]
    assert (best["draft"], best["ulysses"]) == (4, 2)
    assert best["latency"] == pytest.approx(make_plan("aggressive", 28, 4).serial_rounds * (1 / 2 + 0.1))
    assert best["speedup"] == pytest.approx(28 / best["latency"])
    guided = bench.modeled_layouts(2, 50, guided=True, per_row=1.0, comm=0.1)
    pair = next(r for r in guided if r["cfg"] == 2)
    assert pair["call"] == 1.0 and pair["speedup"] == pytest.approx(2.0)  # a pair halves a guided call's rows
    assert "| 8 | 4 | 1 | 2 | 8 | 0.600 | 4.80 | 5.83x |" in bench.layouts_table(rows)


def test_bench_peers_tiny_configuration_writes_its_tables(tmp_path):
    """ParaDiGMS (diffusers) and every mode here on the tiny SD pipeline, this runtime's modes on the mixture: the
    table has every method, the targets' rows, and ParaDiGMS at tolerance 0 is this runtime's sequential sample
    (the same weights, prompt, latents and noise)."""
    r = run("bench_peers.py", "--quick", "--models", "sd", "gmm", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((tmp_path / "peers.json").read_text())
    groups = {(g["model"], g["scheduler"], g["parallel"]): g for g in data["groups"]}
    assert set(groups) == {("sd", "ddim", 2), ("sd", "ddpm", 2), ("gmm", "ddim", 2), ("gmm", "ddpm", 2)}
    for (model, _, _), g in groups.items():
        methods = {row["method"] for row in g["rows"]}
        assert methods == {"aggressive", "conservative", "picard", "parasolver", "adaptive"} | (
            {"ParaDiGMS"} if model == "sd" else set()), methods
        for row in g["rows"]:
            assert row["serial_rounds"] >= 1 and row["model_evals"] >= row["serial_rounds"] and row["deviation"] >= 0
            assert row["modeled_latency"] >= row["serial_rounds"] and isinstance(row["pareto"], bool)
            if row["method"] == "adaptive":
                assert row["deviation"] <= row["tolerance"] and row["estimate"] <= row["tolerance"], row
            if row["method"] == "ParaDiGMS" and row["setting"] == "tol=0":
                assert row["deviation"] <= 1e-12 and row["serial_rounds"] == 10, row
        assert [t["deviation"] for t in g["targets"]] == [1e-3, 1e-4] and any(row["pareto"] for row in g["rows"])
    md = (tmp_path / "peers.md").read_text()
    assert "| model | scheduler | n | D | adaptive | ParaDiGMS |" in md and "| sd | ddim | 2 | 0.001 |" in md
    assert "modeled" in md and (tmp_path / "peers.png").stat().st_size > 0
