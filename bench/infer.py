"""Inference latency with adapters: SmolLM2-135M fp32, 2 threads, three r=8 adapters on the 7 projections.

Cases (the same weights everywhere, so only the adapter handling differs):
  base         the plain transformers model, no lorakit layer in it (the reference)
  disabled     lorakit's model with every adapter disabled
  merged       one adapter folded into the weights, on a model of its own, merged once (target: base latency, +-3%)
  unmerged     one adapter applied on the fly (target: at most 1.15x base)
  mixed        a batch whose rows use three different adapters (target: at most 1.3x `unmerged` on the same batch)
  peft-*       the same with HF peft on its own copy of the model
Two workloads: prefill (a batch of --batch x --seq tokens, one forward) and decode (greedy --new tokens after a
--batch x 32 prompt, KV cache). The cases take turns, one run each per round (the order reversed every other round),
--repeat rounds after a warm-up round; seconds are each case's median, "x base" the median over rounds of its time
over base's in the same round (so the machine's drift between rounds cancels). Prints a table, writes
bench/results/infer.json.
    python bench/infer.py [--repeat 11]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import PROJECTIONS, machine  # noqa: E402


def interleaved(cases: dict, repeat: int) -> dict[str, list[float]]:
    """{case: (context factory, fn)} -> {case: seconds per round}: every round runs each case once, in turn, in
    the opposite order every other round, so neither drift nor a case's place in the round favours any case."""
    times = {c: [] for c in cases}
    for round_ in range(repeat + 1):  # round 0 warms up
        for case, (context, fn) in (reversed(cases.items()) if round_ % 2 else cases.items()):
            with context():
                t0 = time.perf_counter()
                fn()
                if round_:
                    times[case].append(time.perf_counter() - t0)
    return times


def paired(times: dict[str, list[float]], case: str, ref: str) -> float:
    """Median over rounds of case's time / ref's time in the same round: drift between rounds cancels out."""
    return statistics.median(t / r for t, r in zip(times[case], times[ref]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "infer.json"))
    a = ap.parse_args()
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from lorakit import LoRAConfig, adapters_by_row, add_lora, disable_adapters, merge, set_adapter
    from lorakit.engine.registry import lora_layers
    from lorakit.models.loading import load_model

    plain, _ = load_model("smollm2", "instruct")
    names = ["a", "b", "c"]

    def adapted():
        m, _ = load_model("smollm2", "instruct")
        for name in names:
            add_lora(m, LoRAConfig(r=8, alpha=16, targets=PROJECTIONS), name)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, layer in lora_layers(m):
                for name in names:
                    layer.lora_B[name].copy_(torch.randn(layer.lora_B[name].shape, generator=g) * 0.01)
        set_adapter(m, "a")
        return m

    model, merged_model = adapted(), adapted()
    merge(merged_model)
    from peft import LoraConfig, get_peft_model
    peft_base, _ = load_model("smollm2", "instruct")
    peft_model = get_peft_model(peft_base, LoraConfig(r=8, lora_alpha=16, target_modules=PROJECTIONS,
                                                      init_lora_weights=False))
    for m in (plain, model, merged_model, peft_model):
        m.eval()
    ids = torch.randint(0, 49152, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    prompt = ids[:, :32]

    def prefill(m):
        return lambda: m(input_ids=ids, use_cache=False)

    def decode(m):
        return lambda: m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=a.new,
                                  min_new_tokens=a.new, do_sample=False, pad_token_id=0)

    rows = [names[i % len(names)] for i in range(a.batch)]
    results = []
    with torch.no_grad():
        for workload, make in (("prefill", prefill), ("decode", decode)):
            timing = interleaved({
                "base": (contextlib.nullcontext, make(plain)),
                "disabled": (lambda: disable_adapters(model), make(model)),
                "unmerged": (contextlib.nullcontext, make(model)),
                "merged": (contextlib.nullcontext, make(merged_model)),
                "mixed": (lambda: adapters_by_row(model, rows), make(model)),
                "peft-base": (peft_model.disable_adapter, make(peft_model)),
                "peft-unmerged": (contextlib.nullcontext, make(peft_model)),
            }, a.repeat)
            for case, t in timing.items():
                results.append({"workload": workload, "case": case, "seconds": statistics.median(t),
                                "vs_base": paired(timing, case, "base"),
                                "vs_unmerged": paired(timing, case, "unmerged") if not case.startswith("peft") else None,
                                "round_seconds": t})
    print(f"\nSmolLM2-135M fp32, 2 threads; prefill {a.batch} x {a.seq}; decode {a.new} tokens after {a.batch} x 32; "
          f"3 adapters r=8 on 7 projections; {a.repeat} interleaved rounds: median seconds, median paired ratios")
    print(f"{'workload':<8} {'case':<14} {'seconds':>8} {'x base':>7} {'x unmerged':>11}")
    for r in results:
        vs_u = f"{r['vs_unmerged']:.3f}" if r["vs_unmerged"] is not None else ""
        print(f"{r['workload']:<8} {r['case']:<14} {r['seconds']:>8.3f} {r['vs_base']:>7.3f} {vs_u:>11}")
    machine("infer", a, results)


if __name__ == "__main__":
    main()
