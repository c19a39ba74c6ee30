"""One LoRA training step on SmolLM2-135M (fp32): lorakit against HF peft, in the same run.

Each case runs in its own subprocess so its peak RSS is its own. Prints a table and writes bench/results/step.json.
    python bench/step.py [--steps 5] [--dropout 0.05] [--cases peft,lorakit,lorakit-label]
lorakit-label: lorakit with its label-only chunked LM loss (loss.py) instead of transformers' full-logits loss.
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
    from lorakit import LoRAConfig, add_lora
    from lorakit.models import load_model
    model, _ = load_model("smollm2", "instruct")
    if case.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=PROJECTIONS,
                                                task_type="CAUSAL_LM"))
    if case.startswith("lorakit"):
        return add_lora(model, LoRAConfig(r=8, alpha=16, dropout=dropout, targets=PROJECTIONS))
    raise SystemExit(f"unknown case {case!r}")


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
    if case.endswith("-label"):
        from lorakit.loss import causal_lm_loss
        return causal_lm_loss
    return lambda model, batch: model(**batch).loss


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
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        loss = loss_fn(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= a.warmup:
            times.append(dt)
        print(f"  {case} step {i + 1}/{a.warmup + a.steps}: {dt:.2f}s loss {loss.item():.4f}", file=sys.stderr,
              flush=True)
    step = statistics.median(times)
    tokens = a.batch * a.seq
    return {"case": case, "step_s": step, "tokens_per_s": tokens / step,
            "gflops": 4 * base_params * tokens / step / 1e9,  # matmul FLOPs: forward 2N + input-gradient 2N per token
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


def bench_args(doc: str, name: str, cases: str, steps: int | None = None) -> argparse.ArgumentParser:
    """The options every step benchmark shares: cases, (steps, warm-up,) batch x seq, dropout, the JSON's path."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=cases)
    if steps is not None:
        ap.add_argument("--steps", type=int, default=steps)
        ap.add_argument("--warmup", type=int, default=1)
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
    ap = bench_args(__doc__, "step", "peft,lorakit,lorakit-label", steps=5)
    results, a = run_cases(ap, __file__, lambda case, a: time_steps(case, build(case, a.dropout), a))
    if results is None:
        return
    ref = next((r for r in results if r["case"] == "peft"), results[0])
    print(f"\nSmolLM2-135M fp32, batch {a.batch} x {a.seq}, r=8 on 7 projections, dropout {a.dropout}, AdamW, 2 threads")
    print(f"{'case':<14} {'step s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'peak GB':>8} {'speed x':>8} {'mem x':>6}")
    for r in results:
        r["speed_vs_peft"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["memory_vs_peft"] = r["peak_rss_gb"] / ref["peak_rss_gb"]
        print(f"{r['case']:<14} {r['step_s']:>8.2f} {r['tokens_per_s']:>9.1f} {r['gflops']:>8.1f} "
              f"{r['peak_rss_gb']:>8.2f} {r['speed_vs_peft']:>8.2f} {r['memory_vs_peft']:>6.2f}")
    machine("step", a, results)


if __name__ == "__main__":
    main()
