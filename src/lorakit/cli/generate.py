"""Commands that run a model: generate (text, or a classifier's labels) and serve (the web page)."""
from __future__ import annotations

import argparse
import sys
import time

from ..config import TASKS, TEMPLATES
from ..errors import UserError


def _load_for_generation(args):
    from ..models import load_adapted, load_model
    if args.adapter:
        return load_adapted(args.adapter, model=args.model)
    model, tok = load_model(args.model or "smollm2", "instruct")
    return model, tok, {}


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from an adapted model (or the base with --base); classifiers print label probabilities."""
    import torch

    from ..data import format_prompt
    from ..engine import disable_adapters
    from ..inference import Sampling, generate, merged, stream
    from ..models import is_seq2seq
    model, tok, meta = _load_for_generation(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise UserError("no prompt: pass --prompt TEXT or pipe text on standard input")
    ctx = disable_adapters(model) if args.base and args.adapter else merged(model, args.merge and bool(args.adapter))
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
    """Serve a local web page: the base model's and each adapter's answers side by side, streaming."""
    import importlib.util
    if importlib.util.find_spec("gradio") is None:
        raise UserError("the web page needs Gradio: pip install 'lorakit[app]' (or pip install gradio)")
    from ..serve import Workbench
    from ..serve.page import serve
    check_port_free(args.host, args.port)
    wb = Workbench(args.model, args.adapter or [], task=args.task)
    print(f"lorakit: serving {wb.spec} ({wb.task}) with adapters: {', '.join(wb.adapters) or 'none'} "
          f"on http://{args.host}:{args.port}", flush=True)
    serve(wb, args.host, args.port)
    return 0


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
    p.set_defaults(func=cmd_generate)


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="web page: base and adapted answers side by side", description=cmd_serve.__doc__)
    p.add_argument("--model", help="base model (default: the first adapter's, else smollm2)")
    p.add_argument("--adapter", action="append", help="adapter or run directory; repeat for several")
    p.add_argument("--task", choices=TASKS, help="default: the first adapter's")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=cmd_serve)


def add_parsers(sub) -> None:
    for add in (_generate_parser, _serve_parser):
        add(sub)
