"""The embedded digits model (issue 6): shipped weights load offline and sample; prompt parsing; atomic PNG grids;
the training script's output loads back; perf/quality.py --quick writes its table."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import driffusion_rt
from driffusion_rt import Sampler, train_digits
from driffusion_rt import digits as dg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    return dg.load_digits_model()


def test_shipped_weights_are_inside_the_package_and_small():
    pkg = Path(driffusion_rt.__file__).resolve().parent
    assert dg.ASSET_DIR == pkg / "assets" / "digits"
    weights = dg.ASSET_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 10 * 2 ** 20
    for name in ("config.json", "scheduler_config.json"):
        assert (dg.ASSET_DIR / name).is_file()
    # flat layout: setup.py's package_data glob "assets/*/*" picks every file up
    assert all(p.is_file() for p in dg.ASSET_DIR.iterdir())


def test_shipped_model_samples_offline(shipped, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    unet, sched = shipped
    assert unet.config.num_class_embeds == dg.NULL_CLASS + 1 and unet.config.sample_size == dg.RESOLUTION
    assert sched.config.prediction_type == "v_prediction" and not sched.config.clip_sample
    images, out = dg.sample_digits("07", steps=6, mode="aggressive", parallel=2, seed=1)
    assert images.shape == (2, dg.RESOLUTION, dg.RESOLUTION) and images.dtype == torch.uint8
    assert out.sample.shape == (2, 1, dg.RESOLUTION, dg.RESOLUTION) and torch.isfinite(out.sample).all()
    assert out.stats.serial_rounds == out.plan.serial_rounds == 4  # 1 + ceil(5 / 2) rounds with drafts
    # parallel=1 reproduces the sequential sampler, through a persistent Sampler too
    model = dg.DigitsModel(unet, guidance_scale=dg.DEFAULT_GUIDANCE)
    seq, _ = dg.sample_digits([0, 7], steps=6, mode="sequential", seed=1, sampler=Sampler(model))
    one, _ = dg.sample_digits("07", steps=6, mode="conservative", parallel=1, seed=1)
    assert torch.equal(seq, one)


def test_guidance_is_one_batched_call(shipped):
    unet, _ = shipped
    calls = []
    unet_fwd = unet.forward

    def spy(x, t, class_labels=None, **kw):
        calls.append(len(x))
        return unet_fwd(x, t, class_labels=class_labels, **kw)

    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500, 20])
    labels = torch.tensor([1, 2, 3])
    model = dg.DigitsModel(unet, guidance_scale=3.0)
    with torch.no_grad():
        cond = unet(x, t, class_labels=labels).sample
        uncond = unet(x, t, class_labels=torch.full_like(labels, dg.NULL_CLASS)).sample
    unet.forward = spy
    try:
        out = model(x, t, labels=labels)
    finally:
        del unet.forward
    assert calls == [6]
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model(x, t, labels=labels, guidance_scale=1.0), cond)
    with pytest.raises(ValueError, match="labels has 2 entries for a model batch of 3"):
        model(x, t, labels=labels[:2])


def test_parse_prompt():
    assert dg.parse_prompt("0123456789").tolist() == list(range(10))
    assert dg.parse_prompt(" 4 2,7 ").tolist() == [4, 2, 7]
    assert dg.parse_prompt([3, 3]).tolist() == [3, 3]
    with pytest.raises(ValueError, match=r"not digits 0-9: '-', 'a', 'x'"):
        dg.parse_prompt("1a2x-3")
    with pytest.raises(ValueError, match="names no digits"):
        dg.parse_prompt("  ")
    with pytest.raises(ValueError, match="must be in 0..9"):
        dg.parse_prompt([1, 12])


def test_to_images_range():
    lat = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5)
    assert dg.to_images(lat).tolist() == [[[0, 0, 128, 255, 255]]]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_save_grid_is_atomic(tmp_path, monkeypatch):
    images = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)
    path = dg.save_grid(images, tmp_path / "grid.png", scale=4, pad=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's 0600
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (3 * 33 + 1, 33 + 1)
        assert im.getpixel((1, 1)) == 0 and im.getpixel((1 + 33 + 4, 1)) == 65  # image 1, pixel (0, 1)
    before = path.read_bytes()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        dg.save_grid(images[:1], path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]
    with pytest.raises(ValueError, match="uint8"):
        dg.save_grid(images.float(), tmp_path / "bad.png")


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_digits"):
        dg.load_digits_model(tmp_path)


def test_training_script_output_loads(tmp_path, capsys):
    assert train_digits.main(["--out", str(tmp_path), "--steps", "2", "--warmup", "1", "--log-every", "1"]) == 0
    assert "wall time" in capsys.readouterr().out
    unet, sched = dg.load_digits_model(tmp_path, scheduler="ddpm")
    assert type(sched).__name__ == "DDPMScheduler" and sched.config.prediction_type == "v_prediction"
    assert json.loads((tmp_path / "train_info.json").read_text())["steps"] == 2
    assert unet.config.num_class_embeds == 11


def test_quality_quick_writes_table(tmp_path):
    spec = importlib.util.spec_from_file_location("perf_quality", ROOT / "perf" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    args = quality.parse_args(["--quick", "--out", str(tmp_path), "--classifier-epochs", "20"])
    meta, md = quality.run(args, log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quality.json", "quality.md"]
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    modes = ["sequential"] + [f"{m}{d}" for d in ("", " +extrapolate") for m in ("aggressive", "conservative")
                              for _ in (2, 4, 8)] + [f"{m} (tol 0.05)" for m in ("picard", "parasolver") for _ in (2, 4, 8)]
    for name in ("dpm++2m", "unipc"):  # further schedulers: their own sequential row, then the parallel modes
        modes += [f"{name}: sequential"] + [f"{name}: {m}" for m in ("aggressive", "conservative") for _ in (2, 4, 8)]
    assert [r["mode"] for r in rows] == modes
    assert [r["n"] for r in rows] == [1] + [2, 4, 8] * 6 + ([1] + [2, 4, 8] * 2) * 2
    for first in (0, 19, 26):  # each scheduler's deviations are measured against its own sequential sample
        assert rows[first]["digits_rel_dev"] == 0 and rows[first]["gmm_same_comp"] == 1
    assert all(0 <= r["digits_class_acc"] <= 1 and r["gmm_sw"] > 0 for r in rows)
    # a static plan's serial rounds are the plan's; the iterative modes report what they ran
    assert [r["serial_rounds"] for r in rows[1:4]] == [6, 4, 3] and all(r["serial_rounds"] >= 1 for r in rows)
    assert (tmp_path / "quality.md").read_text() == md and md.count("\n| ") == 2 + len(modes)  # + 2 reference rows
