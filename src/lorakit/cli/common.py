"""What the commands share: LoRA and data flags, recipe overrides from flags, and checks on output paths."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import FIELDS, INFER_DTYPES, INITS, TARGET_PRESETS, TEMPLATES, TRAIN_ON, load_recipe, recipe_file
from ..config.paths import check_writable
from ..engine import LoRAConfig
from ..errors import UserError


def targets_value(value: str | None):
    """--targets: a preset (all-linear, attention, mlp), a comma-separated list of names, or 're:<regex>'."""
    if value is None:
        return "all-linear"
    if value in TARGET_PRESETS:
        return value
    if value.startswith("re:"):
        return value[3:]
    return [t.strip() for t in value.split(",") if t.strip()]


def split_names(value: str | None) -> tuple[str, ...]:
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
    return LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, targets=targets_value(args.targets),
                      exclude=split_names(args.exclude), trainable=split_names(getattr(args, "trainable", "")) + trainable,
                      rslora=args.rslora, dora=args.dora, init=args.init)


def overrides(args: argparse.Namespace) -> dict:
    """The recipe keys the command line sets: every RunConfig field whose flag was given (flags are None unless
    given), plus --set pairs."""
    out = {k: getattr(args, k) for k in FIELDS if getattr(args, k, None) is not None}
    if out.get("method") in ("full", "lora") and "quantize" not in out:
        out["quantize"] = ""  # --method lora on a QLoRA recipe: plain LoRA
    if "targets" in out:
        out["targets"] = targets_value(out["targets"])
    return out | set_pairs(args.set)


def set_pairs(items: list[str] | None) -> dict:
    """--set KEY=VALUE flags as a dict."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--set {item!r}: use KEY=VALUE, e.g. --set warmup=0.1")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


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


def add_dtype_flag(p: argparse.ArgumentParser, default: str | None = "auto") -> None:
    """--dtype: what the weights are in for generation and evaluation (inference/precision.py)."""
    p.add_argument("--dtype", choices=INFER_DTYPES, default=default,
                   help="weights for generating and scoring: fp32 (exact), bf16, int8 (int8 weights computing in "
                        "bf16: half bf16's bytes), or auto: bf16 where the hardware "
                        f"computes it (AVX-512 BF16 / AMX CPUs, bf16 GPUs){' (default: the recipe infer_dtype)' if default is None else ''}")


def recipe_overrides_out(args: argparse.Namespace, command: str) -> tuple[str, dict, str]:
    """compare's and sweep's recipe path, --set overrides (--dtype as infer_dtype), and --out (default
    runs/NAME-<command>)."""
    path = str(recipe_file(args.recipe))
    overrides = set_pairs(args.set)
    if getattr(args, "dtype", None):
        overrides["infer_dtype"] = args.dtype
    out = args.out or str(Path("runs") / f"{load_recipe(path, overrides).name}-{command}")
    check_writable(out, "--out", directory=True)
    return path, overrides, out


def check_out_free(out: Path, force: bool, flag: str) -> None:
    """merge, combine and the Ollama export write a directory: refuse one that holds something unless --force, and
    one that cannot be written, before any work."""
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        what = "is a file (this output is a folder)" if not out.is_dir() else "exists and is not empty"
        raise UserError(f"{flag} {out} {what}; name a new or empty folder, or pass --force to replace it")
    check_writable(out if out.is_dir() or not out.exists() else out.parent, flag, directory=True)
