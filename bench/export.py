"""llama.cpp on lorakit's GGUF exports next to lorakit's own generation: batch-1 prefill and decode tokens/s.

SmolLM2-135M-Instruct (embedded) is exported with lorakit's writer as f32, f16, q8_0 and q4_0; llama.cpp (through
llama-cpp-python, `make llama-cpp`) runs each on the same chat prompts as transformers' `generate` in fp32 (what
`lorakit generate` and the page use). Greedy, 64 new tokens, cases taking turns over several rounds (the machine's
speed drifts), median per case. Writes bench/results/export-llama-cpp.json and prints a Markdown table.

    python bench/export.py [--rounds 3] [--new-tokens 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lorakit.evaluation.runs import machine  # noqa: E402
from lorakit.export.gguf import write_model_gguf  # noqa: E402
from lorakit.models.loading import load_model  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Explain what a neural network is to a child.", "Give me three tips for learning to cook.",
           "Summarise the plot of Romeo and Juliet in two sentences.", "What causes rain?"]
QUANTS = ("f16", "q8_0", "q4_0")


def last_logits(llm) -> np.ndarray:
    """The logits after the last evaluated token (llama-cpp-python keeps `scores` only with logits_all=True)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def llama_cpp_case(path: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> dict:
    """Prefill and decode tokens/s of llama.cpp on one file (its defaults: f16 KV cache)."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    prefill_s = decode_s = 0.0
    prefill_n = 0
    for ids in prompts:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(last_logits(llm)))])
        decode_s += time.perf_counter() - t1
        prefill_s += t1 - t0
        prefill_n += len(ids)
    return {"prefill_tok_s": prefill_n / prefill_s, "decode_tok_s": len(prompts) * new_tokens / decode_s}


@torch.no_grad()
def transformers_case(model, prompts: list[list[int]], new_tokens: int, eos_id: int) -> dict:
    """The same with transformers' generate in fp32: prefill timed as a 1-token generate, decode as the rest."""
    prefill_s = decode_s = 0.0
    prefill_n = 0
    for ids in prompts:
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=eos_id)
        t1 = time.perf_counter()
        model.generate(x, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                       pad_token_id=eos_id)
        t2 = time.perf_counter()
        prefill_s += t1 - t0
        prefill_n += len(ids)
        decode_s += (t2 - t1) - (t1 - t0)
    return {"prefill_tok_s": prefill_n / prefill_s, "decode_tok_s": len(prompts) * new_tokens / decode_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "export-llama-cpp.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2")
    model.eval()
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        files = {q: write_model_gguf(model, tok, Path(tmp) / f"smollm2-{q}.gguf", q) for q in QUANTS}
        sizes = {q: f.stat().st_size for q, f in files.items()}
        cases = {"transformers generate (fp32)": lambda: transformers_case(model, prompts, args.new_tokens,
                                                                          tok.eos_token_id)}
        cases |= {f"llama.cpp {q}": (lambda f=f: llama_cpp_case(f, prompts, args.new_tokens, args.threads))
                  for q, f in files.items()}
        runs: dict[str, list[dict]] = {name: [] for name in cases}
        for r in range(args.rounds):
            for name, case in cases.items():  # taking turns: drift hits every case alike
                runs[name].append(case())
                print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    rows = {name: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for name, rs in runs.items()}
    ref = rows["transformers generate (fp32)"]
    for name, row in rows.items():
        row["decode_vs_transformers"] = row["decode_tok_s"] / ref["decode_tok_s"]
        row["prefill_vs_transformers"] = row["prefill_tok_s"] / ref["prefill_tok_s"]
    result = {"machine": machine(), "threads": args.threads, "rounds": args.rounds, "new_tokens": args.new_tokens,
              "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "file_bytes": sizes,
              "rows": rows, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| case | file | prefill tokens/s | decode tokens/s | decode vs transformers |\n|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        size = next((f"{sizes[q] / 1e6:.0f} MB" for q in sizes if name.endswith(q)), "fp32 in memory")
        print(f"| {name} | {size} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | "
              f"{row['decode_vs_transformers']:.2f}x |")
    print(f"\n-> {args.out}")


if __name__ == "__main__":
    main()
