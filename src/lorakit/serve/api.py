"""`lorakit serve --api`: an OpenAI-compatible HTTP server for one base model and every adapter on it (FastAPI).

Endpoints as vLLM names them: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streamed as
server-sent events in OpenAI's chunk format when `stream` is true), POST /v1/load_lora_adapter and
/v1/unload_lora_adapter, GET /health. A request's `model` picks the adapter; the base answers to its own name. All
requests go through one Engine (inference/engine.py): requests for different adapters share each decode step.

Safe by default: the CLI binds 127.0.0.1 and wants --api-key for any other host; with a key, every /v1 request needs
`Authorization: Bearer KEY` (compared in constant time); adapters load at run time only from under --adapter-root
(no path outside it, no symlink out of it) and only onto their own base; bodies are limited in size; max_tokens is
capped by the context; a full queue answers 429 with Retry-After. Every error is OpenAI's JSON error object
({"error": {"message", "type", "param", "code"}}), never a traceback, and the server keeps serving.
"""
from __future__ import annotations

import hmac
import sys
import threading
from pathlib import Path

from fastapi import HTTPException

from ..errors import UserError
from .routes import add_routes
from .served import APIError, Served, error_response

GIL_SWITCH_SECONDS = 5e-4  # the server process's sys.setswitchinterval (see serve_api)


def build_app(served: Served):
    """The FastAPI application serving `served`."""
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=served.max_body)

    @app.middleware("http")
    async def authorise(request: HTTPRequest, call_next):
        if served.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {served.api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error_response(APIError(401, "a missing or wrong API key: send Authorization: Bearer KEY",
                                               "AuthenticationError", code="invalid_api_key"))
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):  # an unknown path (404), a wrong method (405), ...
        kinds = {404: "NotFoundError", 405: "MethodNotAllowedError", 413: "invalid_request_error"}
        message = (f"{request.method} {request.url.path}: {error.detail}" if error.status_code in (404, 405)
                   else str(error.detail))
        kind = kinds.get(error.status_code, "invalid_request_error")
        return error_response(APIError(error.status_code, message, kind,
                                       code="body_too_large" if error.status_code == 413 else None,
                                       headers=dict(error.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"the body is not valid JSON ({first.get('msg', '')})", code="bad_json"))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(APIError(422, f"{where}: {first.get('msg', 'invalid')}", param=where or None))

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):  # the server keeps serving; the client hears one line
        return error_response(APIError(500, f"{type(error).__name__}: {error}", "InternalServerError"))

    add_routes(app, served)
    return app


class BodyLimit:
    """ASGI middleware: a request whose body passes `limit` bytes is answered 413 (by Content-Length, or while it
    streams in)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = APIError(413, f"the request body is over {self.limit:,} bytes", code="body_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error_response(too_big)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI would answer any error while reading the body as a 400
                raise HTTPException(413, str(too_big))
            return message

        await self.app(scope, counted, send)


def open_served(model: str | None, adapters: list[str], api_key: str | None = None, adapter_root: str | None = None,
                max_queue: int = 64, slots: int = 16, max_len: int | None = None, dtype: str = "auto",
                prefix_cache_mb: float | None = None) -> Served:
    """Load the base (the first adapter's, unless `model` names one) and every adapter onto it, with an engine
    over them that serve_api runs. Adapters named on the command line load from anywhere the user points; at run
    time, only from under `adapter_root`. `dtype`: the weights' (auto, fp32, bf16, int8; inference/precision.py).
    `prefix_cache_mb`: memory for prompt prefixes' keys and values (inference/prefix_cache.py; None: its default)."""
    from ..engine import load_adapter, read_metadata
    from ..inference.precision import cast_for_inference
    from ..inference.engine import Engine
    from ..inference.prefix_cache import PREFIX_CACHE_MB
    from ..models import adapter_dir, foreign_base, load_model
    from .workbench import adapter_name
    dirs = [adapter_dir(path) for path in adapters]
    first = read_metadata(dirs[0]) if dirs else {}
    spec = model or first.get("model") or "smollm2"
    base, tok = load_model(spec, "instruct")
    context = getattr(base.config, "max_position_embeddings", None) or 2048
    names: dict[str, str] = {}
    for d in dirs:
        trained_on = foreign_base(d, spec, base.config._name_or_path)
        if trained_on:
            raise UserError(f"{d}: this adapter was trained on base model {trained_on!r}; the server serves {spec!r} "
                            "(pass --model, or serve its own base)")
        name = adapter_name(d, set(names) | {spec})
        load_adapter(base, d, name, quantize=read_metadata(d).get("quantize"))
        names[name] = str(d)
    base.eval()
    used = cast_for_inference(base, dtype)
    engine = Engine(base, tok, slots=slots, max_len=min(max_len or 1024, context), max_queue=max_queue,
                    prefix_cache_mb=PREFIX_CACHE_MB if prefix_cache_mb is None else prefix_cache_mb)
    root = Path(adapter_root).expanduser() if adapter_root else None
    return Served(engine, spec, str(base.config._name_or_path or spec), names, api_key, root, dtype=used)


def serve_api(served: Served, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM): HTTP (uvicorn) on a thread, the engine on this one, the main
    thread, where PyTorch computes fastest (see Engine.run)."""
    import signal

    import uvicorn
    server = uvicorn.Server(uvicorn.Config(build_app(served), host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    # The engine thread's prompts run through Python between PyTorch's ops, each of which lets the GIL go; with
    # Python's default 5 ms switch interval a burst of HTTP work (a step's worth of streamed chunks) then holds it for
    # milliseconds at a time. 0.5 ms hands it back soon after the engine asks (measured: docs/api.md).
    switch = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    http = threading.Thread(target=server.run, name="lorakit-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    http.start()
    try:
        served.engine.run(alive=http.is_alive)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.setswitchinterval(switch)
        server.should_exit = True
        http.join(timeout=10)
        served.engine.close()
    if not server.started:
        raise UserError(f"the server could not listen on {host}:{port} (the line above says why)")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
