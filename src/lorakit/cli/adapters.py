"""Commands on adapters: merge (a plain transformers model), export (GGUF, Ollama), combine (adapter arithmetic)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..config import COMBINE_METHODS, EXPORT_FORMATS, EXPORT_QUANTS
from ..errors import UserError
from ..config.paths import check_writable
from .common import check_out_free


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold an adapter into its base and write a plain Hugging Face model directory."""
    from ..engine import merge_and_unload
    from ..files import atomic_dir
    from ..models import load_adapted
    out = Path(args.out)
    check_out_free(out, args.force, "OUT")
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
    from ..export import export_run
    out = Path(args.out)
    if args.format == "ollama":
        check_out_free(out, args.force, "--out")
    elif out.is_dir():
        raise UserError(f"--out {out} is a directory; --format {args.format} writes one file (e.g. {out / 'model.gguf'})")
    elif out.exists() and not args.force:
        raise UserError(f"--out {out} exists; choose another path or pass --force to replace it")
    check_writable(out, "--out", directory=args.format == "ollama")
    if args.base and args.format == "gguf-lora":
        raise UserError("--base exports the base model without the adapter; use it with --format gguf or ollama")
    if args.quant and args.format == "gguf-lora":
        raise UserError(f"--quant {args.quant}: a LoRA GGUF keeps the adapter's own f32 weights; --quant applies to "
                        "--format gguf and ollama")
    written = export_run(args.run, args.format, out, args.quant or "f32", base_only=args.base)
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
    from ..engine import combine_adapters, load_adapter, read_adapter_config, read_metadata, save_adapter
    from ..files import atomic_dir
    from ..models import adapter_dir, load_adapted, same_model
    weights = combine_weights(args)
    dirs = [adapter_dir(p) for p in args.runs]
    out = Path(args.out)
    check_out_free(out, args.force, "--out")
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
    density, seed = 1.0 if args.density is None else args.density, args.seed or 0
    combine_adapters(model, names, weights, "combined", method=args.method, density=density,
                     svd_rank=args.svd_rank, seed=seed)
    meta = meta | {"combined": {"from": [str(d) for d in dirs], "weights": weights, "method": args.method,
                                "density": density, "seed": seed}}
    with atomic_dir(out) as tmp:
        save_adapter(model, tmp, base_model_name_or_path=peft_configs[0].get("base_model_name_or_path"),
                     adapter="combined", metadata=meta)
    print(f"lorakit: {args.method} of {len(dirs)} adapters (weights {', '.join(f'{w:g}' for w in weights)}) -> {out}")
    return 0


def combine_weights(args: argparse.Namespace) -> list[float]:
    """combine's flags checked before any adapter is loaded; the weights, one per adapter."""
    count = len(args.runs)
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0 / count] * count
    except ValueError:
        raise UserError(f"--weights {args.weights!r}: give numbers separated by commas, e.g. 0.5,0.5") from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise UserError(f"--weights {args.weights}: give {count} finite numbers, one per adapter, in the order given")
    if not any(weights):
        raise UserError(f"--weights {args.weights}: every weight is 0, so the combined adapter would change nothing; "
                        "give at least one non-zero weight")
    if args.svd_rank is not None and (args.method != "svd" or args.svd_rank < 1):
        raise UserError(f"--svd-rank {args.svd_rank}: " + ("the rank of --method svd's result, a whole number >= 1"
                        if args.method == "svd" else f"applies to --method svd only, not {args.method}"))
    pruning = args.method in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
    if args.density is not None and not (pruning and 0 < args.density <= 1):
        raise UserError(f"--density {args.density:g}: " + ("the fraction of entries kept, in (0, 1]" if pruning else
                        f"applies to --method ties, dare_linear, dare_ties or magnitude_prune, not {args.method}"))
    if args.seed is not None and not args.method.startswith("dare"):
        raise UserError(f"--seed applies to --method dare_linear or dare_ties (their random drops), not {args.method}")
    return weights


def _merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="write a merged Hugging Face model directory", description=cmd_merge.__doc__)
    p.add_argument("adapter"), p.add_argument("out"), p.add_argument("--model")
    p.add_argument("--force", action="store_true", help="replace OUT even if it is not empty")
    p.set_defaults(func=cmd_merge)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="GGUF for llama.cpp / Ollama: the merged model, the LoRA alone, or a Modelfile",
                       description=cmd_export.__doc__)
    p.add_argument("run", help="run directory written by `lorakit train` (or its adapter/ or model/ directory)")
    p.add_argument("--format", default="gguf", choices=EXPORT_FORMATS,
                   help="gguf: merged model; gguf-lora: the adapter for llama.cpp's --lora; ollama: a directory")
    p.add_argument("--quant", choices=EXPORT_QUANTS, help="gguf/ollama weights (default f32)")
    p.add_argument("--out", required=True, help="the .gguf file (a directory for --format ollama)")
    p.add_argument("--base", action="store_true", help="the run's base model without its adapter")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)


def _combine_parser(sub) -> None:
    p = sub.add_parser("combine", help="one adapter from several: linear, cat, svd, ties, dare, magnitude_prune",
                       description=cmd_combine.__doc__)
    p.add_argument("runs", nargs="+", help="run or adapter directories (the same base model and task)")
    p.add_argument("--weights", help="one weight per adapter, comma-separated (default: equal, summing to 1)")
    p.add_argument("--method", default="svd", choices=COMBINE_METHODS, help="how to combine (default svd)")
    p.add_argument("--density", type=float,
                   help="ties, dare_*, magnitude_prune: the fraction of entries kept (e.g. 0.5)")
    p.add_argument("--svd-rank", type=int, help="svd: the new adapter's rank (default: the largest)")
    p.add_argument("--seed", type=int, help="dare_*: the seed of the random drops (default 0)")
    p.add_argument("--out", required=True, help="the new adapter directory")
    p.add_argument("--force", action="store_true", help="replace OUT even if it is not empty")
    p.set_defaults(func=cmd_combine)


def add_parsers(sub) -> None:
    for add in (_merge_parser, _export_parser, _combine_parser):
        add(sub)
