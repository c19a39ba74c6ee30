"""What the API server serves and how it answers errors: the engine over the base model, the base's names, the adapters
by name (`Served`), and OpenAI's JSON error object with its HTTP status (`APIError`)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..inference.engine import Engine

MAX_BODY = 1 << 20  # bytes a request body may have
POLL = 0.25  # seconds between checks that a non-streamed request's client is still there


class APIError(Exception):
    """An error for the client, as OpenAI's error object with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Served:
    """What the server serves: the engine over the base model, the base's names, the adapters by name."""

    engine: Engine
    base: str  # the name the base answers to (the model spec the server was started with)
    base_root: str  # where the base came from
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter directory
    api_key: str | None = None
    adapter_root: Path | None = None
    template: str = "chat"
    dtype: str = "fp32"  # what the weights are in (adapters loaded at run time are cast to it)
    max_body: int = MAX_BODY
    handoff: object = None  # handoff.Handoff to the HTTP loop, made by the first request
    created: int = field(default_factory=lambda: int(time.time()))
    changing: threading.Lock = field(default_factory=threading.Lock)  # one load or unload at a time

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base); 404 model_not_found for anything else."""
        names = {self.base, getattr(self.engine.model.config, "_name_or_path", self.base)}
        if model in names:
            return None
        if model in self.adapters:
            return model
        raise APIError(404, f"The model `{model}` does not exist. GET /v1/models lists the base ({self.base}) and the "
                       "adapters", "NotFoundError", "model", "model_not_found")


def error_response(error: APIError):
    from fastapi.responses import JSONResponse
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
