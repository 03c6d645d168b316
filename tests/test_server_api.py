"""The HTTP front on an in-process engine: the OpenAI-compatible images API through the official `openai` client,
latent models answering their latents, queue slots freed by clients that leave, and Retry-After."""
import base64
import io
import json
import math
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import LocalServer, get, post, send_and_leave_later, wait_for  # noqa: E402

from driffusion_rt import services  # noqa: E402
from driffusion_rt.engine import Engine  # noqa: E402
from driffusion_rt.requests import parse  # noqa: E402
from driffusion_rt.sampler import Sampler  # noqa: E402

openai = pytest.importorskip("openai", reason="the openai client is a test dependency (setup.py's test extra)")


def test_the_openai_client_generates_lists_models_and_gets_openai_errors():
    engine = Engine(services.load_service("digits", torch.device("cpu")))
    with LocalServer(engine) as srv:
        srv.start()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        extra = {"steps": 6, "seed": 3, "mode": "aggressive", "parallel": 2}
        r = client.images.generate(model="digits", prompt="42", n=2, response_format="b64_json", extra_body=extra)
        pngs = [base64.b64decode(d.b64_json) for d in r.data]
        assert len(pngs) == 2 and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs) and r.created > 0
        # the same request through /generate gives the same images, byte for byte
        status, _, body = post(srv.port, {"prompt": "42", "num_images": 2, "response": "base64", **extra})
        assert status == 200 and [base64.b64decode(im) for im in json.loads(body)["images"]] == pngs
        assert [m.id for m in client.models.list()] == ["digits"]
        bad = [({"extra_body": {"steps": 0}}, openai.BadRequestError, 400, "steps", None),
               ({"n": 99}, openai.BadRequestError, 400, "n", None),
               ({"size": "big"}, openai.BadRequestError, 400, "size", None),
               ({"response_format": "url"}, openai.BadRequestError, 400, "response_format", None),
               ({"extra_body": {"flavour": 1}}, openai.BadRequestError, 400, "flavour", None),
               ({"model": "sdxl"}, openai.NotFoundError, 404, "model", "model_not_found")]
        for kwargs, kind, status, param, code in bad:
            with pytest.raises(kind) as e:
                client.images.generate(prompt="42", **kwargs)
            error = e.value.response.json()
            assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}, error
            assert e.value.status_code == status and error["error"]["param"] == param, error
            assert error["error"]["type"] == "invalid_request_error" and error["error"]["code"] == code
            assert error["error"]["message"]
    served = [json.loads(line) for line in srv.lines if json.loads(line)["path"] == "/v1/images/generations"]
    assert [r["status"] for r in served] == [200] + [s for _, _, s, _, _ in bad]


def test_latent_models_answer_their_latents_and_the_images_api_refuses_them_before_any_work():
    """`serve --model fixed` (or gmm) samples a request and answers its latents (.npy in JSON), equal bit for bit
    to the sampler's; the images API refuses such a model at once (earlier: 422 "produces no images" after all
    the sampling)."""
    service = services.load_service("fixed", torch.device("cpu"), cost=0.0)
    engine = Engine(service)
    spec = {"steps": 5, "mode": "conservative", "parallel": 2, "seed": 4, "scheduler": "euler"}
    with LocalServer(engine) as srv:
        srv.start()
        status, _, body = post(srv.port, spec)
        assert status == 200, body
        answer = json.loads(body)
        latents = np.load(io.BytesIO(base64.b64decode(answer["latents"])), allow_pickle=False)
        assert list(latents.shape) == answer["shape"] == [4, 4, 16, 16] and answer["dtype"] == "float32"
        request = service.admit(parse(spec, service))
        ref = Sampler(service.model).apply(service.prepare(request), request.options).sample
        assert torch.equal(torch.from_numpy(latents), ref)
        assert answer["stats"]["steps"] == 5 and answer["stats"]["serial_rounds"] == 4
        status, _, body = post(srv.port, {"prompt": "x"}, path="/v1/images/generations")
        error = json.loads(body)["error"]
        assert status == 400 and error["param"] == "model" and "produces latents, not images" in error["message"]
        assert post(srv.port, {**spec, "response": "png"})[0] == 400
        assert engine.served == 1


def test_a_full_queue_answers_503_and_clients_that_leave_free_their_slots_at_once():
    """The engine is held (not running), max_queue 2: two requests wait, a third gets 503 with Retry-After. Their
    clients leave: both leave the queue at once (/health's queued drops to 0, each answered 499 without any
    sampling), so the next request is queued, not refused (earlier the slots stayed taken until the running
    request ended: live clients got 503 while nobody waited)."""
    engine = Engine(services.load_service("digits", torch.device("cpu")), max_queue=2)
    with LocalServer(engine) as srv:
        gone = [send_and_leave_later(srv.port, {"prompt": "3", "steps": 4}) for _ in range(2)]
        wait_for(lambda: json.loads(get(srv.port, "/health")[1])["queued"] == 2, what="two queued")
        status, headers, body = post(srv.port, {"prompt": "4", "steps": 4})
        assert status == 503 and int(headers["Retry-After"]) >= 1 and "busy" in json.loads(body)["error"]
        for sock in gone:
            sock.close()
        wait_for(lambda: json.loads(get(srv.port, "/health")[1])["queued"] == 0, timeout=10, what="slots freed")
        answer = {}
        client = threading.Thread(target=lambda: answer.update(r=post(srv.port, {"prompt": "5", "steps": 4})))
        client.start()
        wait_for(lambda: engine.queued == 1, what="the next request queued")
        srv.start()
        client.join(timeout=120)
        assert answer["r"][0] == 200 and answer["r"][2][:4] == b"\x89PNG"
        assert engine.served == 1  # the requests whose clients left never reached the sampler
    assert sorted(json.loads(line)["status"] for line in srv.lines if '"/generate"' in line) == [200, 499, 499, 503]


def test_retry_after_is_the_service_time_of_the_requests_ahead():
    """One request at a time (--max-batch 1), max_queue 3. Retry-After is the median service time of the last
    requests (no queue wait) times the requests waiting, divided by those served at once, so it is at most the time
    the queue then takes to drain (earlier: a 1 s prior and latencies with their queue wait, times the queue + 1,
    several times the real drain time)."""
    # a model that sleeps (not one that computes): each request takes 0.6 s whatever the machine's load, so the
    # other clients are surely queued behind the one in flight
    engine = Engine(services.load_service("fixed", torch.device("cpu"), cost=0.03), max_batch=1, max_queue=3)
    spec = {"steps": 20, "mode": "sequential", "num_images": 1}
    with LocalServer(engine) as srv:
        srv.start()
        for _ in range(3):  # the service time is measured on requests served alone
            assert post(srv.port, spec)[0] == 200
        answers = []
        clients = [threading.Thread(target=lambda: answers.append((post(srv.port, spec)[0], time.monotonic())))
                   for _ in range(4)]
        for c in clients:
            c.start()
        health = lambda: json.loads(get(srv.port, "/health")[1])  # noqa: E731
        wait_for(lambda: (h := health())["in_flight"] == 1 and h["queued"] == 3, what="one running, three waiting")
        status, headers, _ = post(srv.port, spec)
        refused = time.monotonic()
        for c in clients:
            c.join(timeout=60)
        drained = max(t for _, t in answers) - refused
        assert status == 503 and [s for s, _ in answers] == [200] * 4
        retry = int(headers["Retry-After"])
        print(f"\nRetry-After {retry} s; the queue drained in {drained:.2f} s")
        assert 1 <= retry <= max(1, math.ceil(drained))


@pytest.mark.parametrize("args,message", [(["--max-batch", "0"], "--max-batch must be >= 1 rows, got 0"),
                                          (["--drain-seconds", "-1"], "--drain-seconds must be >= 0, got -1.0"),
                                          (["--draft-policy", "greedy"], "argument --draft-policy: invalid choice")])
def test_bad_serving_flags_exit_2_before_the_model_loads(args, message, monkeypatch, capsys):
    from driffusion_rt import serve
    monkeypatch.setattr(serve, "load_service", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        serve.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
