"""The OpenAI-compatible images API of the HTTP front (docs/server.md): what clients and gateways that speak OpenAI's
images API expect, on the same engine and queue as POST /generate.

    POST /v1/images/generations   {"prompt", "n", "size": "WxH", "response_format": "b64_json", "model"} and the
                                  runtime's own fields as extra body fields (seed, steps, guidance_scale, mode, ...)
                                  -> {"created", "data": [{"b64_json": PNG}, ...]}
    GET  /v1/models               -> {"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}

Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 invalid_request_error for what
/generate answers 422 (param names the field when the message does), 404 for another model name, 500 server_error,
503 server_error with Retry-After when the queue is full or the server is stopping. Only images: a latent model
(gmm, fixed) or a video model is refused before any work (POST /generate serves them).
"""
import base64
import json
import re
import time

from .outputs import png_bytes

OWNER = "driffusion_rt"
RENAMED = {"n": "num_images"}  # OpenAI's field -> the runtime's
PARAMS = {"num_images": "n", "width": "size", "height": "size"}  # the runtime's field -> OpenAI's, for `param`
IGNORED = ("user",)  # OpenAI fields that change nothing here
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class OpenAIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def param_of(message: str) -> str | None:
    """The request field an error message names first (as OpenAI calls it), or None."""
    m = re.match(r"unknown request field\(s\) \['([^']+)'", message) or re.match(r"(?:unknown )?([a-z_]+)", message)
    if m is None:
        return None
    name = m.group(1)
    known = name in PARAMS or name in ("prompt", "negative_prompt", "steps", "guidance_scale", "seed", "scheduler",
                                       "mode", "parallel", "drafts", "subintervals", "preconditioning", "window",
                                       "tolerance", "model", "size", "response_format")
    return PARAMS.get(name, name) if known or message.startswith("unknown request field") else None


def images_spec(body, model_name: str) -> dict:
    """The runtime request of an images body: n -> num_images, size "WxH" (or "auto") -> width and height,
    response_format b64_json only, model (when given) the served model's name, `user` ignored; every other field
    goes to the runtime's checks as it is. Raises OpenAIError."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    spec = {RENAMED.get(k, k): v for k, v in body.items() if k not in IGNORED}
    model = spec.pop("model", None)
    if model is not None and model != model_name:
        raise OpenAIError(404, f"model {model!r} is not served here; this server runs {model_name!r}", "model",
                          "model_not_found")
    fmt = spec.pop("response_format", None)
    if fmt not in (None, "b64_json"):
        raise OpenAIError(400, f"response_format must be 'b64_json' (images are returned inline), got {fmt!r}",
                          "response_format")
    size = spec.pop("size", None)
    if size not in (None, "auto"):
        m = _SIZE.match(size) if isinstance(size, str) else None
        if m is None:
            raise OpenAIError(400, f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', got {size!r}", "size")
        spec["width"], spec["height"] = int(m.group(1)), int(m.group(2))
    return spec


def routes(engine, answer, max_body: int) -> list:
    """The Starlette routes. `answer(spec, request)` is how the HTTP front runs a request on the engine (serve.py):
    the engine's Result, or (status, message, headers) when the request was refused (queue full, stopping)."""
    from starlette.responses import JSONResponse  # optional: the serve extra
    from starlette.routing import Route  # optional: the serve extra

    service = engine.service
    created = int(time.time())

    def error(e: OpenAIError, headers=None) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def generations(request):
        try:
            if int(request.headers.get("content-length") or 0) > max_body:
                raise OpenAIError(413, f"request body over {max_body} bytes")
            raw = await request.body()
            if len(raw) > max_body:
                raise OpenAIError(413, f"request body over {max_body} bytes")
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise OpenAIError(400, f"request body is not JSON: {e}") from None
            spec = images_spec(body, service.name)
            if service.output != "images":
                raise OpenAIError(400, f"model {service.name} produces {service.output}, not images; POST /generate "
                                       f"serves it", "model", "unsupported_model")
        except OpenAIError as e:
            return error(e)
        outcome = await answer(spec, request)
        if not hasattr(outcome, "ok"):  # refused: (status, message, headers)
            status, message, headers = outcome
            return error(OpenAIError(status, message, code="server_busy" if status == 503 else None), headers)
        if not outcome.ok:
            status = {422: 400}.get(outcome.status, outcome.status)
            return error(OpenAIError(status, outcome.error, param_of(outcome.error) if status == 400 else None))
        data = [{"b64_json": base64.b64encode(png_bytes(im)).decode()} for im in outcome.images]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": service.name, "object": "model", "created": created,
                                                         "owned_by": OWNER}]})

    return [Route("/v1/images/generations", generations, methods=["POST"]), Route("/v1/models", models)]
