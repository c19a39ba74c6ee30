"""What bf16 weights cost in quality against fp32, teacher-forced: the same held-out records through the model in
fp32 and cast to bf16 (`--dtype bf16`, engine/precision.py), comparing the next-token choice (top-1) at every response
position and the mean response loss. The base model, and with --run a trained adapter on it (unmerged).

    python bench/dtype_quality.py [--run runs/alpaca] [--records 120] [--out bench/results/dtype-quality.json]

Held-out records: Alpaca's last records (the recipes train on a prefix of a shuffled split; these are past every
recipe's max_records), in the Alpaca prompt. Writes the agreement, both losses and their relative difference.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lorakit.data import format_prompt  # noqa: E402
from lorakit.engine import cast_for_inference  # noqa: E402
from lorakit.evaluation.runs import machine  # noqa: E402
from lorakit.models import load_model, load_trained  # noqa: E402

ALPACA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data.json"


def held_out(tok, records: int) -> list[tuple[torch.Tensor, int]]:
    """(token ids of prompt + response, where the response starts) for the last `records` Alpaca records."""
    rows = [r for r in json.loads(ALPACA.read_text()) if r["output"].strip()][-records:]
    out = []
    for r in rows:
        prompt = tok(format_prompt(tok, r["instruction"], r["input"], "alpaca"))["input_ids"]
        reply = tok(r["output"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        out.append((torch.tensor((prompt + reply)[:512]), len(prompt)))
    return out


@torch.no_grad()
def predictions(model, data) -> tuple[list[torch.Tensor], float, int]:
    """Each record's top-1 next token at its response positions, and the summed response loss and its count."""
    tops, loss, n = [], 0.0, 0
    for ids, start in data:
        logits = model(input_ids=ids[None]).logits[0, start - 1:-1].float()
        target = ids[start:]
        tops.append(logits.argmax(-1))
        loss += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
        n += len(target)
    return tops, loss, n


def compare(model, data) -> dict:
    """Top-1 agreement and response losses of `model` in fp32 and then cast to bf16."""
    fp32, loss32, n = predictions(model, data)
    cast_for_inference(model, "bf16")
    bf16, loss16, _ = predictions(model, data)
    agree = sum(int((a == b).sum()) for a, b in zip(fp32, bf16))
    return {"positions": n, "top1_agreement": agree / n, "loss_fp32": loss32 / n, "loss_bf16": loss16 / n,
            "loss_relative_difference": (loss16 - loss32) / loss32}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a trained run: its adapter (unmerged) on the base, besides the base")
    ap.add_argument("--records", type=int, default=120)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dtype-quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = {}
    base, tok = load_model("smollm2", "instruct")
    data = held_out(tok, args.records)
    results["base"] = compare(base.eval(), data)
    if args.run:
        adapted, tok, _ = load_trained(Path(args.run) / "adapter")
        results[f"adapted ({Path(args.run).name})"] = compare(adapted.eval(), data)
    for name, r in results.items():
        print(f"{name}: top-1 agreement {r['top1_agreement']:.4f} over {r['positions']} positions; response loss "
              f"fp32 {r['loss_fp32']:.4f}, bf16 {r['loss_bf16']:.4f} ({r['loss_relative_difference']:+.2%})")
    Path(args.out).write_text(json.dumps({"what": __doc__.split("\n\n")[0], "records": args.records,
                                          "machine": machine(), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
