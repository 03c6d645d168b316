"""The distributed runtime on gloo with torchrun: equality with the local sampler, buffer reuse, fault handling."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")


def torchrun(nproc, *args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return r, time.monotonic() - t0


def since_fault(r) -> float:
    """Seconds from the injected fault (the worker's FAULT_AT stamp) to the end of the job (now)."""
    stamp = re.search(r"FAULT_AT (\d+\.\d+)", r.stderr)
    assert stamp, r.stderr[-3000:]
    return time.time() - float(stamp.group(1))


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_distributed_equals_local(nproc, tmp_path):
    out = tmp_path / "equal.json"
    r, _ = torchrun(nproc, WORKER, "equal", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    others = [r for r in rows if r["mode"] in ("picard", "parasolver", "aggressive-extrapolate",
                                               "conservative-extrapolate")]
    rows = [r for r in rows if r not in others]
    assert len(rows) == nproc * 2 * 2 * 2  # ranks x models x modes x n
    assert len(others) == nproc * 4
    for row in others:  # extrapolated drafts, ParaSolver, Picard on the distributed evaluator: same result and rounds
        assert row["rel_err"] <= 1e-6 and row["serial_rounds"] == row["local_serial_rounds"], row
    for row in rows:
        assert row["rel_err"] <= 1e-6, row
        assert row["repeat_bitwise"] and row["same_buffers"], row
        # every round of a request used the same gather and send storage: nothing is allocated per round
        assert row["buffer_ptrs"] == 1 and row["rounds_with_drafts"] > 1, row
        assert row["model_evals"] == 12
    bitwise = {(r["model"], r["mode"], r["n"]): r["bitwise"] for r in rows if r["rank"] == 0}
    print(f"\n{nproc} ranks, bitwise equal to the local sampler: {bitwise}")
    # the Gaussian-mixture model is evaluated row by row, so batching cannot change its bits
    assert all(v for (m, _, _), v in bitwise.items() if m == "gmm")


GEN_ARGS = ["--model", "fixed", "--model-cost", "0.01", "--steps", "30", "--warmup", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("kind,rank", [("raise", 1), ("raise", 0), ("exit", 1)])
def test_failing_rank_brings_the_job_down(kind, rank, tmp_path):
    timeout = 20
    out_dir = tmp_path / "out"
    r, _ = torchrun(2, WORKER, "fault", kind, str(rank), "5", "--", *GEN_ARGS, "--timeout", str(timeout),
                    "--out", str(out_dir))
    assert r.returncode != 0
    assert since_fault(r) < timeout / 2  # a dead peer is noticed at once, not after the timeout
    text = r.stdout + r.stderr
    if kind == "raise":
        assert f"driffusion_rt: rank {rank} failed: RuntimeError: injected failure at call 5" in text
    else:
        # torchrun's failure summary names the rank that died and its exit code
        assert re.search(rf"rank\s+: {rank} \(local_rank: {rank}\)\s+exitcode\s+: 17", text), text[-3000:]
    assert not out_dir.exists() or not any(out_dir.iterdir())  # no partial output


@pytest.mark.slow
def test_hung_rank_times_out_with_a_clear_message(tmp_path):
    timeout = 5
    r, _ = torchrun(2, WORKER, "fault", "hang", "1", "5", "--", *GEN_ARGS, "--timeout", str(timeout),
                    "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    took = since_fault(r)
    assert timeout - 1 < took < timeout + 10, took  # the timeout, then the job's exit (time to spare for the load)
    assert re.search(rf"driffusion_rt: rank 0 failed: CollectiveTimeout: \w+ did not complete within {timeout} s: "
                     r"another rank is hung or has died \(", r.stderr), r.stderr[-3000:]
    assert "rank 0: rank 0" not in r.stderr  # the rank is named once
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_non_finite_model_output_is_reported_once(tmp_path):
    """Rank 1's model returns NaN: the gathered outputs are every rank's, so every rank fails at the same check and
    only rank 0 says so."""
    r, _ = torchrun(2, WORKER, "fault", "nan", "1", "3", "--", *GEN_ARGS, "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    assert r.stderr.count("non-finite model output") == 1, r.stderr[-3000:]
    assert "driffusion_rt: rank 0 failed: NonFiniteOutputError" in r.stderr
    assert "rank 1 failed" not in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_rank_failing_to_load_brings_the_job_down(tmp_path):
    """Rank 1 fails while loading; rank 0, waiting in the barrier after loading (under the long start-up timeout),
    reports it at once instead of waiting for that timeout."""
    r, _ = torchrun(2, WORKER, "fault", "loadraise", "1", "0", "--", *GEN_ARGS, "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and since_fault(r) < 30  # not the 1800 s start-up timeout
    assert "driffusion_rt: rank 1 failed: RuntimeError: injected failure while loading" in r.stderr
    assert re.search(r"driffusion_rt: rank 0 failed: CollectiveTimeout: the barrier after loading failed after "
                     r"\d+\.\d\d s: another rank has died", r.stderr) or \
        re.search(r"rank\s+: 0 \(local_rank: 0\)\s+exitcode\s+: -15", r.stderr), r.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_rank_loading_slowly_does_not_fail_the_job(tmp_path):
    """Loading is covered by the long start-up timeout (--load-timeout), not by --timeout: rank 1 takes 8 s longer
    to load than rank 0 while collectives may wait only 3 s, and the job succeeds."""
    out_dir = tmp_path / "out"
    r, _ = torchrun(2, WORKER, "fault", "slowload", "1", "8", "--", *GEN_ARGS, "--steps", "8", "--timeout", "3",
                    "--out", str(out_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(out_dir.glob("fixed-*.json"))) == 1


@pytest.mark.slow
def test_generate_under_torchrun_reports_measured_vs_ideal(tmp_path):
    r, _ = torchrun(2, "-m", "driffusion_rt.generate", "--steps", "20", "--prompt", "0123", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "model digits, ranks 2 (gloo)" in r.stdout
    assert re.search(r"serial model rounds \(plan / measured\)\s+11 / 11", r.stdout)
    assert "efficiency (ideal / measured)" in r.stdout
    assert r.stdout.count("serial model rounds") == 1  # only rank 0 prints
    run = json.loads(next(tmp_path.glob("digits-aggressive-n2-s20-ddim-jump-float32-seed0-*.json")).read_text())
    assert run["ranks"] == 2 and run["serial_rounds"] == 11 and (tmp_path / run["files"][0]).exists()


@pytest.mark.slow
def test_shipped_digits_and_a_diffusers_pipeline_on_two_ranks(tmp_path):
    sys.path.insert(0, HERE)
    import tiny_pipelines
    sd = tiny_pipelines.build_sd(str(tmp_path / "sd"))
    out = tmp_path / "models.json"
    r, _ = torchrun(2, WORKER, "models", str(out), sd)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = json.loads(out.read_text())
    assert rank0["digits"] == rank1["digits"]
    assert rank0["digits"]["shape"] == [4, 1, 8, 8] and rank0["digits"]["finite"]
    assert rank0["digits"]["rel_err"] <= 1e-6
    for mode in ("aggressive", "conservative"):
        row = rank0[f"sd-{mode}"]
        assert row["image_shape"] == [1, 32, 48, 3] and row["finite"] and row["rel_err"] <= 1e-5, row
        assert rank1[f"sd-{mode}-rank1"]["images_none"]  # only rank 0 decodes


@pytest.mark.slow
def test_teardown_leaves_no_backend_thread_running(tmp_path):
    """The cause of a rank aborting at exit ("terminate called without an active exception", SIGABRT): a process
    group that outlives destroy_process_group keeps gloo's worker threads running into interpreter shutdown, where a
    worker that drops a tensor needs the GIL and aborts the process. torch.distributed.nn, when first imported after
    init_process_group (diffusers imports it), binds the default group as default arguments and so kept it alive;
    a DistInfo held by the caller kept the runtime's group alive. After teardown no gloo thread may be left."""
    out = tmp_path / "threads.json"
    r, _ = torchrun(2, WORKER, "threads", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [row["rank"] for row in rows] == [0, 1]
    for row in rows:
        assert any("gloo" in t for t in row["before"]), row  # the check sees gloo's threads while the group lives
        assert not any("gloo" in t for t in row["after"]), row


def test_all_gather_rejects_a_stacked_output_shape():
    """gloo all-gathers by dim-0 concatenation; a stacked [world, ...] output is refused with a clear error."""
    import torch
    import torch.distributed as dist

    from driffusion_rt.distributed import all_gather_rows
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        inp = torch.ones(2, 3)
        with pytest.raises(ValueError, match=r"must concatenate 1 inputs \(2, 3\) along dim 0"):
            all_gather_rows(torch.empty(1, 2, 3), inp)
        out = torch.empty(2, 3)
        all_gather_rows(out, inp)
        assert torch.equal(out, inp)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- more ranks than GPUs


@pytest.mark.parametrize("gpus,local_rank,local_world,refused", [
    (1, 0, 2, True), (1, 1, 2, True), (2, 0, 2, False), (2, 1, 2, False), (4, 0, 8, True), (1, 0, None, False),
])
def test_more_ranks_than_gpus_is_refused_on_every_rank(gpus, local_rank, local_world, refused, monkeypatch):
    """LOCAL_WORLD_SIZE above the device count is refused on rank 0 too (its LOCAL_RANK 0 has a device): every rank
    must leave, or the ranks with a device wait in NCCL's start-up for the ones that left."""
    import torch

    from driffusion_rt import distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if local_world is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    if refused:
        with pytest.raises(ValueError, match=rf"{local_world} ranks on this node but only {gpus} CUDA device\(s\) "
                                             r"visible: .*NCCL cannot share a device"):
            distributed.rank_device("auto", local_rank)
    else:
        assert distributed.rank_device("auto", local_rank) == (torch.device("cuda", local_rank), "nccl")


def test_two_ranks_faking_one_gpu_exit_2_with_one_message(tmp_path):
    """Two torchrun ranks in processes that see one CUDA device (tests/one_gpu_worker.py): both leave before any
    CUDA or NCCL call, status 2, and the message is printed once (by rank 0)."""
    out = tmp_path / "out"
    r, took = torchrun(2, os.path.join(HERE, "one_gpu_worker.py"), "--model", "gmm", "--steps", "4", "--out", str(out),
                       timeout=120)
    text = r.stdout + r.stderr
    message = "2 ranks on this node but only 1 CUDA device(s) visible"
    assert r.returncode != 0 and text.count(message) == 1 and text.count("driffusion_rt: error:") == 1, text[-3000:]
    codes = re.findall(r"exitcode\s+: (-?\d+) ", text)  # the first rank out exited 2; the other 2 or torchrun's TERM
    assert codes and codes[-1] == "2" and set(codes) <= {"2", "-15"}, text[-3000:]
    assert "a CUDA device was used" not in text, text[-3000:]
    assert text.count("Traceback (most recent call last)") <= 1, text[-3000:]  # torchrun's own ChildFailedError
    assert took < 60, took  # prompt: nobody waits for a peer (the CPU start of two interpreters is most of it)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- barriers, peer failures


def _barrier_without_timeout(calls, real=None):
    """dist.barrier as torch 2.11 spells it (no `timeout` argument), recording each Work's wait timeout."""

    class Recorded:
        def __init__(self, work):
            self.work = work

        def wait(self, timeout=None):
            calls.append(timeout)
            return self.work.wait(timeout) if self.work is not None else True

    def barrier(group=None, async_op=False, device_ids=None):
        work = real(group=group, async_op=True, device_ids=device_ids) if real is not None else None
        if async_op:
            return Recorded(work)
        if work is not None:
            work.wait()
    return barrier


def test_ready_and_teardown_barriers_work_without_a_timeout_argument(monkeypatch):
    """torch 2.11's dist.barrier has no `timeout`: ready() and teardown() (and so bad_input's exit) must wait with the
    start-up timeout through the barrier's Work instead. A real one-rank gloo group."""
    import datetime

    import torch
    import torch.distributed as dist

    from driffusion_rt import distributed
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore(),
                            timeout=datetime.timedelta(seconds=30))
    try:
        waits = []
        monkeypatch.setattr(dist, "barrier", _barrier_without_timeout(waits, dist.barrier))
        info = distributed.DistInfo(0, 1, 0, torch.device("cpu"), "gloo", timeout_s=5, init_timeout_s=30)
        distributed.ready(info)
        distributed.teardown(info)  # its barrier, then destroy
        assert waits == [datetime.timedelta(seconds=30)] * 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _FailingWork:
    def __init__(self, error, after=0.0):
        self.error, self.after = error, after

    def wait(self, timeout=None):
        time.sleep(self.after)
        raise RuntimeError(self.error)


@pytest.mark.parametrize("error,says,not_says", [
    ("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234",
     r"^the barrier after loading failed after 0\.\d\d s: another rank has died \(the connection to it closed: "
     r"\[gloo/transport/tcp/pair\.cc:534\] Connection closed by peer", "did not complete"),
    ("[gloo/transport/tcp/pair.cc:598] Read error [127.0.0.1]:41234: Connection reset by peer",
     r"^the barrier after loading failed after 0\.\d\d s: another rank has died", "did not complete"),
    ("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv operation to complete",
     r"^the barrier after loading did not complete within 1800 s: another rank is hung or has died \(",
     "failed after|connection to it closed"),
])
def test_a_dead_peer_is_not_reported_as_a_timeout(error, says, not_says, monkeypatch):
    """The transport says the peer closed its connection 0.1 s in: the rank reports that it died and after how long,
    not that a 1800 s wait ran out; a real timeout still says so. The message names no rank (the printer adds it)."""
    import torch
    import torch.distributed as dist

    from driffusion_rt import distributed
    monkeypatch.setattr(dist, "barrier", lambda group=None, async_op=False, device_ids=None: _FailingWork(error, 0.1))
    info = distributed.DistInfo(1, 2, 1, torch.device("cpu"), "gloo", timeout_s=60, init_timeout_s=1800)
    with pytest.raises(distributed.CollectiveTimeout) as e:
        distributed.ready(info)
    assert re.search(says, str(e.value)), str(e.value)
    assert not re.search(not_says, str(e.value)) and "rank" not in str(e.value).split(":")[0], str(e.value)
    assert e.value.rank == 1 and isinstance(e.value.__cause__, RuntimeError)


def test_a_collective_error_that_is_not_a_peer_failure_is_raised_as_it_is(monkeypatch):
    import torch
    import torch.distributed as dist

    from driffusion_rt import distributed
    monkeypatch.setattr(dist, "barrier", lambda group=None, async_op=False, device_ids=None:
                        _FailingWork("Tensors must be contiguous"))
    with pytest.raises(RuntimeError, match="^Tensors must be contiguous$"):
        distributed.ready(distributed.DistInfo(0, 2, 0, torch.device("cpu"), "gloo"))
