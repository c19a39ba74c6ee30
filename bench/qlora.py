"""QLoRA on SmolLM2-135M: 4-bit NF4 base weights against fp32 LoRA and against PEFT + bitsandbytes, in one run.

Cases (each in its own subprocess, so peak RSS is its own; batch 4 x 256, r=8 on the 7 projections, dropout 0.05):
  lora          lorakit, fp32 base
  qlora         lorakit, NF4 base, our pure-torch kernels (quant.py)
  qlora-bnb     lorakit, NF4 base in bitsandbytes Linear4bit (its CPU backend here)
  qlora-gc      qlora + gradient checkpointing per block (what the QLoRA recipes use)
  lora-gc       lora + gradient checkpointing, to tell what the 4 bits save from what checkpointing saves
  peft-bnb      PEFT LoRA on a transformers BitsAndBytesConfig(load_in_4bit, nf4, double quant) model
Prints a table and writes bench/results/qlora.json.
    python bench/qlora.py [--steps 4] [--cases lora,qlora,...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import PROJECTIONS, bench_args, machine, print_table, run_cases, time_steps  # noqa: E402

CASES = "lora,qlora,qlora-bnb,qlora-gc,lora-gc,peft-bnb"


def build(case: str, dropout: float):
    """(model, trainable params, bytes of the quantised linears' weights, fp32 bytes of the same weights)."""
    import torch
    from lorakit import LoRAConfig, add_lora
    from lorakit.engine.registry import lora_layers
    from lorakit.models.loading import load_model, resolve_spec
    if case == "peft-bnb":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(resolve_spec("smollm2")[0], quantization_config=q,
                                                     dtype=torch.float32, device_map="cpu")
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=PROJECTIONS))
        from lorakit.engine.quant import bnb_nbytes
        import bitsandbytes as bnb
        lin4 = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]  # not peft's wrappers of them
        qbytes = sum(bnb_nbytes(m) for m in lin4)
        fp32 = sum(4 * m.in_features * m.out_features for m in lin4)
        return model, qbytes, fp32
    model, _ = load_model("smollm2", "instruct")
    quant = case.startswith("qlora")
    add_lora(model, LoRAConfig(r=8, alpha=16, dropout=dropout, targets=PROJECTIONS, quantize="nf4" if quant else None,
                               quant_backend="bitsandbytes" if case == "qlora-bnb" else "torch"))
    if case.endswith("-gc"):
        model.config.use_cache = False
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    layers = [layer for _, layer in lora_layers(model)]
    fp32 = sum(4 * layer.in_features * layer.out_features for layer in layers)
    qbytes = sum(layer.nf4_nbytes() if layer.quantized else 4 * layer.in_features * layer.out_features
                 for layer in layers)
    return model, qbytes, fp32


def run_case(case: str, a: argparse.Namespace) -> dict:
    model, qbytes, fp32 = build(case, a.dropout)
    out = time_steps(case, model, a)
    return out | {"linear_weight_bytes": qbytes, "linear_weight_fp32_bytes": fp32,
                  "weight_memory_vs_fp32": qbytes / fp32}


def main() -> None:
    ap = bench_args(__doc__, "qlora", CASES, steps=4)
    results, a = run_cases(ap, __file__, run_case)
    if results is None:
        return
    ref = next((r for r in results if r["case"] == "lora"), results[0])
    peft = next((r for r in results if r["case"] == "peft-bnb"), None)
    print(f"\nSmolLM2-135M, batch {a.batch} x {a.seq}, r=8 on 7 projections, dropout {a.dropout}, AdamW, 2 threads")
    for r in results:
        r["rss_vs_lora"] = r["step_peak_rss_gb"] / ref["step_peak_rss_gb"]
        r["speed_vs_lora"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["speed_vs_peft_bnb"] = r["tokens_per_s"] / peft["tokens_per_s"] if peft else None
    print_table(results, [("case", lambda r: r["case"], ""), ("tokens/s", lambda r: r["tokens_per_s"], ".1f"),
                          ("step GB", lambda r: r["step_peak_rss_gb"], ".2f"),
                          ("weights MB", lambda r: r["linear_weight_bytes"] / 1e6, ".1f"),
                          ("w x fp32", lambda r: r["weight_memory_vs_fp32"], ".3f"),
                          ("RSS x lora", lambda r: r["rss_vs_lora"], ".2f"),
                          ("speed x lora", lambda r: r["speed_vs_lora"], ".2f"),
                          ("speed x peft-bnb", lambda r: r["speed_vs_peft_bnb"] or float("nan"), ".2f")])
    machine("qlora", a, results)


if __name__ == "__main__":
    main()
