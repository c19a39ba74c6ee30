"""One LoRA training step on SmolLM2-135M (fp32): lorakit against HF peft, in the same run.

Each case runs in its own subprocess so its peak RSS is its own. Prints a table and writes bench/results/step.json.
    python bench/step.py [--steps 5] [--dropout 0.05] [--cases peft,lorakit]
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

HERE = Path(__file__).resolve().parent
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(case: str, dropout: float):
    import torch
    from lorakit import LoRAConfig, add_lora
    from lorakit.models import load_model
    model, _ = load_model("smollm2", "instruct")
    if case == "peft":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=PROJECTIONS,
                                                 task_type="CAUSAL_LM"))
    elif case == "lorakit":
        add_lora(model, LoRAConfig(r=8, alpha=16, dropout=dropout, targets=PROJECTIONS))
    else:
        raise SystemExit(f"unknown case {case!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), sum(p.numel() for p in params)


def run_case(case: str, steps: int, warmup: int, batch: int, seq: int, dropout: float) -> dict:
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, opt, trainable = build(case, dropout)
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    model.train()
    ids = torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(0))
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= warmup:
            times.append(dt)
        print(f"  {case} step {i + 1}/{warmup + steps}: {dt:.2f}s loss {loss.item():.4f}", file=sys.stderr, flush=True)
    step = statistics.median(times)
    tokens = batch * seq
    return {"case": case, "step_s": step, "tokens_per_s": tokens / step,
            "gflops": 4 * base_params * tokens / step / 1e9,  # forward 2N + input-gradient 2N per token
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
            "trainable": trainable, "losses": losses, "step_times": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="peft,lorakit")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--out", default=str(HERE / "results" / "step.json"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:  # child process: one case
        Path(a.json).write_text(json.dumps(run_case(a.case, a.steps, a.warmup, a.batch, a.seq, a.dropout)))
        return
    results = []
    for case in a.cases.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            cmd = [sys.executable, __file__, "--case", case, "--json", f.name, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--batch", str(a.batch), "--seq", str(a.seq), "--dropout", str(a.dropout)]
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            results.append(json.loads(Path(f.name).read_text()))
    ref = next((r for r in results if r["case"] == "peft"), results[0])
    print(f"\nSmolLM2-135M fp32, batch {a.batch} x {a.seq}, r=8 on 7 projections, dropout {a.dropout}, AdamW, 2 threads")
    print(f"{'case':<10} {'step s':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'peak GB':>8} {'speed x':>8} {'mem x':>6}")
    for r in results:
        r["speed_vs_peft"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["memory_vs_peft"] = r["peak_rss_gb"] / ref["peak_rss_gb"]
        print(f"{r['case']:<10} {r['step_s']:>8.2f} {r['tokens_per_s']:>9.1f} {r['gflops']:>8.1f} "
              f"{r['peak_rss_gb']:>8.2f} {r['speed_vs_peft']:>8.2f} {r['memory_vs_peft']:>6.2f}")
    import torch
    out = {"bench": "step", "date": datetime.date.today().isoformat(), "machine": platform.machine(),
           "processor": platform.processor(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "config": vars(a) | {"case": None, "json": None}, "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
