"""One LoRA training step on SmolLM2-135M (fp32): lorakit against HF peft, in the same run.

Each case runs in its own subprocess so its peak RSS is its own. Prints a table and writes bench/results/step.json.
    python bench/step.py [--steps 5] [--dropout 0.05] [--cases peft,lorakit,lorakit-label,...]
A case is the library (peft or lorakit) and options: -label, lorakit's label-only chunked LM loss (loss.py) instead
of transformers' full-logits loss; -compile, torch.compile of each decoder block (lorakit.models.compile_blocks), for
PEFT as for lorakit; its compile happens in the warm-up steps, which are not timed.
Then (--interleave, the default) all cases again in one process, a step each in turn, for speed ratios that the
machine's drift does not skew.
The helpers here (time_steps, run_cases, machine) are the harness the other step benchmarks share.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(case: str, dropout: float):
    """SmolLM2 with r=8 LoRA on the 7 projections by peft or lorakit (the case's first word); -compile: compiled."""
    from lorakit import LoRAConfig, add_lora
    from lorakit.models import compile_blocks, load_model
    model, _ = load_model("smollm2", "instruct")
    if case.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                 target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    elif case.startswith("lorakit"):
        model = add_lora(model, LoRAConfig(r=8, alpha=16, dropout=dropout, targets=PROJECTIONS))
    else:
        raise SystemExit(f"unknown case {case!r}")
    if "compile" in case.split("-"):
        compile_blocks(model)
    return model


def reset_peak_rss() -> None:
    """Hand freed heap back to the OS and restart the kernel's high-water mark (VmHWM) from the current RSS."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux/glibc: VmHWM then includes loading
        pass


def vm_hwm_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def loss_of(case: str):
    """How a case computes its loss: transformers' `model(...).loss`, or lorakit's label-only chunked loss."""
    if "label" in case.split("-"):
        from lorakit.loss import causal_lm_loss
        return causal_lm_loss
    return lambda model, batch: model(**batch).loss


def one_step(model, opt, loss_fn, batch: dict) -> tuple[float, float]:
    """One AdamW training step on `batch`: (seconds, loss)."""
    t0 = time.perf_counter()
    loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, loss.item()


def interleaved_speed(cases: list[str], a: argparse.Namespace) -> dict[str, float]:
    """{case: median step seconds} with every case's model in this one process, one step each in turn, round after
    round: the machine's drift (tens of percent over minutes here) reaches all cases alike, so the ratios hold."""
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    runs = {}
    for case in cases:
        model = build(case, a.dropout).train()
        runs[case] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4),
                      loss_of(case))
    times = {case: [] for case in cases}
    warmup = max(a.warmup, 3)
    for i in range(warmup + a.steps):
        for case, (model, opt, loss_fn) in runs.items():
            dt, loss = one_step(model, opt, loss_fn, {"input_ids": ids, "labels": ids})
            if i >= warmup:
                times[case].append(dt)
            print(f"  interleaved round {i + 1}/{warmup + a.steps} {case}: {dt:.2f}s loss {loss:.4f}",
                  file=sys.stderr, flush=True)
    return {case: statistics.median(t) for case, t in times.items()}


def linear_ceiling() -> float:
    """GFLOP/s of F.linear on 2048x2048 fp32 matrices, now: the machine's speed at the time a case runs (this box's
    speed drifts by tens of percent over minutes, so each case carries its own yardstick)."""
    import torch
    x, w = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.nn.functional.linear(x, w)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.nn.functional.linear(x, w)
    return 10 * 2 * 2048 ** 3 / (time.perf_counter() - t0) / 1e9


def time_steps(case: str, model, a: argparse.Namespace) -> dict:
    """Median wall time of AdamW training steps on random tokens (after warm-up), peak RSS, FLOP rate."""
    import torch
    loss_fn = loss_of(case)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    c = model.config  # weights that take part in a matmul: the projections of every layer and the LM head
    h, kv = c.hidden_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    base_params = c.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * c.intermediate_size) + c.vocab_size * h
    model.train()
    reset_peak_rss()
    ids = torch.randint(0, 49152, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    times, losses = [], []
    warmup = max(a.warmup, 3) if "compile" in case.split("-") else a.warmup  # compiling, then settling
    for i in range(warmup + a.steps):
        dt, loss = one_step(model, opt, loss_fn, {"input_ids": ids, "labels": ids})
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
        print(f"  {case} step {i + 1}/{warmup + a.steps}: {dt:.2f}s loss {loss:.4f}", file=sys.stderr,
              flush=True)
    step = statistics.median(times)
    tokens = a.batch * a.seq
    gflops = 4 * base_params * tokens / step / 1e9  # matmul FLOPs: forward 2N + input-gradient 2N per token
    ceiling = linear_ceiling()
    return {"case": case, "step_s": step, "tokens_per_s": tokens / step, "gflops": gflops,
            "linear_ceiling_gflops": ceiling, "of_ceiling": gflops / ceiling,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # loading included
            "step_peak_rss_gb": vm_hwm_gb(),  # since the model was built: the training steps' own peak
            "trainable": sum(p.numel() for p in params), "losses": losses, "step_times": times}


def run_cases(ap: argparse.ArgumentParser, script: str, run_case: Callable[[str, argparse.Namespace], dict]):
    """Parse args; as a child, run one case and write its JSON; as the parent, run each case in a subprocess.
    Returns (results, args) in the parent, (None, args) in a child."""
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        import torch
        torch.set_num_threads(2)
        torch.manual_seed(0)
        Path(a.json).write_text(json.dumps(run_case(a.case, a)))
        return None, a
    results = []
    for case in a.cases.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, script, *sys.argv[1:], "--case", case, "--json", f.name], check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "2"})
            results.append(json.loads(Path(f.name).read_text()))
    return results, a


def print_table(results: list[dict], columns: list[tuple[str, Callable[[dict], object], str]]) -> None:
    """Print results as an aligned table; each column is (header, its value in a result, format spec)."""
    cells = [[format(value(r), spec) for _, value, spec in columns] for r in results]
    heads = [head for head, _, _ in columns]
    widths = [max(map(len, col)) for col in zip(heads, *cells)]
    for line in (heads, *cells):
        print(" ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))))


def bench_args(doc: str, name: str, cases: str, steps: int | None = None) -> argparse.ArgumentParser:
    """The options every step benchmark shares: cases, (steps, warm-up,) batch x seq, dropout, the JSON's path."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=cases)
    if steps is not None:
        ap.add_argument("--steps", type=int, default=steps)
        ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile cases: at least 3)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--out", default=str(HERE / "results" / f"{name}.json"))
    return ap


def machine(bench: str, a: argparse.Namespace, results: list[dict]) -> None:
    """Write bench/results/<bench>.json with the machine, versions, date and settings next to the results."""
    import torch
    out = {"bench": bench, "date": datetime.date.today().isoformat(), "machine": platform.machine(),
           "processor": platform.processor(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "config": {k: v for k, v in vars(a).items() if k not in ("case", "json")},
           "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


def main() -> None:
    ap = bench_args(__doc__, "step", "peft,peft-compile,lorakit,lorakit-label,lorakit-label-compile", steps=5)
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                    help="also time all cases in one process, a step each in turn (the speed ratios reported)")
    results, a = run_cases(ap, __file__, lambda case, a: time_steps(case, build(case, a.dropout), a))
    if results is None:
        return
    if a.interleave:
        for r, (case, step) in zip(results, interleaved_speed([r["case"] for r in results], a).items()):
            r["interleaved_step_s"], r["interleaved_tokens_per_s"] = step, a.batch * a.seq / step
    speed = "interleaved_tokens_per_s" if a.interleave else "tokens_per_s"
    ref = next((r for r in results if r["case"] == "peft"), results[0])
    print(f"\nSmolLM2-135M fp32, batch {a.batch} x {a.seq}, r=8 on 7 projections, dropout {a.dropout}, AdamW, 2 threads")
    for r in results:
        r["speed_vs_peft"] = r[speed] / ref[speed]
        r["memory_vs_peft"] = r["peak_rss_gb"] / ref["peak_rss_gb"]
    nan = float("nan")
    print_table(results, [("case", lambda r: r["case"], ""), ("alone s", lambda r: r["step_s"], ".2f"),
                          ("tokens/s", lambda r: r["tokens_per_s"], ".1f"), ("GFLOP/s", lambda r: r["gflops"], ".1f"),
                          ("of ceil", lambda r: r["of_ceiling"], ".0%"),
                          ("turns s", lambda r: r.get("interleaved_step_s", nan), ".2f"),
                          ("tokens/s", lambda r: r.get("interleaved_tokens_per_s", nan), ".1f"),
                          ("speed x", lambda r: r["speed_vs_peft"], ".2f"), ("peak GB", lambda r: r["peak_rss_gb"], ".2f"),
                          ("mem x", lambda r: r["memory_vs_peft"], ".2f")])
    print("alone: each case in its own process (its peak RSS; speed at the time it ran, of ceil = GFLOP/s / F.linear "
          "2048^2 then); turns: all cases in one process, a step each in turn (speed x)")
    machine("step", a, results)


if __name__ == "__main__":
    main()
