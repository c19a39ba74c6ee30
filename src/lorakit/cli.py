"""The `lorakit` command line. User mistakes print one clear line and exit 2; they never show a traceback."""
from __future__ import annotations

import argparse
import sys

from .errors import UserError


def _targets(value: str | None):
    """--targets: 'all-linear', a comma-separated list of names, or 're:<regex>'."""
    if value is None or value == "all-linear":
        return "all-linear"
    if value.startswith("re:"):
        return value[3:]
    return [t.strip() for t in value.split(",") if t.strip()]


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (value or "").split(",") if t.strip())


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--r", type=int, default=8, help="rank of the update (default 8)")
    g.add_argument("--alpha", type=float, default=16, help="scale numerator: update = B·A·x·alpha/r (default 16)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA input (default 0)")
    g.add_argument("--targets", default="all-linear",
                   help="'all-linear' (every linear but the head), names like q_proj,v_proj, or re:<regex>")
    g.add_argument("--exclude", default="", help="comma-separated module names to leave alone")
    g.add_argument("--trainable", default="", help="comma-separated modules to train in full (e.g. a new head)")
    g.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) (rank-stabilised LoRA)")


def lora_config_from_args(args: argparse.Namespace, extra_trainable: tuple[str, ...] = ()):
    from .lora import LoRAConfig
    return LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, targets=_targets(args.targets),
                      exclude=_split(args.exclude), trainable=_split(args.trainable) + extra_trainable,
                      rslora=args.rslora)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA fine-tuning you can read.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("inspect", help="show which modules LoRA targets and the parameter report (no training)",
                       description=cmd_inspect.__doc__)
    p.add_argument("--model", default="smollm2", help="smollm2, minilm, a model directory, a .gguf file or a hub id")
    p.add_argument("--task", default="instruct", choices=("classify", "instruct", "summarize"))
    p.add_argument("--num-labels", type=int, default=2, help="classes for --task classify (default 2)")
    p.add_argument("--all", action="store_true", help="one row per module instead of one per layer pattern")
    add_lora_flags(p)
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
