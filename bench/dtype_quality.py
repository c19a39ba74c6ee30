"""What bf16 and int8 weights cost in quality against fp32, teacher-forced: the same held-out records through the
model in fp32 and cast to bf16 and to int8 (`--dtype`, inference/precision.py), comparing the next-token choice (top-1)
at every response position and the mean response loss. The base model, and with --run a trained adapter on it
(unmerged). As the independent anchor for what a format can keep, llama.cpp on the base's f16 and q8_0 exports
(where llama-cpp-python is built), on the same positions. Where top-1 differs, the fp32 model's own margin there (its
top logit minus its logit for the other choice) says whether the choice was a near tie. With --where, which rounding
costs the agreement: the fp32 model with its weights rounded to bf16 and every matrix product's input rounded to
bf16, all else fp32 (norms, residual stream, attention, logits), with and without each product's output rounded to
bf16 as a bf16 GEMM returns it; and `--dtype bf16` with its residual stream and norms in bf16 as well (as it ran
before inference/residual_stream.py), and with its attention in fp32.

    python bench/dtype_quality.py [--run runs/alpaca] [--records 120] [--out bench/results/dtype-quality.json]

Held-out records: Alpaca's last records (the recipes train on a prefix of a shuffled split; these are past every
recipe's max_records), in the Alpaca prompt. Writes the agreement, both losses and their relative difference.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from lorakit.data import format_prompt  # noqa: E402
from lorakit.inference.precision import cast_for_inference  # noqa: E402
from lorakit.inference.residual_stream import rounded_norm, rounded_tables, widened_rows  # noqa: E402
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
    """Each record's response-position logits (fp32), and the summed response loss and its count."""
    logits, loss, n = [], 0.0, 0
    for ids, start in data:
        out = model(input_ids=ids[None]).logits[0, start - 1:-1].float()
        logits.append(out)
        loss += torch.nn.functional.cross_entropy(out, ids[start:], reduction="sum").item()
        n += len(out)
    return logits, loss, n


def llama_cpp_predictions(path: Path, data) -> tuple[list[torch.Tensor], float, int]:
    """The same from llama.cpp on a GGUF file (all positions' logits kept)."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=torch.get_num_threads(), n_batch=512,
                          logits_all=True, verbose=False)
    logits, loss, n = [], 0.0, 0
    for ids, start in data:
        llm.reset()
        llm.eval(ids.tolist())
        out = torch.from_numpy(llm.scores[start - 1:len(ids) - 1].copy()).float()
        logits.append(out)
        loss += torch.nn.functional.cross_entropy(out, ids[start:], reduction="sum").item()
        n += len(out)
    return logits, loss, n


def against(reference: tuple, other: tuple) -> dict:
    """Top-1 agreement of `other` with the fp32 `reference`, their losses, and the fp32 margins where they differ."""
    (ref, loss_ref, n), (got, loss, _) = reference, other
    margins = []
    for r, g in zip(ref, got):
        a, b = r.argmax(-1), g.argmax(-1)
        differ = (a != b).nonzero().flatten()
        margins += (r[differ, a[differ]] - r[differ, b[differ]]).tolist()
    margins.sort()
    return {"top1_agreement": 1 - len(margins) / n, "loss": loss / n,
            "loss_relative_difference": (loss - loss_ref) / loss_ref,
            "differing": len(margins), "fp32_margin_where_differing": {
                "median": margins[len(margins) // 2] if margins else None,
                "under_0.1": sum(m < 0.1 for m in margins), "under_0.5": sum(m < 0.5 for m in margins)}}


def compare(model, data, dtypes=("bf16", "int8")) -> dict:
    """`model` in fp32, then each of `dtypes` (a copy cast), against fp32."""
    reference = predictions(model, data)
    out = {"positions": reference[2], "loss_fp32": reference[1] / reference[2]}
    for dtype in dtypes:
        cast = copy.deepcopy(model)
        cast_for_inference(cast, dtype)
        out[dtype] = against(reference, predictions(cast, data))
    return out, reference


def rounded_products(model, round_outputs: bool):
    """A copy of `model` (fp32) whose linears compute bf16(W) · bf16(x) in fp32, the outputs rounded to bf16 or not."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = torch.nn.Parameter(module.weight.detach().bfloat16().float())  # unties the head
                module.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
                if round_outputs:
                    module.register_forward_hook(lambda _, args, y: y.bfloat16().float())
    return out




def bf16_stream(model):
    """A copy of `model` as `--dtype bf16` casts it, but its residual stream and norms in bf16 too (residual_stream.py
    undone)."""
    out = copy.deepcopy(model)
    cast_for_inference(out, "bf16")
    for module in out.modules():
        if getattr(vars(module).get("forward"), "__func__", None) in (widened_rows, rounded_norm, rounded_tables):
            del module.forward
    return out


def fp32_attention(model):
    """A copy of `model` as `--dtype bf16` casts it, but its attention in fp32 (v widened, the tables left fp32)."""
    out = copy.deepcopy(model)
    cast_for_inference(out, "bf16")
    out.model.rotary_emb.forward = types.MethodType(type(out.model.rotary_emb).forward, out.model.rotary_emb)
    for layer in out.model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda _, args, y: y.float())
        layer.self_attn.o_proj.register_forward_pre_hook(lambda _, args: (args[0].bfloat16(),))
    return out


def where_rows(model, data, reference: tuple) -> dict:
    """The two `rounded_products` settings, `bf16_stream` and `fp32_attention` against the fp32 reference."""
    rows = {f"bf16 products, outputs {'bf16' if r else 'fp32'}, all else fp32":
            against(reference, predictions(rounded_products(model, r), data)) for r in (False, True)}
    rows["--dtype bf16 with the residual stream and norms in bf16 too"] = \
        against(reference, predictions(bf16_stream(model), data))
    rows["--dtype bf16 with the attention in fp32"] = against(reference, predictions(fp32_attention(model), data))
    return rows


def llama_cpp_rows(model, tok, data, reference: tuple) -> dict:
    """llama.cpp's f16 and q8_0 exports of `model` against the fp32 reference; {} without llama-cpp-python."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not built (make llama-cpp): its rows are left out")
        return {}
    from lorakit.export.gguf import write_model_gguf
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("f16", "q8_0"):
            path = write_model_gguf(model, tok, Path(tmp) / f"model-{quant}.gguf", quant)
            rows[f"llama.cpp {quant}"] = against(reference, llama_cpp_predictions(path, data))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a trained run: its adapter (unmerged) on the base, besides the base")
    ap.add_argument("--records", type=int, default=120)
    ap.add_argument("--where", action="store_true", help="also the rounding settings (see above) for the base")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dtype-quality.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = {}
    base, tok = load_model("smollm2", "instruct")
    data = held_out(tok, args.records)
    results["base"], reference = compare(base.eval(), data)
    results["base"] |= llama_cpp_rows(base, tok, data, reference)
    if args.where:
        results["base"] |= where_rows(base, data, reference)
    if args.run:
        adapted, tok, _ = load_trained(Path(args.run) / "adapter")
        results[f"adapted ({Path(args.run).name})"], _ = compare(adapted.eval(), data)
    for name, r in results.items():
        for case, row in r.items():
            if isinstance(row, dict):
                print(f"{name}, {case}: top-1 agreement {row['top1_agreement']:.4f} over {r['positions']} positions "
                      f"({row['differing']} differ, fp32 margin there median "
                      f"{row['fp32_margin_where_differing']['median']}); response loss {row['loss']:.4f} vs fp32 "
                      f"{r['loss_fp32']:.4f} ({row['loss_relative_difference']:+.2%})")
    Path(args.out).write_text(json.dumps({"what": __doc__.split("\n\n")[0], "records": args.records,
                                          "machine": machine(), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
