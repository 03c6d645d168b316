"""Request checks before any weights load: a pipeline's rules read from its configs equal the loaded pipeline's,
and the command line rejects a bad size or scheduler for a pipeline directory without loading it."""
import os
import sys

import pytest

from driffusion_rt import generate, model_ref, pipelines, requests, services

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_pipelines  # noqa: E402
from cases import check_request, loaded_check  # noqa: E402


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_rules_from_configs_equal_the_loaded_pipeline(kind, tmp_path):
    path = tiny_pipelines.build(kind, str(tmp_path))
    ref = model_ref.inspect_model(path)
    pipe = pipelines.load_pipeline(path)
    assert ref.kind == "pipeline" and ref.source == "local" and ref.rules == services.rules_of_pipe(pipe)
    mult, _ = pipelines.size_multiple(pipe)
    h, w = pipelines.default_size(pipe)
    assert ref.rules.multiple == mult and ref.rules.default_size == (h, w)
    # the same verdicts as the pipeline's own check, for good and bad sizes
    for size in (mult, 2 * mult, mult + 1, 3 * mult - 2):
        try:
            pipelines.check_size(pipe, size, mult)
            ok = True
        except ValueError:
            ok = False
        spec = {"prompt": "a red cat", "height": size, "width": mult}
        if ok:
            assert check_request(ref, spec)["height"] == size
        else:
            with pytest.raises(requests.RequestError, match=f"height={size} is not a multiple of {mult}"):
                check_request(ref, spec)
    r = check_request(ref, {"prompt": "a red cat"})
    assert (r["height"], r["width"]) == (h, w) and r["guidance_scale"] == pipelines.DEFAULT_GUIDANCE[ref.rules.family]
    # the scheduler a request without one resolves to is the one the pipeline module builds for it
    assert r["scheduler"] == requests.scheduler_name(pipelines.make_scheduler(pipe, None))
    assert r["steps"] == pipelines.DEFAULT_STEPS[ref.rules.family]


def test_pipeline_requests_fail_before_loading(tmp_path, monkeypatch, capsys):
    path = tiny_pipelines.build("sd15", str(tmp_path))
    monkeypatch.setattr(generate, "load_service", lambda *a, **k: pytest.fail("the model was loaded"))
    for args, message in ((["--height", "30"], "height=30 is not a multiple of 8"),
                          (["--scheduler", "flow"], "scheduler 'flow' is not supported for sd pipelines"),
                          (["--prompt", " "], "prompt must be a non-empty string for the sd pipeline"),
                          (["--height", "4096"], "height=4096 is out of range: allowed 1..2048")):
        prompt = [] if "--prompt" in args else ["--prompt", "a red cat"]
        with pytest.raises(SystemExit) as e:
            generate.main(["--model", path, *prompt, *args, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("error") == 1, err
    assert not (tmp_path / "out").exists()


def test_unsupported_and_incomplete_directories(tmp_path):
    bad = tiny_pipelines.build_unsupported(str(tmp_path / "ddpm"))
    with pytest.raises(model_ref.ModelUnavailable, match="unsupported pipeline family"):
        model_ref.inspect_model(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(model_ref.ModelUnavailable, match="has no model_index.json"):
        model_ref.inspect_model(str(tmp_path / "empty"))


def test_video_requests_are_checked_in_range_before_loading_and_by_rule_once_loaded(tmp_path):
    import torch

    import tiny_video
    path = tiny_video.build("wan21", str(tmp_path))
    ref = model_ref.inspect_model(path)
    assert ref.rules.video and ref.rules.multiple is None  # the family's rules come with the loaded pipeline
    spec = {"prompt": "a red cat", "num_frames": 10, "fps": 8}
    assert check_request(ref, spec)["num_frames"] == 10  # in range; the 4k+1 rule needs the pipeline
    for bad, message in (({"num_frames": 300}, "num_frames=300 is out of range: allowed 1..257"),
                         ({"fps": 0}, "fps=0 is out of range: allowed 1..240"),
                         ({"image": "AAAA"}, "image applies to image pipelines \\(sd, .*\\); this model makes videos"),
                         ({"lora_scale": 0.5}, "lora_scale applies to image pipelines")):
        with pytest.raises(requests.RequestError, match=message):
            check_request(ref, {**spec, **bad}, requests.Limits())
    service = services.load_service(path, torch.device("cpu"))
    with pytest.raises(requests.RequestError, match="num_frames=10 is not of the form 4k\\+1"):
        loaded_check(service, spec)
    r = loaded_check(service, {"prompt": "a red cat"})
    assert r["num_frames"] >= 1 and r["fps"] >= 1 and r["scheduler"] == ref.rules.scheduler
