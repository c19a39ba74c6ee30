"""Useful tokens per second on real instruction data: Alpaca records from ../shared/data, SmolLM2-135M fp32.

The loss counts only response tokens; a padded batch also pays for the prompt, the padding and the logits of both.
Cases (each in its own subprocess; r=8 on the 7 projections, dropout 0.05, AdamW, the same records in the same order):
  peft-padded       PEFT, right-padded batches of --batch records, transformers' loss
  lorakit-padded    lorakit, the same padded batches, transformers' loss
  lorakit-packed    lorakit, records packed into rows of --seq tokens (block-diagonal attention), label-only loss
  *-shared          packed rows keep the prompt preamble their records share once (collate.shared_prefix; the
                    `lorakit train --pack` default): the same loss and gradients from fewer tokens
  *-compile         the same with each decoder block compiled (compiled in untimed warm-up steps)
Then (--interleave, the default) all cases again in one process, taking turns, for speed ratios that the machine's
drift does not skew. Useful tokens/s = response tokens trained on / seconds. Prints a table, writes
bench/results/alpaca.json.
    python bench/alpaca.py [--records 96] [--cases ...]
"""
from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import (bench_args, build, machine, one_step, print_table, reset_peak_rss, run_cases,  # noqa: E402
                  vm_hwm_gb)

REPO = Path(__file__).resolve().parents[1]
ALPACA = REPO.parent / "shared" / "data" / "alpaca" / "alpaca_data.json"
CASES = "peft-padded,lorakit-padded,lorakit-packed,lorakit-packed-shared,lorakit-packed-shared-compile"


def batches(case: str, a: argparse.Namespace) -> list[dict]:
    """The case's batches over the first --records Alpaca records (the lorakit pipeline's own encoding)."""
    from lorakit.data.collate import pack, packed_batch, pad_batch
    from lorakit.data.prompts import InstructionData
    from lorakit.models.loading import load_tokenizer, resolve_spec
    tok = load_tokenizer(resolve_spec("smollm2")[0])
    data = InstructionData.load(ALPACA, strict=False)  # the recipe skips its few empty outputs too
    data.examples = data.examples[:a.records]
    enc = data.encode(tok, max_length=a.seq, template="alpaca")
    if "packed" in case.split("-"):
        share = "shared" in case.split("-")
        rows = pack(enc, a.seq, share_prefix=share)
        # --batch rows of --seq tokens: the same token budget per step as the longest padded batch
        return [packed_batch(rows[i:i + a.batch], tok.pad_token_id, share_prefix=share)
                for i in range(0, len(rows), a.batch)]
    return [pad_batch(enc[i:i + a.batch], tok.pad_token_id) for i in range(0, len(enc), a.batch)]


def setup(case: str, a: argparse.Namespace):
    """The case's model (warmed up), loss, batches and optimizer."""
    import torch
    from step import loss_of
    model = build(case, a.dropout)
    loss_fn = loss_of("x-label" if "packed" in case.split("-") else case)
    data = batches(case, a)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    # warm-up, not timed; compiled: the first and the last batch's shapes, then one more step to settle
    for warm in ([data[0], data[-1], data[0]] if "compile" in case.split("-") else [data[0]]):
        loss_fn(model, warm).backward()
        opt.zero_grad(set_to_none=True)
    return model, loss_fn, data, opt


def run_case(case: str, a: argparse.Namespace) -> dict:
    model, loss_fn, data, opt = setup(case, a)
    reset_peak_rss()
    useful = sum(int((b["labels"][:, 1:] != -100).sum()) for b in data)
    seen = sum(b["input_ids"].numel() for b in data)
    dt, losses = 0.0, []
    for i, b in enumerate(data):
        seconds, loss = one_step(model, opt, loss_fn, b)
        dt += seconds
        losses.append(loss)
        print(f"  {case} batch {i + 1}/{len(data)} {tuple(b['input_ids'].shape)} loss {loss:.4f}", file=sys.stderr,
              flush=True)
    return {"case": case, "seconds": dt, "steps": len(data), "useful_tokens": useful, "computed_tokens": seen,
            "useful_tokens_per_s": useful / dt, "computed_tokens_per_s": seen / dt,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "step_peak_rss_gb": vm_hwm_gb(), "losses": losses}


def interleaved_seconds(cases: list[str], a: argparse.Namespace) -> dict[str, float]:
    """{case: seconds for its pass over the records} with all cases in this one process, taking turns: each case's
    batches spread evenly over the rounds (a packed case, with half the batches, steps every other round), so the
    machine's drift reaches every case alike."""
    import torch
    torch.set_num_threads(2)
    runs = {case: setup(case, a) for case in cases}
    rounds = max(len(data) for _, _, data, _ in runs.values())
    seconds = dict.fromkeys(cases, 0.0)
    for r in range(rounds):
        for case, (model, loss_fn, data, opt) in runs.items():
            for i in range(r * len(data) // rounds, (r + 1) * len(data) // rounds):
                dt, loss = one_step(model, opt, loss_fn, data[i])
                seconds[case] += dt
                print(f"  turns round {r + 1}/{rounds} {case} batch {i + 1}/{len(data)}: {dt:.2f}s loss {loss:.4f}",
                      file=sys.stderr, flush=True)
    return seconds


def main() -> None:
    ap = bench_args(__doc__, "alpaca", CASES)
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                    help="also run all cases in one process, taking turns (the speed ratios reported)")
    results, a = run_cases(ap, __file__, run_case)
    if results is None:
        return
    speed = "useful_tokens_per_s"
    if a.interleave:
        for r, seconds in zip(results, interleaved_seconds([r["case"] for r in results], a).values()):
            r["interleaved_seconds"], r["interleaved_useful_tokens_per_s"] = seconds, r["useful_tokens"] / seconds
        speed = "interleaved_useful_tokens_per_s"
    ref = next((r for r in results if r["case"] == "peft-padded"), results[0])
    print(f"\nSmolLM2-135M fp32 on the first {a.records} Alpaca records (max {a.seq} tokens), r=8 on 7 projections, "
          f"dropout {a.dropout}, AdamW, 2 threads")
    for r in results:
        r["useful_speed_vs_peft"] = r[speed] / ref[speed]
    print_table(results, [("case", lambda r: r["case"], ""), ("steps", lambda r: r["steps"], "d"),
                          ("seconds", lambda r: r["seconds"], ".1f"), ("useful tok", lambda r: r["useful_tokens"], "d"),
                          ("useful tok/s", lambda r: r["useful_tokens_per_s"], ".1f"),
                          ("computed tok/s", lambda r: r["computed_tokens_per_s"], ".1f"),
                          ("peak GB", lambda r: r["step_peak_rss_gb"], ".2f"),
                          ("turns s", lambda r: r.get("interleaved_seconds", float("nan")), ".1f"),
                          ("turns useful tok/s", lambda r: r.get("interleaved_useful_tokens_per_s", float("nan")), ".1f"),
                          ("useful x", lambda r: r["useful_speed_vs_peft"], ".2f")])
    machine("alpaca", a, results)


if __name__ == "__main__":
    main()
