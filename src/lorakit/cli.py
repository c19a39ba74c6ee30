"""The `lorakit` command line. User mistakes print one clear line and exit 2; they never show a traceback."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

from .config import (COMBINE_METHODS, EXPORT_FORMATS, EXPORT_QUANTS, FIELDS, INITS, METHODS, OPTIMIZERS, PRECISIONS,
                     QUANT_BACKENDS, QUANTIZE, STRATEGIES, TARGET_PRESETS, TASKS, TEMPLATES, TRAIN_ON, load_recipe)
from .errors import LorakitWarning, TrainingStopped, UserError

RECIPES = Path(os.environ.get("LORAKIT_RECIPES") or Path(__file__).resolve().parents[2] / "recipes")


def _targets(value: str | None):
    """--targets: a preset (all-linear, attention, mlp), a comma-separated list of names, or 're:<regex>'."""
    if value is None:
        return "all-linear"
    if value in TARGET_PRESETS:
        return value
    if value.startswith("re:"):
        return value[3:]
    return [t.strip() for t in value.split(",") if t.strip()]


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (value or "").split(",") if t.strip())


def add_lora_flags(p: argparse.ArgumentParser, defaults: bool = True) -> None:
    """LoRA flags; with defaults=False they are None unless given, so a recipe's values stand."""
    d = (lambda v: v) if defaults else (lambda v: None)
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=int, default=d(8), help="rank of the update (default 8)")
    g.add_argument("--alpha", type=float, default=d(16), help="scale numerator: update = B·A·x·alpha/r (default 16)")
    g.add_argument("--dropout", type=float, default=d(0.0), help="dropout on the LoRA input")
    g.add_argument("--targets", default=d("all-linear"),
                   help="all-linear (every linear but the head), attention or mlp (the block's attention or MLP "
                        "linears, per architecture), names like q_proj,v_proj, or re:<regex>")
    g.add_argument("--exclude", default=d(""), help="comma-separated module names to leave alone")
    g.add_argument("--rslora", action="store_true", default=d(False), help="scale by alpha/sqrt(r) (rank-stabilised)")
    g.add_argument("--init", choices=INITS, default=d("kaiming"),
                   help="A and B at the start: kaiming (default), gaussian, pissa or olora (from the base's SVD/QR)")
    g.add_argument("--dora", action="store_true", default=d(False),
                   help="DoRA: a trained magnitude per output feature times the direction of W + B·A")


def lora_config_from_args(args: argparse.Namespace, trainable: tuple[str, ...] = ()):
    from .lora import LoRAConfig
    return LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, targets=_targets(args.targets),
                      exclude=_split(args.exclude), trainable=_split(getattr(args, "trainable", "")) + trainable,
                      rslora=args.rslora, dora=args.dora, init=args.init)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Load the model, put LoRA on it (nothing is trained) and show what would be trained."""
    from .inject import add_lora, parameter_report
    from .models import head_name, load_model
    model, _ = load_model(args.model, args.task, num_labels=args.num_labels)
    head = head_name(model) if args.task == "classify" else None
    config = lora_config_from_args(args, (head,) if head else ())
    add_lora(model, config)
    report = parameter_report(model)
    print(f"model {args.model} ({type(model).__name__}), task {args.task}")
    print(f"LoRA r={config.r} alpha={config.alpha:g} dropout={config.dropout:g} targets={config.targets!r}"
          f"{' rslora' if config.rslora else ''}; {sum(1 for r in report.rows if r['r'])} modules adapted\n")
    print(report.table(group=not args.all))
    return 0


def recipe_path(name: str) -> Path:
    """A recipe file, or the name of one in recipes/ (spam -> recipes/spam.yaml)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (RECIPES / name, RECIPES / f"{name}.yaml"):
        if cand.is_file():
            return cand
    raise UserError(f"recipe {name!r} not found; `lorakit recipes` lists the built-in ones")


def _overrides(args: argparse.Namespace) -> dict:
    """The recipe keys the command line sets: every RunConfig field whose flag was given (flags are None unless
    given), plus --set pairs."""
    out = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    if out.get("method") in ("full", "lora") and "quantize" not in out:
        out["quantize"] = ""  # --method lora on a QLoRA recipe: plain LoRA
    if "targets" in out:
        out["targets"] = _targets(out["targets"])
    return out | _set_pairs(args.set)


def _set_pairs(items: list[str] | None) -> dict:
    """--set KEY=VALUE flags as a dict."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: use KEY=VALUE, e.g. --set warmup=0.1")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_train(args: argparse.Namespace) -> int:
    """Train a LoRA adapter from a recipe; flags override the recipe's values."""
    from .train import train
    cfg = load_recipe(recipe_path(args.recipe), _overrides(args))
    try:
        out = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingStopped as e:
        if e.exit_code != 1:  # interrupted: the exact command to continue
            command = ["lorakit", *args.argv] + ([] if "--resume" in args.argv else ["--resume"])
            e.args = (f"{e}: {shlex.join(command)}",)
        raise
    if args.eval:
        return cmd_eval(argparse.Namespace(run=str(out), max_records=0))
    return 0


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The flags that decide what the data becomes: shared by train and data, so `lorakit data` shows what a
    `lorakit train` with the same flags trains on."""
    p.add_argument("--data", type=str, help="training data file (or an embedded data set: sharegpt)")
    p.add_argument("--max-length", type=int, help="tokens per example (or per packed row)")
    p.add_argument("--max-records", type=int, help="train on the first N records of the split (quick runs)")
    p.add_argument("--template", choices=TEMPLATES, help="alpaca, chat (the model's own chat template) or chatml")
    p.add_argument("--train-on", choices=TRAIN_ON, help="chat: the loss on all assistant turns or on the last one")
    p.add_argument("--skip-invalid", action="store_true", default=None,
                   help="skip (and count) invalid records instead of failing")


def cmd_data(args: argparse.Namespace) -> int:
    """Show what training will see: the records read, kept and skipped (by reason), what encoding changed, tokens
    and trained tokens, and examples as the model sees them with the trained text marked."""
    from .preview import show_data
    show_data(load_recipe(recipe_path(args.recipe), _overrides(args)), args.show, args.json)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a trained run against its base model on the run's test split, or on another file (--data)."""
    from .evaluate import evaluate_run
    _, written = evaluate_run(args.run, max_records=args.max_records, with_base=not getattr(args, "no_base", False),
                              data=getattr(args, "data", None), out=getattr(args, "out", None))
    run = Path(args.run)
    saved = "model    " + str(run / "model") if (run / "model").is_dir() else "adapter  " + str(run / "adapter")
    print(f"\nlorakit: {saved}\nlorakit: report   {written / 'report.html'} (eval.json, "
          f"eval_samples.jsonl)\nlorakit: plots    {run / 'loss.png'}, {written / 'eval.png'}")
    return 0


def _recipe_overrides_out(args: argparse.Namespace, command: str) -> tuple[str, dict, str]:
    """compare's and sweep's recipe path, --set overrides, and --out (default runs/NAME-<command>)."""
    path = str(recipe_path(args.recipe))
    overrides = _set_pairs(args.set)
    return path, overrides, args.out or str(Path("runs") / f"{load_recipe(path, overrides).name}-{command}")


def _check_out_free(out: Path, force: bool) -> None:
    """merge and combine write a directory: refuse one that holds something unless --force."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(f"{out} exists and is not empty; pass an empty or new directory, or --force to replace it")


def cmd_compare(args: argparse.Namespace) -> int:
    """Train and evaluate full fine-tuning, LoRA and QLoRA on the same recipe, data and seed; write compare.md,
    compare.json and compare.png (a method that cannot run here is listed with the reason)."""
    from .compare import compare
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UserError(f"--methods: {', '.join(bad) or 'nothing given'}: choose from {', '.join(METHODS)}")
    path, overrides, out = _recipe_overrides_out(args, "compare")
    compare(path, out, quick=args.quick, methods=methods, overrides=overrides)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Train and evaluate every combination of the --grid values on one recipe (same data, seed and test split),
    each cell in its own process; a finished cell is kept when the sweep runs again. Writes sweep.md, sweep.json
    and sweep.png (the metric against trainable parameters) and names the best cell."""
    from .sweep import parse_grid, sweep
    grid = parse_grid(args.grid or [])
    path, overrides, out = _recipe_overrides_out(args, "sweep")
    sweep(path, grid, out, quick=args.quick, overrides=overrides, yes=args.yes, overwrite=args.overwrite)
    return 0


def _load_for_generation(args):
    from .models import load_model
    from .trained import load_adapted
    if args.adapter:
        return load_adapted(args.adapter, model=args.model)
    model, tok = load_model(args.model or "smollm2", "instruct")
    return model, tok, {}


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from an adapted model (or the base with --base); classifiers print label probabilities."""
    import torch

    from .data import format_prompt
    from .generate import Sampling, generate, merged, stream
    from .inject import disable_adapters
    from .models import is_seq2seq
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
    from .app import Workbench
    from .app.page import serve
    check_port_free(args.host, args.port)
    wb = Workbench(args.model, args.adapter or [], task=args.task)
    print(f"lorakit: serving {wb.spec} ({wb.task}) with adapters: {', '.join(wb.adapters) or 'none'} "
          f"on http://{args.host}:{args.port}", flush=True)
    serve(wb, args.host, args.port)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base and write a plain Hugging Face model directory."""
    from .files import atomic_dir
    from .inject import merge_and_unload
    from .trained import load_adapted
    out = Path(args.out)
    _check_out_free(out, args.force)
    model, tok, meta = load_adapted(args.adapter, model=args.model)
    model = merge_and_unload(model)
    with atomic_dir(out) as tmp:  # a failure midway leaves whatever was at OUT as it was
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    print(f"lorakit: merged model -> {args.out} (loads with transformers' from_pretrained, no lorakit needed)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run for llama.cpp / Ollama / LM Studio: the merged model as GGUF, the adapter as llama.cpp's LoRA
    GGUF, or an Ollama directory (GGUF + Modelfile)."""
    from .export import export_run
    out = Path(args.out)
    if args.format == "ollama":
        _check_out_free(out, args.force)
    elif out.is_dir():
        raise UserError(f"--out {out} is a directory; --format {args.format} writes one file (e.g. {out / 'model.gguf'})")
    elif out.exists() and not args.force:
        raise UserError(f"--out {out} exists; choose another path or pass --force to replace it")
    if args.base and args.format == "gguf-lora":
        raise UserError("--base exports the base model without the adapter; use it with --format gguf or ollama")
    written = export_run(args.run, args.format, out, args.quant, base_only=args.base)
    what = {"gguf": "model", "gguf-lora": "LoRA adapter", "ollama": "Ollama model"}[args.format]
    print(f"lorakit: {what} -> {written}")
    if args.format == "gguf":
        print(f"lorakit: run it: llama-cli -m {written} -cnv")
    elif args.format == "gguf-lora":
        print(f"lorakit: run it on the base's GGUF (lorakit export RUN --base --format gguf --out base.gguf): "
              f"llama-cli -m base.gguf --lora {written} -cnv")
    else:
        print(f"lorakit: load it: cd {written} && ollama create NAME -f Modelfile && ollama run NAME")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    """Combine trained adapters of one base and task into one (PEFT's add_weighted_adapter methods) and write it as
    an ordinary adapter directory."""
    from .adapters import load_adapter, read_adapter_config, read_metadata, save_adapter
    from .combine import combine_adapters
    from .files import atomic_dir
    from .models import same_model
    from .trained import adapter_dir, load_adapted
    dirs = [adapter_dir(p) for p in args.runs]
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0 / len(dirs)] * len(dirs)
    except ValueError:
        raise UserError(f"--weights {args.weights!r}: give numbers separated by commas, e.g. 0.5,0.5") from None
    out = Path(args.out)
    _check_out_free(out, args.force)
    peft_configs = [read_adapter_config(d) for d in dirs]
    metas = [(meta := read_metadata(d)) | {"base": meta.get("model") or cfg.get("base_model_name_or_path")}
             for d, cfg in zip(dirs, peft_configs)]
    for d, meta in zip(dirs[1:], metas[1:]):
        for key, same in (("base", same_model), ("task", str.__eq__)):
            if meta.get(key) and metas[0].get(key) and not same(meta[key], metas[0][key]):
                raise UserError(f"{d} is for {key} {meta[key]!r} but {dirs[0]} for {metas[0][key]!r}: only adapters "
                                f"of one {key} can be combined")
    model, _, meta = load_adapted(dirs[0], adapter="a0")
    names = ["a0"] + [f"a{i}" for i in range(1, len(dirs))]
    for name, d in zip(names[1:], dirs[1:]):
        load_adapter(model, d, name, quantize=meta.get("quantize"))
    combine_adapters(model, names, weights, "combined", method=args.method, density=args.density,
                     svd_rank=args.svd_rank, seed=args.seed)
    meta = meta | {"combined": {"from": [str(d) for d in dirs], "weights": weights, "method": args.method,
                                "density": args.density, "seed": args.seed}}
    with atomic_dir(out) as tmp:
        save_adapter(model, tmp, base_model_name_or_path=peft_configs[0].get("base_model_name_or_path"),
                     adapter="combined", metadata=meta)
    print(f"lorakit: {args.method} of {len(dirs)} adapters (weights {', '.join(f'{w:g}' for w in weights)}) -> {out}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the built-in recipes."""
    import yaml
    files = sorted(RECIPES.glob("*.yaml"))
    if not files:
        raise UserError(f"no recipes found in {RECIPES}")
    for f in files:
        raw = yaml.safe_load(f.read_text()) or {}
        first = next((ln.lstrip("# ").strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
        model = raw.get("model", {}).get("model") if isinstance(raw.get("model"), dict) else raw.get("model")
        task = raw.get("model", {}).get("task") if isinstance(raw.get("model"), dict) else raw.get("task")
        print(f"{f.stem:<32} {str(model):<40} {str(task):<10} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA fine-tuning you can read.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train an adapter from a recipe", description=cmd_train.__doc__)
    p.add_argument("recipe", help="a recipe file or a built-in recipe name (see `lorakit recipes`)")
    for flag, kind, text in (
            ("--model", str, "base model: smollm2, minilm, a directory, a .gguf file or a hub id"),
            ("--out", str, "run directory (default runs/NAME)"),
            ("--epochs", float, "passes over the training split (fractions allowed)"),
            ("--max-steps", int, "stop after this many optimizer steps (overrides epochs)"),
            ("--batch-size", int, "examples per device per micro-batch"),
            ("--grad-accum", int, "micro-batches per optimizer step"),
            ("--lr", float, "peak learning rate"),
            ("--loraplus-lr-ratio", float, "LoRA+: the B matrices train at lr x this ratio (e.g. 16)"),
            ("--seed", int, "seed for splits, initialisation, data order and dropout (default 42)"),
            ("--max-eval-records", int, "cap the test (and validation) examples"),
            ("--eval-every", int, "validate every N optimizer steps (default: once per epoch)"),
            ("--checkpoint-every", int, "write a resumable checkpoint every N optimizer steps")):
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--mixed-precision", choices=PRECISIONS,
                   help="auto: bf16 on a GPU that has it, fp32 on CPU")
    p.add_argument("--strategy", choices=STRATEGIES, help="on several processes: ddp (default) or fsdp")
    p.add_argument("--quantize", choices=QUANTIZE, help="QLoRA: adapted layers' base weights in 4-bit NF4")
    p.add_argument("--method", choices=METHODS,
                   help="lora (default), qlora (LoRA on an NF4 base) or full (train every parameter, save a model)")
    p.add_argument("--quant-backend", choices=QUANT_BACKENDS,
                   help="NF4 implementation: auto (bitsandbytes Linear4bit where installed, else lorakit's own)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="paged 8-bit AdamW needs CUDA")
    add_data_flags(p)
    p.add_argument("--pack", action="store_true", default=None, help="pack short examples into full rows")
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false", default=None,
                   help="packed rows: repeat a prompt preamble the examples share instead of keeping it once")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute activations in backward: less memory")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile each decoder block: faster steps after a one-time compile (CPU: needs g++)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="train into --out even if it holds a run already")
    p.add_argument("--eval", action="store_true", help="evaluate on the test split after training")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key")
    add_lora_flags(p, defaults=False)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="what training sees: counts and examples with the trained text marked",
                       description=cmd_data.__doc__)
    p.add_argument("recipe", help="a recipe file or a built-in recipe name")
    p.add_argument("--show", type=int, default=3, help="examples to show (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per example (counts go to stderr)")
    p.add_argument("--model", help="base model whose tokenizer and template to use")
    add_data_flags(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("eval", help="evaluate a run: base vs adapted", description=cmd_eval.__doc__)
    p.add_argument("run", help="run directory written by `lorakit train`")
    p.add_argument("--max-records", type=int, default=0, help="evaluate on the first N test examples")
    p.add_argument("--no-base", action="store_true", help="score only the trained model, not the base")
    p.add_argument("--data", help="evaluate on this file (the run's task format) instead of the run's test split")
    p.add_argument("--out", help="with --data: where eval.json and the report go (default RUN_DIR/eval-<file name>)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="full fine-tuning vs LoRA vs QLoRA on one recipe: one table",
                       description=cmd_compare.__doc__)
    p.add_argument("recipe", help="a recipe file or a built-in recipe name")
    p.add_argument("--out", help="output directory (default runs/NAME-compare)")
    p.add_argument("--quick", action="store_true", help="a few hundred records: minutes on a CPU")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="every combination of rank, targets, ... on one recipe: one table and a plot",
                       description=cmd_sweep.__doc__)
    p.add_argument("recipe", help="a recipe file or a built-in recipe name")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                   help="a recipe key and its values, e.g. r=4,8,16 or targets=attention,all-linear (a list of "
                        "module names joins them with +: q_proj+v_proj); repeat for more keys")
    p.add_argument("--out", help="output directory (default runs/NAME-sweep)")
    p.add_argument("--quick", action="store_true", help="a few hundred records per cell: minutes each on a CPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key in every cell")
    p.add_argument("--yes", action="store_true", help="run a grid of more than 32 cells")
    p.add_argument("--overwrite", action="store_true", help="train cells again whose settings changed")
    p.set_defaults(func=cmd_sweep)

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

    p = sub.add_parser("serve", help="web page: base and adapted answers side by side", description=cmd_serve.__doc__)
    p.add_argument("--model", help="base model (default: the first adapter's, else smollm2)")
    p.add_argument("--adapter", action="append", help="adapter or run directory; repeat for several")
    p.add_argument("--task", choices=TASKS, help="default: the first adapter's")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("merge", help="write a merged Hugging Face model directory", description=cmd_merge.__doc__)
    p.add_argument("adapter"), p.add_argument("out"), p.add_argument("--model")
    p.add_argument("--force", action="store_true", help="replace OUT even if it is not empty")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="GGUF for llama.cpp / Ollama: the merged model, the LoRA alone, or a Modelfile",
                       description=cmd_export.__doc__)
    p.add_argument("run", help="run directory written by `lorakit train` (or its adapter/ or model/ directory)")
    p.add_argument("--format", default="gguf", choices=EXPORT_FORMATS,
                   help="gguf: merged model; gguf-lora: the adapter for llama.cpp's --lora; ollama: a directory")
    p.add_argument("--quant", default="f32", choices=EXPORT_QUANTS, help="gguf/ollama weights (default f32)")
    p.add_argument("--out", required=True, help="the .gguf file (a directory for --format ollama)")
    p.add_argument("--base", action="store_true", help="the run's base model without its adapter")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("combine", help="one adapter from several: linear, cat, svd, ties, dare, magnitude_prune",
                       description=cmd_combine.__doc__)
    p.add_argument("runs", nargs="+", help="run or adapter directories (the same base model and task)")
    p.add_argument("--weights", help="one weight per adapter, comma-separated (default: equal, summing to 1)")
    p.add_argument("--method", default="svd", choices=COMBINE_METHODS, help="how to combine (default svd)")
    p.add_argument("--density", type=float, default=1.0,
                   help="ties, dare_*, magnitude_prune: the fraction of entries kept (e.g. 0.5)")
    p.add_argument("--svd-rank", type=int, help="svd: the new adapter's rank (default: the largest)")
    p.add_argument("--seed", type=int, default=0, help="dare_*: the seed of the random drops")
    p.add_argument("--out", required=True, help="the new adapter directory")
    p.add_argument("--force", action="store_true", help="replace OUT even if it is not empty")
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("inspect", help="show which modules LoRA targets and the parameter report (no training)",
                       description=cmd_inspect.__doc__)
    p.add_argument("--model", default="smollm2", help="smollm2, minilm, a model directory, a .gguf file or a hub id")
    p.add_argument("--task", default="instruct", choices=TASKS)
    p.add_argument("--num-labels", type=int, default=2, help="classes for --task classify (default 2)")
    p.add_argument("--trainable", default="", help="comma-separated modules to train in full")
    p.add_argument("--all", action="store_true", help="one row per module instead of one per layer pattern")
    add_lora_flags(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("recipes", help="list the built-in recipes", description=cmd_recipes.__doc__)
    p.set_defaults(func=cmd_recipes)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """lorakit's own warnings as one line; everything else as Python shows it."""
    if issubclass(category, LorakitWarning):
        print(f"lorakit: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except TrainingStopped as e:
        print(f"lorakit: {e}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
