"""Generation speed on this CPU against what its memory bandwidth allows (the measurement behind issue #21).

A batch-1 decode step reads every weight once, so memory bandwidth bounds it: the bench times a 1 GiB read and one
F.linear over all of SmolLM2-135M's weight matrices at M=1 (the step's weight traffic, with nothing else), and
reports each case as a fraction of that bound. Cases, taking turns over several rounds (median): transformers'
`generate` and lorakit's decode loop (its step in C++, and in Python) at batch 1 and at batch 8 (left-padded),
greedy, 64 new tokens, on DialogSum test dialogues in the `dialogsum` recipe's prompt; a prefill of 8 x 256 tokens
by each (best of 3 a round); and llama.cpp on an f16 export where llama-cpp-python is built. Then greedy tokens of
the loop against `generate`'s on 20 further prompts x 64 tokens at batch 1 and 8: the base, a random adapter
unmerged and merged, and adapters mixed by row. With bf16 weights (`--dtype bf16`: the C++ step's own AVX-512
kernel, skinny_gemm.cpp) the loop at batch 1, 8 and 16 beside fp32 at 16, the same with int8 weights (`--dtype int8`,
its int8 kernel), and llama.cpp's q8_0 export beside its f16. The machine's bound for each dtype: the measured read GB/s over the bytes of the weights in that dtype. Writes
bench/results/generate.json and prints a Markdown table.

    python bench/generate.py [--rounds 3] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))
from lorakit.inference.precision import cast_for_inference  # noqa: E402
from lorakit.evaluation.runs import machine  # noqa: E402
from lorakit.inference.compiled_step import extension  # noqa: E402
from lorakit.data.prompts import SummarizationData, format_prompt  # noqa: E402
from lorakit.inference.sampling import Choice  # noqa: E402
from lorakit.inference.decode import decode  # noqa: E402
from lorakit.models.loading import load_model  # noqa: E402

DIALOGSUM_TEST = ROOT.parent / "shared" / "data" / "dialogsum" / "dialogsum.test.jsonl"


def read_bandwidth(gib: float = 1.0) -> float:
    """GB/s of summing a `gib` GiB fp32 tensor (one pass over memory), best of 3."""
    x = torch.ones(int(gib * 2 ** 30 / 4))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def weight_bound(model) -> dict:
    """Steps/s if a decode step did nothing but one batch-1 F.linear per weight matrix (the LM head included)."""
    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {w.shape[1]: torch.randn(1, w.shape[1]) for w in mats}
    nbytes = sum(w.numel() * 4 for w in mats)
    best = float("inf")
    with torch.no_grad():
        for _ in range(5):
            t0 = time.perf_counter()
            for w in mats:
                F.linear(x[w.shape[1]], w)
            best = min(best, time.perf_counter() - t0)
    return {"matrices": len(mats), "weight_mb": nbytes / 1e6, "linear_pass_ms": best * 1e3,
            "bound_steps_s": 1 / best, "linear_gb_s": nbytes / best / 1e9}


@torch.no_grad()
def hf_generate(model, tok, prompts: list[str], batch: int, new_tokens: int) -> dict:
    """Decode tokens/s of transformers' generate over `prompts` in batches (prefill timed apart and taken out)."""
    side, tok.padding_side = tok.padding_side, "left"
    prefill_s = total_s = 0.0
    rows = 0
    try:
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i:i + batch], return_tensors="pt", padding=True)
            kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=1, **kw)
            t1 = time.perf_counter()
            model.generate(**enc, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kw)
            t2 = time.perf_counter()
            prefill_s += t1 - t0
            total_s += t2 - t1
            rows += enc["input_ids"].shape[0]
    finally:
        tok.padding_side = side
    steps_s = (len(range(0, len(prompts), batch)) * new_tokens) / (total_s - prefill_s)
    return {"decode_tok_s": rows * new_tokens / (total_s - prefill_s), "decode_steps_s": steps_s}


def loop_generate(model, tok, prompts: list[str], batch: int, new_tokens: int, compiled: bool = True) -> dict:
    """The same measurement through lorakit's decode loop (static cache; `batch` slots; no EOS, so every row makes
    exactly `new_tokens` and the batch stays whole, as in the transformers case); its step in C++ (`compiled`) or
    in Python. Decoding is timed within the call, from the moment every row has its first token (the prefill's) to
    the last token: subtracting a separately timed prefill, as the transformers case must, moves a 16-row figure by
    up to 20% from run to run, the prefill being longer than the decoding there."""
    ids = [tok(p)["input_ids"] for p in prompts]
    decode_s = 0.0
    for i in range(0, len(ids), batch):
        rows = ids[i:i + batch]
        first = None
        for made, _ in enumerate(decode(model, rows, Choice.greedy(new_tokens + 1), set(), tok.pad_token_id,
                                        slots=batch, compiled=compiled), 1):
            if made == len(rows):  # every row's first token: the prefill is done, the steps start
                first = time.perf_counter()
        decode_s += time.perf_counter() - first
    steps = len(range(0, len(ids), batch)) * new_tokens
    return {"decode_tok_s": len(ids) * new_tokens / decode_s, "decode_steps_s": steps / decode_s}


def prefill_ids(rows: int = 8, length: int = 256) -> torch.Tensor:
    return torch.randint(100, 40000, (rows, length), generator=torch.Generator().manual_seed(0))


def best_of(repeats: int, run) -> float:
    """The shortest of `repeats` timed calls of run() (a prefill is one call of a few seconds: noisy alone)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return min(times)


@torch.no_grad()
def prefill(model, rows: int = 8, length: int = 256, repeats: int = 3) -> dict:
    ids = prefill_ids(rows, length)
    return {"prefill_tok_s": rows * length / best_of(repeats, lambda: model(input_ids=ids, logits_to_keep=1))}


def loop_prefill(model, rows: int = 8, length: int = 256, repeats: int = 3) -> dict:
    """lorakit's prefill: the static cache allocated, the model's forward writing its keys and values into it."""
    ids = prefill_ids(rows, length).tolist()
    seconds = best_of(repeats, lambda: list(decode(model, ids, Choice.greedy(1), set(), 0, slots=rows)))
    return {"prefill_tok_s": rows * length / seconds}


def identical_tokens(model, tok, prompts: list[str], batch: int, new_tokens: int, setting=None) -> dict:
    """Greedy tokens of the decode loop against transformers' `generate`, batch by batch (left-padded), each batch
    under `setting(rows)` (a context manager: an adapter merged, unmerged or mixed by row; None: as the model is)."""
    side, tok.padding_side = tok.padding_side, "left"
    same = 0
    try:
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            with setting(len(chunk)) if setting else contextlib.nullcontext(), torch.no_grad():
                enc = tok(chunk, return_tensors="pt", padding=True)
                out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
                expected = [r[:r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r
                            for r in out[:, enc["input_ids"].shape[1]:].tolist()]
                got: list[list[int]] = [[] for _ in expected]
                ids = [tok(p)["input_ids"] for p in chunk]
                eos = {tok.eos_token_id}
                for j, token in decode(model, ids, Choice.greedy(new_tokens), eos, tok.pad_token_id, batch):
                    got[j].append(token)
            same += sum(a == b for a, b in zip(got, expected))
    finally:
        tok.padding_side = side
    return {"prompts": len(prompts), "new_tokens": new_tokens, "batch": batch, "identical": same}


def identity_checks(model, tok, prompts: list[str], new_tokens: int) -> list[dict]:
    """The token-identity checks of #21: batch 1 and 8, base and a random adapter (B nonzero) unmerged, merged and
    (batch 8) mixed by row with a second adapter and rows without one."""
    from lorakit import LoRAConfig, adapters_by_row, add_lora, disable_adapters, set_adapter
    from lorakit.inference.generation import merged
    from lorakit.engine.registry import lora_layers
    add_lora(model, LoRAConfig(r=8, alpha=16, targets="all-linear"), "a")
    add_lora(model, LoRAConfig(r=4, alpha=8, targets="attention"), "b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for B in layer.lora_B.values():
                B.copy_(torch.randn(B.shape, generator=g) * 0.1)
    set_adapter(model, "a")
    settings = {"base": lambda rows: disable_adapters(model),
                "adapter unmerged": lambda rows: contextlib.nullcontext(),
                "adapter merged": lambda rows: merged(model),
                "adapters mixed by row": lambda rows: adapters_by_row(model, (["a", None, "b"] * rows)[:rows])}
    checks = []
    for batch in (1, 8):
        for name, setting in settings.items():
            if batch == 1 and name == "adapters mixed by row":
                continue
            checks.append({"setting": name} | identical_tokens(model, tok, prompts, batch, new_tokens, setting))
            print(f"greedy tokens identical to transformers' generate, {name}, batch {batch}: "
                  f"{checks[-1]['identical']}/{len(prompts)} prompts x {new_tokens} tokens", flush=True)
    return checks


def batch_one(row: dict) -> dict:
    """At batch 1 a decode step makes one token: steps/s are tokens/s."""
    return row | {"decode_steps_s": row["decode_tok_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--check-prompts", type=int, default=20, help="prompts for the token-identity check (0: none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "generate.json"))
    ap.add_argument("--only", default="", help="comma-separated parts of case names: run just those cases")
    args = ap.parse_args()
    model, tok = load_model("smollm2")
    model.eval()
    if extension() is None:
        sys.exit("the C++ decode step is not built here (see the line above): its rows would time the Python step")
    data = SummarizationData.load(DIALOGSUM_TEST)
    prompts = [format_prompt(tok, e.instruction, e.prompt_input, "alpaca") for e in data.examples[:8]]
    sixteen = [format_prompt(tok, e.instruction, e.prompt_input, "alpaca") for e in data.examples[:16]]
    bf16 = copy.deepcopy(model)
    cast_for_inference(bf16, "bf16")
    int8 = copy.deepcopy(model)
    cast_for_inference(int8, "int8")
    cases = {"transformers generate, batch 1": lambda: hf_generate(model, tok, prompts, 1, args.new_tokens),
             "transformers generate, batch 8": lambda: hf_generate(model, tok, prompts, 8, args.new_tokens),
             "lorakit decode loop, batch 1": lambda: loop_generate(model, tok, prompts, 1, args.new_tokens),
             "lorakit decode loop, batch 8": lambda: loop_generate(model, tok, prompts, 8, args.new_tokens),
             "lorakit decode loop, Python step, batch 1": lambda: loop_generate(model, tok, prompts, 1,
                                                                                args.new_tokens, compiled=False),
             "lorakit decode loop, Python step, batch 8": lambda: loop_generate(model, tok, prompts, 8,
                                                                                args.new_tokens, compiled=False),
             "transformers prefill 8 x 256": lambda: prefill(model),
             "lorakit prefill 8 x 256": lambda: loop_prefill(model),
             "lorakit decode loop, batch 16": lambda: loop_generate(model, tok, sixteen, 16, args.new_tokens),
             "lorakit decode loop bf16, batch 1": lambda: loop_generate(bf16, tok, prompts, 1, args.new_tokens),
             "lorakit decode loop bf16, batch 8": lambda: loop_generate(bf16, tok, prompts, 8, args.new_tokens),
             "lorakit decode loop bf16, batch 16": lambda: loop_generate(bf16, tok, sixteen, 16, args.new_tokens),
             "lorakit prefill bf16 8 x 256": lambda: loop_prefill(bf16),
             "lorakit decode loop int8, batch 1": lambda: loop_generate(int8, tok, prompts, 1, args.new_tokens),
             "lorakit decode loop int8, batch 8": lambda: loop_generate(int8, tok, prompts, 8, args.new_tokens),
             "lorakit decode loop int8, batch 16": lambda: loop_generate(int8, tok, sixteen, 16, args.new_tokens),
             "lorakit prefill int8 8 x 256": lambda: loop_prefill(int8)}
    tmp = tempfile.TemporaryDirectory()
    only = [part for part in args.only.split(",") if part]
    try:
        if only and not any("llama.cpp" in part for part in only):
            raise ImportError("not asked for (--only)")
        import llama_cpp  # noqa: F401
        from export import llama_cpp_case
        from lorakit.export.gguf import write_model_gguf
        f16 = write_model_gguf(model, tok, Path(tmp.name) / "smollm2-f16.gguf", "f16")
        ids = [tok(p)["input_ids"] for p in prompts]
        cases["llama.cpp f16, batch 1"] = lambda: batch_one(llama_cpp_case(f16, ids, args.new_tokens,
                                                                         torch.get_num_threads()))
        q8 = write_model_gguf(model, tok, Path(tmp.name) / "smollm2-q8_0.gguf", "q8_0")
        cases["llama.cpp q8_0, batch 1"] = lambda: batch_one(llama_cpp_case(q8, ids, args.new_tokens,
                                                                          torch.get_num_threads()))
    except ImportError as error:
        print(f"llama.cpp's rows are left out ({error}; make llama-cpp builds it)")
    cases = {name: case for name, case in cases.items() if not only or any(part in name for part in only)}
    for batch in (1, 8):  # first calls allocate and pick kernels: not timed
        hf_generate(model, tok, prompts[:batch], batch, 2)
        loop_generate(model, tok, prompts[:batch], batch, 2)
        loop_generate(model, tok, prompts[:batch], batch, 2, compiled=False)
    for quantised in (bf16, int8):
        for batch in (1, 8, 16):
            loop_generate(quantised, tok, sixteen[:batch], batch, 2)
        loop_prefill(quantised, repeats=1)
    runs = {name: [] for name in cases}
    bound = {"read_gb_s": [], "weights": []}
    for r in range(args.rounds):
        bound["read_gb_s"].append(read_bandwidth())
        bound["weights"].append(weight_bound(model))
        for name, case in cases.items():  # taking turns: the machine's drift hits every case alike
            runs[name].append(case())
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    tmp.cleanup()
    rows = {name: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for name, rs in runs.items()}
    check_prompts = [format_prompt(tok, e.instruction, e.prompt_input, "alpaca")
                     for e in data.examples[8:8 + args.check_prompts]]
    identity = identity_checks(model, tok, check_prompts, args.new_tokens) if check_prompts else []
    steps_bound = statistics.median(b["bound_steps_s"] for b in bound["weights"])
    read = statistics.median(bound["read_gb_s"])
    weight_mb = bound["weights"][-1]["weight_mb"]  # fp32
    machine_bound = {"fp32": read * 1e3 / weight_mb, "bf16": read * 1e3 / (weight_mb / 2),
                     "int8": read * 1e3 / (weight_mb * 9 / 32),  # a byte a weight, an fp32 scale per 32
                     "q8_0": read * 1e3 / (weight_mb * 34 / 128)}  # q8_0: 34 bytes per 32 weights
    for name, row in rows.items():
        if "decode_steps_s" in row:
            row["fraction_of_bound"] = row["decode_steps_s"] / steps_bound
            kind = next((k for k in ("int8", "bf16", "q8_0") if k in name), "bf16" if "f16" in name else "fp32")
            row["fraction_of_machine_bound"] = row["decode_steps_s"] / machine_bound[kind]
    result = {"machine": machine(), "threads": torch.get_num_threads(), "rounds": args.rounds,
              "new_tokens": args.new_tokens, "prompt_tokens": [len(tok(p)["input_ids"]) for p in prompts],
              "read_gb_s": read, "weight_bound": bound["weights"][-1] | {"bound_steps_s": steps_bound},
              "machine_bound_steps_s": machine_bound, "rows": rows, "identical_to_transformers": identity, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nmemory read {result['read_gb_s']:.1f} GB/s; all weight matrices at M=1: "
          f"{result['weight_bound']['linear_pass_ms']:.1f} ms = {steps_bound:.1f} decode steps/s at best; the "
          "machine's bound (read GB/s over the weights' bytes): "
          + ", ".join(f"{k} {v:.1f} steps/s" for k, v in machine_bound.items()) + "\n")
    print("| case | tokens/s | decode steps/s | fraction of the fp32 F.linear bound | of the machine's bound | vs "
          "transformers |\n|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        rate = row.get("decode_tok_s") or row.get("prefill_tok_s")
        steps = f"{row['decode_steps_s']:.1f}" if "decode_steps_s" in row else ""
        fraction = f"{row['fraction_of_bound']:.0%}" if "fraction_of_bound" in row else ""
        of_machine = f"{row['fraction_of_machine_bound']:.0%}" if "fraction_of_machine_bound" in row else ""
        rival = rows.get(name.replace("lorakit decode loop", "transformers generate").replace(", Python step", "")
                         .replace(" bf16", "").replace(" int8", "").replace("lorakit", "transformers"))
        rival = rival if name.startswith("lorakit") else None
        versus = f"{rate / (rival.get('decode_tok_s') or rival['prefill_tok_s']):.2f}x" if rival else ""
        print(f"| {name} | {rate:.1f} | {steps} | {fraction} | {of_machine} | {versus} |")
    print(f"\n-> {args.out}")


if __name__ == "__main__":
    main()
