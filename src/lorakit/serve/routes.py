"""The OpenAI-compatible endpoints: their request shapes, how a request becomes an engine Request, and the response
shapes (OpenAI's, with vLLM's model cards and adapter routes). Needs FastAPI (lorakit[serve], or Gradio's)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..data.chat_template import render
from ..engine import delete_adapter, load_adapter, read_metadata
from ..inference.precision import cast_for_inference
from ..errors import UserError
from ..inference import Sampling
from ..inference.engine import Event, QueueFull, Request, Stopped
from ..models import adapter_dir, foreign_base
from .handoff import Handoff
from .served import POLL, APIError, Served


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict] | None = None


# OpenAI's fields this server does not compute, with the value that asks for nothing: any other value is a 400,
# rather than an answer that silently ignores it.
UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "best_of": (None, 1),
               "echo": (None, False), "suffix": (None, ""), "audio": (None,), "modalities": (None, ["text"])}


class Generation(BaseModel):
    """What chat and completions requests share. Other fields (`user`, `metadata`, ...) are accepted and have no
    effect; the fields of UNSUPPORTED are refused unless they ask for nothing."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None


class ChatRequest(Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Generation):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


class LoadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str = Field(min_length=1)


def text_of(message: Message) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text"} parts (any other part is refused)."""
    if isinstance(message.content, list):
        kinds = [p.get("type") for p in message.content if p.get("type") != "text"]
        if kinds:
            raise APIError(400, f"message content part of type {kinds[0]!r}: this server takes text only",
                           param="messages")
        return "".join(str(p.get("text", "")) for p in message.content)
    return message.content or ""


def chat_prompt(served: Served, body: ChatRequest) -> list[int]:
    """The messages in the model's chat template, ready for the assistant's reply, as token ids."""
    messages = [{"role": m.role, "content": text_of(m)} for m in body.messages]
    bad = [m["role"] for m in messages if m["role"] not in ("system", "user", "assistant")]
    if bad:
        raise APIError(400, f"role {bad[0]!r}: use system, user or assistant", param="messages")
    try:
        text = render(served.tokenizer, messages, served.template, add_generation_prompt=True)
    except UserError as error:
        raise APIError(400, str(error), param="messages") from None
    return served.tokenizer(text, add_special_tokens=False)["input_ids"]


def engine_request(served: Served, body: Generation, prompt_ids: list[int], param: str, emit) -> Request:
    """The engine's Request for an API request: its adapter, max_tokens capped by the context, sampling, stops."""
    if body.n != 1:
        raise APIError(400, f"n = {body.n}: this server makes one choice per request; send {body.n} requests",
                       param="n")
    for name, nothing in UNSUPPORTED.items():
        if (body.model_extra or {}).get(name) not in nothing:
            raise APIError(400, f"{name}: this server does not support it; leave it out", param=name)
    if not prompt_ids:
        raise APIError(400, f"the {param} are empty: give some text", param=param)
    adapter = served.adapter_for(body.model)
    room = served.engine.max_len - len(prompt_ids)
    if room < 1:
        raise APIError(400, f"This model's maximum context length is {served.engine.max_len} tokens; the "
                       f"{param} are {len(prompt_ids)} tokens", param=param, code="context_length_exceeded")
    wanted = getattr(body, "max_completion_tokens", None) or body.max_tokens or room
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = Sampling(max_new_tokens=min(wanted, room), temperature=body.temperature, top_p=body.top_p,
                        seed=body.seed)
    return Request(prompt_ids, adapter, sampling, emit, [s for s in stops if s])


def submit(served: Served, request: Request) -> None:
    try:
        served.engine.submit(request)
    except QueueFull as error:
        raise APIError(429, f"the server is busy ({error}); try again shortly", "RateLimitError",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except Stopped as error:
        raise APIError(503, str(error), "ServiceUnavailableError", code="shutting_down") from None


async def events_of(served: Served, body: Generation, prompt_ids: list[int], param: str, http_request):
    """(the engine Request, an async iterator of its Events); the request is cancelled when the iterator is left
    early or the client goes away."""
    loop = asyncio.get_running_loop()
    if served.handoff is None or served.handoff.loop is not loop:
        served.handoff = Handoff(loop)
    inbox: asyncio.Queue = asyncio.Queue()
    handoff = served.handoff
    request = engine_request(served, body, prompt_ids, param, lambda e: handoff.put(inbox, e))
    submit(served, request)

    async def events():
        try:
            while True:
                try:
                    event = await asyncio.wait_for(inbox.get(), POLL)
                except asyncio.TimeoutError:
                    if await http_request.is_disconnected():
                        return
                    continue
                yield event
                if event.finish_reason:
                    return
        finally:
            request.cancelled.set()  # a no-op once it finished; frees the slot if the client left

    return request, events()


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage object; `cached`: prompt tokens taken from the prefix cache (prompt_tokens_details)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def respond(served: Served, body: Generation, prompt_ids: list[int], param: str, http_request, chat: bool):
    """The whole response, or (stream) server-sent chunks ending with data: [DONE]."""
    request, events = await events_of(served, body, prompt_ids, param, http_request)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.model}
    if body.stream:
        return StreamingResponse(chunks(head, events, len(prompt_ids), chat, body), media_type="text/event-stream")
    text, last = "", Event()
    async for event in events:
        text, last = text + event.text, event
    if last.finish_reason == "error":
        raise APIError(500, last.error, "InternalServerError")
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text})
    choice |= {"finish_reason": last.finish_reason, "logprobs": None}
    used = usage(len(prompt_ids), last.completion_tokens, last.cached_tokens)
    return JSONResponse(head | {"choices": [choice], "usage": used})


async def chunks(head: dict, events, prompt_tokens: int, chat: bool, body: Generation):
    """OpenAI's stream: a role chunk first (chat), a chunk per piece of text, the last with the finish reason, then
    the usage chunk when stream_options asks for it, then [DONE]."""
    head = head | {"object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(piece: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {} if piece is None else {"content": piece})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": piece or ""}
        return "data: " + json.dumps(head | {"choices": [choice | {"finish_reason": finish, "logprobs": None}]}) + "\n\n"

    if chat:
        yield chunk(None, None, role=True)
    made = cached = 0
    async for event in events:
        if event.finish_reason == "error":
            yield "data: " + json.dumps(APIError(500, event.error, "InternalServerError").body()) + "\n\n"
            break
        if event.text:
            yield chunk(event.text, None)
        if event.finish_reason:
            made, cached = event.completion_tokens, event.cached_tokens
            yield chunk(None if chat else "", event.finish_reason)
    if (body.stream_options or {}).get("include_usage"):
        yield "data: " + json.dumps(head | {"choices": [], "usage": usage(prompt_tokens, made, cached)}) + "\n\n"
    yield "data: [DONE]\n\n"


def model_cards(served: Served) -> dict:
    base = {"id": served.base, "object": "model", "created": served.created, "owned_by": "lorakit",
            "root": served.base_root, "parent": None, "max_model_len": served.engine.max_len}
    adapters = [{"id": name, "object": "model", "created": served.created, "owned_by": "lorakit", "root": path,
                 "parent": served.base, "max_model_len": served.engine.max_len} for name, path in served.adapters.items()]
    return {"object": "list", "data": [base, *adapters]}


def load(served: Served, body: LoadAdapter) -> str:
    """Load an adapter from under --adapter-root onto the served base, named `lora_name` (one change at a time)."""
    with served.changing:
        return _load(served, body)


def _load(served: Served, body: LoadAdapter) -> str:
    if served.adapter_root is None:
        raise APIError(400, "loading adapters at run time is off: start the server with --adapter-root DIR",
                       param="lora_path")
    if body.lora_name in served.adapters or body.lora_name == served.base:
        raise APIError(400, f"the name {body.lora_name!r} is taken; unload it first or pick another",
                       param="lora_name")
    root = served.adapter_root.resolve()
    path = (root / body.lora_path).resolve()  # an absolute lora_path stays itself; symlinks are followed
    if not path.is_relative_to(root):
        raise APIError(400, f"{body.lora_path}: not under the adapter root ({root}): adapters load only from there",
                       param="lora_path", code="path_not_allowed")
    path = adapter_dir(path)
    if not (path / "adapter_config.json").is_file():
        raise APIError(404, f"{body.lora_path}: no adapter there (no adapter_config.json)", "NotFoundError",
                       "lora_path")
    try:
        meta = read_metadata(path)
        base = foreign_base(path, served.base, served.base_root)
        if base:
            raise APIError(400, f"{body.lora_path}: trained on base model {base!r}; this server serves {served.base!r}",
                           param="lora_path")
        served.engine.call(lambda: cast_for_inference(load_adapter(served.engine.model, path, body.lora_name,
                                                                   quantize=meta.get("quantize")).eval(), served.dtype))
    except UserError as error:
        raise APIError(400, f"{body.lora_path}: {error}", param="lora_path") from None
    served.adapters[body.lora_name] = str(path)
    return f"Success: LoRA adapter '{body.lora_name}' added successfully."


def unload(served: Served, body: UnloadAdapter) -> str:
    """Unload an adapter that serves no request: its name answers 404 from then on."""
    with served.changing:
        path = served.adapters.pop(body.lora_name, None)  # new requests for it now get 404
        if path is None:
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "NotFoundError", "lora_name",
                           "model_not_found")

        def delete_when_idle() -> int:
            busy = served.engine.in_use(body.lora_name)
            if not busy:
                delete_adapter(served.engine.model, body.lora_name)
            return busy

        busy = served.engine.call(delete_when_idle)
        if busy:
            served.adapters[body.lora_name] = path
            raise APIError(400, f"the adapter '{body.lora_name}' is serving {busy} request(s); unload it when they "
                           "end", param="lora_name")
    return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


def add_routes(app, served: Served) -> None:
    @app.get("/health")
    async def health():
        return served.engine.load()

    @app.get("/v1/models")
    async def models():
        return model_cards(served)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http_request: HTTPRequest):
        return await respond(served, body, chat_prompt(served, body), "messages", http_request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: HTTPRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, f"{len(prompts)} prompts: this server takes one prompt per request", param="prompt")
        ids = served.tokenizer(prompts[0])["input_ids"]
        return await respond(served, body, ids, "prompt", http_request, chat=False)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter_route(body: LoadAdapter):
        return PlainTextResponse(await asyncio.to_thread(load, served, body))

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter_route(body: UnloadAdapter):
        return PlainTextResponse(await asyncio.to_thread(unload, served, body))
