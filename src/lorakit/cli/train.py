"""Commands that train or look before training: train, data, inspect."""
from __future__ import annotations

import argparse
import shlex

from ..config import (DTYPES, METHODS, OPTIMIZERS, PRECISIONS, PREFERENCE_LOSSES, QUANT_BACKENDS, QUANTIZE,
                      STRATEGIES, TASKS, load_recipe, recipe_file)
from ..errors import TrainingStopped, UserError
from .common import add_data_flags, add_lora_flags, lora_config_from_args, overrides
from .evaluate import cmd_eval


def cmd_train(args: argparse.Namespace) -> int:
    """Train a LoRA adapter from a recipe; flags override the recipe's values."""
    from ..training import train
    cfg = load_recipe(recipe_file(args.recipe), overrides(args))
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


def cmd_data(args: argparse.Namespace) -> int:
    """Show what training will see: the records read, kept and skipped (by reason), what encoding changed, tokens
    and trained tokens, and examples as the model sees them with the trained text marked."""
    from ..data.preview import show_data
    from ..models import load_tokenizer_and_config
    if args.show < 0:
        raise UserError(f"--show {args.show}: give how many examples to show (0 for the counts alone)")
    cfg = load_recipe(recipe_file(args.recipe), overrides(args))

    def tokenizer_for() -> tuple:
        tokenizer, config = load_tokenizer_and_config(cfg.model)
        return tokenizer, bool(getattr(config, "is_encoder_decoder", False))
    show_data(cfg, tokenizer_for, args.show, args.json)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Load the model, put LoRA on it (nothing is trained) and show what would be trained."""
    from ..engine import add_lora, parameter_report
    from ..models import head_name, load_model
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


def add_preference_flags(p) -> None:
    """Task preference's keys as flags (None unless given: the recipe's values stand)."""
    g = p.add_argument_group("preference (task preference)")
    g.add_argument("--loss", choices=PREFERENCE_LOSSES, help="sigmoid (DPO), ipo, hinge, robust; orpo, simpo (no reference)")
    g.add_argument("--beta", type=float, help="DPO's beta (IPO's tau), ORPO's lambda, SimPO's beta (default 0.1)")
    g.add_argument("--label-smoothing", type=float, help="sigmoid: cDPO's flip rate; robust; simpo")
    g.add_argument("--simpo-gamma", type=float, help="SimPO's target margin (default 0.5)")
    g.add_argument("--precompute-reference", action="store_true", default=None,
                   help="the reference log-probabilities once, before the first step (kept in the run)")
    g.add_argument("--init-adapter", help="start from this trained adapter (a run or adapter directory); for a "
                                          "preference run it is also the frozen reference")


def _train_parser(sub) -> None:
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
    p.add_argument("--precision", choices=DTYPES,
                   help="the frozen base in bf16 (adapters and optimizer fp32) or fp32; auto: bf16 where the hardware "
                        "computes it (AVX-512 BF16 / AMX CPUs, bf16 GPUs)")
    p.add_argument("--mixed-precision", choices=PRECISIONS,
                   help="autocast over fp32 weights; auto: bf16 on a GPU that has it unless the base is bf16")
    p.add_argument("--strategy", choices=STRATEGIES, help="on several processes: ddp (default) or fsdp")
    p.add_argument("--quantize", choices=QUANTIZE, help="QLoRA: adapted layers' base weights in 4-bit NF4")
    p.add_argument("--method", choices=METHODS,
                   help="lora (default), qlora (LoRA on an NF4 base) or full (train every parameter, save a model)")
    p.add_argument("--quant-backend", choices=QUANT_BACKENDS,
                   help="NF4 implementation: auto (bitsandbytes Linear4bit where installed, else lorakit's own)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="paged 8-bit AdamW needs CUDA")
    p.add_argument("--report-to", metavar="TRACKERS",
                   help="none (default), or tensorboard, mlflow, trackio (several: comma-separated), besides the run's "
                        "metrics.jsonl")
    add_data_flags(p)
    add_preference_flags(p)
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


def _data_parser(sub) -> None:
    p = sub.add_parser("data", help="what training sees: counts and examples with the trained text marked",
                       description=cmd_data.__doc__)
    p.add_argument("recipe", help="a recipe file or a built-in recipe name")
    p.add_argument("--show", type=int, default=3, help="examples to show (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per example (counts go to stderr)")
    p.add_argument("--model", help="base model whose tokenizer and template to use")
    add_data_flags(p)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any recipe key")
    p.set_defaults(func=cmd_data)


def _inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show which modules LoRA targets and the parameter report (no training)",
                       description=cmd_inspect.__doc__)
    p.add_argument("--model", default="smollm2", help="smollm2, minilm, a model directory, a .gguf file or a hub id")
    p.add_argument("--task", default="instruct", choices=TASKS)
    p.add_argument("--num-labels", type=int, default=2, help="classes for --task classify (default 2)")
    p.add_argument("--trainable", default="", help="comma-separated modules to train in full")
    p.add_argument("--all", action="store_true", help="one row per module instead of one per layer pattern")
    add_lora_flags(p)
    p.set_defaults(func=cmd_inspect)


def add_parsers(sub) -> None:
    _train_parser(sub)
    _data_parser(sub)


def add_inspect_parser(sub) -> None:
    _inspect_parser(sub)
