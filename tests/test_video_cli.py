"""Video through the command line and the HTTP server: a playable MP4 (read back with imageio: frame count and
size) and the run's JSON with the decode's peak memory; bad video input exits 2 before any work."""
import base64
import json
import os
import subprocess
import sys

import imageio.v3 as iio
import pytest

import tiny_pipelines as tp
import tiny_video as tv
from serving import kill_job, post, start_server

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_cli")
    return {"wan21": tv.build("wan21", str(root / "wan21")), "sd15": tp.build("sd15", str(root / "sd15"))}


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "driffusion_rt.generate", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_writes_a_playable_mp4_and_the_run_json(dirs, tmp_path):
    out = tmp_path / "out"
    r = run_cli("--model", dirs["wan21"], "--prompt", "a red cat", "--negative-prompt", "blurry", "--steps", "4",
                "--num-frames", "9", "--fps", "8", "--height", "32", "--width", "48", "--parallel", "2",
                "--num-images", "2", "--warmup", "0", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    run_json, = out.glob("pipeline-aggressive-n2-s4-*-jump-float32-seed0-*.json")  # names: see test_generate.py
    stem = run_json.name[:-len(".json")]
    run = json.loads(run_json.read_text())
    assert run["files"] == [f"{stem}-0.mp4", f"{stem}-1.mp4"]
    for name in run["files"]:
        frames = iio.imread(out / name)
        assert frames.shape == (9, 32, 48, 3), frames.shape
        meta = iio.immeta(out / name)
        assert meta["fps"] == 8 and meta["codec"] == "h264"
    assert run["num_frames"] == 9 and run["fps"] == 8 and run["serial_rounds"] == run["serial_rounds_plan"] == 3
    assert run["decode_memory"] == "cpu-rss" and run["decode_peak_bytes"] >= 0 and run["decode_s"] > 0
    assert run["vae_slicing"] and run["vae_tiling"]
    assert sorted(p.name for p in out.iterdir()) == sorted(run["files"] + [f"{stem}.json"])  # no temporary files


@pytest.mark.parametrize("model,args,message", [
    ("wan21", ["--num-frames", "10"], "num_frames=10 is not of the form 4k+1, which the wan pipeline needs (its VAE "
                                      "compresses time by 4 after the first frame); use e.g. 9 or 13"),
    ("wan21", ["--height", "40"], "height=40 is not a multiple of 16, which the wan pipeline needs"),
    ("wan21", ["--fps", "0"], "fps=0 is out of range: allowed 1..240"),
    ("sd15", ["--num-frames", "9"], "num_frames applies to video pipelines (wan, hunyuan-video-1.5, ltx); this model "
                                    "makes images"),
    ("digits", ["--fps", "12"], "fps applies to video pipelines (wan, hunyuan-video-1.5, ltx); this model makes "
                                "images"),
])
def test_bad_video_input_exits_2_with_one_line_and_no_output(dirs, model, args, message, tmp_path):
    r = run_cli("--model", dirs.get(model, model), "--prompt", "a cat", "--steps", "2", *args,
                "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    error_lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1, r.stderr


@pytest.mark.slow
def test_http_answers_video_mp4_on_two_ranks(dirs, tmp_path):
    proc, port = start_server(tmp_path, "--model", dirs["wan21"], "--max-requests", "5", "--max-frames", "17")
    try:
        base = {"prompt": "a red cat", "steps": 4, "height": 32, "width": 32, "parallel": 2}
        status, headers, body = post(port, {**base, "num_frames": 5, "fps": 10})
        assert status == 200 and headers["Content-Type"] == "video/mp4", body[:300]
        mp4 = tmp_path / "answer.mp4"
        mp4.write_bytes(body)
        assert iio.imread(mp4).shape == (5, 32, 32, 3) and iio.immeta(mp4)["fps"] == 10
        assert headers["X-Driffusion-num-frames"] == "5" and headers["X-Driffusion-decode-memory"] == "cpu-rss"
        assert int(headers["X-Driffusion-decode-peak-bytes"]) >= 0 and headers["X-Driffusion-serial-rounds"] == "3"

        status, _, body = post(port, {**base, "num_frames": 9, "num_images": 2, "response": "base64"})
        data = json.loads(body)
        assert status == 200 and len(data["videos"]) == 2 and data["stats"]["num_frames"] == 9, body[:300]
        assert data["stats"]["fps"] == 16  # Wan 2.1's default
        (tmp_path / "b.mp4").write_bytes(base64.b64decode(data["videos"][1]))
        assert iio.imread(tmp_path / "b.mp4").shape == (9, 32, 32, 3)

        status, _, body = post(port, {**base, "num_frames": 10})
        assert status == 422 and "num_frames=10 is not of the form 4k+1" in json.loads(body)["error"]
        status, _, body = post(port, {**base, "num_frames": 21})
        assert status == 422 and "num_frames=21 is out of range: allowed 1..17" in json.loads(body)["error"]
        status, _, body = post(port, {**base, "response": "png"})
        assert status == 400 and "response must be 'mp4' or 'base64' for video model" in json.loads(body)["error"]
        status, _, body = post(port, {**base, "num_frames": 5, "fps": 500})
        assert status == 422 and "fps=500 is out of range: allowed 1..240" in json.loads(body)["error"]
        assert proc.wait(timeout=120) == 0  # --max-requests 5 (answered ones: the 400 never reaches the engine)
    finally:
        kill_job(proc)


def test_video_fields_on_an_image_model_are_refused_by_the_service():
    import torch
    from cases import loaded_check
    from driffusion_rt import requests, services
    digits = services.load_service("digits", torch.device("cpu"))
    for key, value in (("num_frames", 9), ("fps", 12)):
        with pytest.raises(requests.RequestError, match=f"{key} applies to video pipelines \\(wan, "
                                                        f"hunyuan-video-1.5, ltx\\); this model makes images"):
            loaded_check(digits, {"prompt": "12", key: value})
