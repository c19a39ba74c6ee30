"""Commands that run a model: generate (text, or a classifier's labels) and serve (the web page)."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from ..config import TASKS, TEMPLATES
from ..errors import UserError
from .common import add_dtype_flag


def _load_for_generation(args):
    """The model (base, or base + adapter merged first with --merge) in --dtype, its tokenizer and metadata."""
    from ..engine import merge
    from ..inference.precision import cast_for_inference
    from ..models import load_adapted, load_model
    if args.adapter:
        model, tok, meta = load_adapted(args.adapter, model=args.model)
    else:
        (model, tok), meta = load_model(args.model or "smollm2", "instruct"), {}
    if args.merge and args.adapter:
        merge(model)  # in fp32, then cast: one rounding of the merged weight
    used = cast_for_inference(model, args.dtype)
    if used != "fp32":
        print(f"lorakit: generating in {used}", file=sys.stderr)
    return model, tok, meta


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from an adapted model (or the base with --base); classifiers print label probabilities."""
    import torch

    from ..data import format_prompt
    from ..engine import disable_adapters
    from ..inference import Sampling, generate, stream
    from ..models import is_seq2seq
    if args.base and args.merge:
        raise UserError("--base runs the model without its adapter and --merge folds the adapter in: give one")
    model, tok, meta = _load_for_generation(args)
    if meta.get("task") == "classify" and (args.input or args.template):
        raise UserError(f"{'--input' if args.input else '--template'}: a classifier reads the prompt alone (it has no "
                        "prompt template); leave it out")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise UserError("no prompt: pass --prompt TEXT or pipe text on standard input")
    ctx = disable_adapters(model) if args.base and args.adapter else contextlib.nullcontext(model)
    with ctx:
        if meta.get("task") == "classify":
            enc = tok([prompt], return_tensors="pt", truncation=True, max_length=meta.get("max_length", 256))
            with torch.no_grad():
                probs = model(**enc).logits.softmax(-1)[0]
            for i in probs.argsort(descending=True).tolist():
                print(f"{meta['labels'][i]:<16} {probs[i]:.4f}")
            return 0
        template = args.template or meta.get("template", "chat" if getattr(tok, "chat_template", None) else "alpaca")
        seq2seq = is_seq2seq(model)
        text = prompt if seq2seq else format_prompt(tok, prompt, args.input or "", template)
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty,
                            args.seed)
        counts, t0 = {"tokens": 0}, time.perf_counter()
        if args.no_stream or seq2seq:
            answer = generate(model, tok, [text], sampling, template)[0]
            print(answer)
            counts["tokens"] = len(tok(answer, add_special_tokens=False)["input_ids"])
        else:
            for piece in stream(model, tok, text, sampling, template, stats=counts):
                print(piece, end="", flush=True)
            print()
        seconds = time.perf_counter() - t0
        print(f"lorakit: {counts['tokens']} tokens in {seconds:.1f} s ({counts['tokens'] / seconds:.1f} tokens/s)",
              file=sys.stderr)
    return 0


def check_port_free(host: str, port: int) -> None:
    """A UserError naming the port when something already listens there (before minutes of model loading)."""
    import socket
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"port {port} on {host} is not free ({e.strerror}); is another server on it? "
                            "Pick another with --port") from None


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the base model and adapters: a local web page with their answers side by side (streaming), or with
    --api an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, ...) that batches
    requests for different adapters together."""
    import importlib.util

    from ..inference.native_memory import bound_onednn_caches
    bound_onednn_caches()  # before any bf16 product: a server's RSS stays flat (inference/native_memory.py)
    adapters = [*args.adapters, *(args.adapter or [])]
    api_key = args.api_key or os.environ.get("LORAKIT_API_KEY")
    port = args.port or (8000 if args.api else 7860)
    check_network_launch(args.host, api_key, args.insecure, "the API" if args.api else "the page")
    check_api_flags(args)
    if args.api:
        if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
            raise UserError("the API server needs FastAPI and uvicorn: pip install 'lorakit[serve]'")
        from ..serve.api import open_served, serve_api
        check_port_free(args.host, port)
        served = open_served(args.model, adapters, api_key, args.adapter_root,
                             64 if args.max_queue is None else args.max_queue, args.slots or 16, args.max_model_len,
                             args.dtype, args.prefix_cache_mb)
        print(f"lorakit: serving {served.base} with adapters: {', '.join(served.adapters) or 'none'} on "
              f"http://{args.host}:{port}/v1 (OpenAI API{', key required' if api_key else ''})", flush=True)
        serve_api(served, args.host, port)
        return 0
    if importlib.util.find_spec("gradio") is None:
        raise UserError("the web page needs Gradio: pip install 'lorakit[app]' (or pip install gradio)")
    from ..serve import Workbench
    from ..serve.page import serve
    check_port_free(args.host, port)
    wb = Workbench(args.model, adapters, task=args.task, dtype=args.dtype)
    print(f"lorakit: serving {wb.spec} ({wb.task}) with adapters: {', '.join(wb.adapters) or 'none'} "
          f"on http://{args.host}:{port}", flush=True)
    serve(wb, args.host, port, key=api_key)
    return 0


def is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_network_launch(host: str, api_key: str | None, insecure: bool, what: str) -> None:
    """Another host than this machine's own needs a key (or, knowingly, --insecure): the page and the API load
    adapters from this machine's disk and run its CPU for whoever reaches them."""
    if is_loopback(host) or api_key:
        return
    if not insecure:
        how = "clients send it as a Bearer token" if what == "the API" else "the page asks for it as the password"
        raise UserError(f"--host {host} serves {what} to the network: give --api-key KEY (or LORAKIT_API_KEY; "
                        f"{how}), or --insecure to serve it without one")
    print(f"lorakit: warning: serving on {host} without an API key: anyone who reaches this machine can use it",
          file=sys.stderr)


def check_api_flags(args: argparse.Namespace) -> None:
    """--api's own flags: never silently ignored by the page, each in its range."""
    given = [f for f, v in (("--adapter-root", args.adapter_root), ("--max-queue", args.max_queue),
                             ("--slots", args.slots), ("--max-model-len", args.max_model_len),
                             ("--prefix-cache-mb", args.prefix_cache_mb)) if v is not None]
    if given and not args.api:
        raise UserError(f"{', '.join(given)}: for the API server; add --api (the page serves one request at a time)")
    if args.api and args.task:
        raise UserError("--task chooses the page's task; the API serves each adapter in its own (leave --task out)")
    for flag, value, low in (("--max-queue", args.max_queue, 1), ("--slots", args.slots, 1),
                             ("--max-model-len", args.max_model_len, 16),
                             ("--prefix-cache-mb", args.prefix_cache_mb, 0)):
        if value is not None and not low <= value < float("inf"):  # NaN and inf too
            raise UserError(f"{flag} {value}: must be >= {low}")


def port_number(value: str) -> int:
    """--port: an integer from 1 to 65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (1 to 65535)")
    return port


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text (or classify) with an adapter", description=cmd_generate.__doc__)
    p.add_argument("--adapter", help="adapter directory (runs/NAME/adapter)")
    p.add_argument("--model", help="base model (default: the one the adapter names, else smollm2)")
    p.add_argument("--prompt", help="the instruction (default: read standard input)")
    p.add_argument("--input", help="optional input/context for the instruction")
    p.add_argument("--template", choices=TEMPLATES)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0), p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0), p.add_argument("--seed", type=int)
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights first")
    p.add_argument("--base", action="store_true", help="use the base model (adapter disabled)")
    p.add_argument("--no-stream", action="store_true")
    add_dtype_flag(p)
    p.set_defaults(func=cmd_generate)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="web page (or --api: an OpenAI-compatible API) for the base and its adapters",
                       description=cmd_serve.__doc__)
    p.add_argument("adapters", nargs="*", metavar="RUN_OR_ADAPTER_DIR", help="runs or adapter directories to serve")
    p.add_argument("--model", help="base model (default: the first adapter's, else smollm2)")
    p.add_argument("--adapter", action="append", help="adapter or run directory; repeat for several")
    p.add_argument("--task", choices=TASKS, help="the page's task (default: the first adapter's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, help="port (default 7860 for the page, 8000 for --api)")
    p.add_argument("--api-key", help="require this key (needed for a non-loopback --host; or set LORAKIT_API_KEY): "
                                     "the API's Authorization: Bearer KEY, the page's password")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a key (warns)")
    add_dtype_flag(p)
    g = p.add_argument_group("API server (--api)")
    g.add_argument("--api", action="store_true", help="serve the OpenAI-compatible API instead of the page")
    g.add_argument("--adapter-root", help="the folder adapters may be loaded from at run time (/v1/load_lora_adapter;"
                                          " off without it)")
    g.add_argument("--max-queue", type=int, help="requests waiting for a slot before 429 (default 64)")
    g.add_argument("--slots", type=int, help="requests decoded together (default 16)")
    g.add_argument("--max-model-len", type=int, help="context for prompt + reply (default: the model's, at most 1024)")
    g.add_argument("--prefix-cache-mb", type=float, help="memory for the keys and values of prompt prefixes already "
                   "computed, reused by later prompts on the same adapter (default 64; 0: off)")
    p.set_defaults(func=cmd_serve)


def add_parsers(sub) -> None:
    for add in (_generate_parser, _serve_parser):
        add(sub)
