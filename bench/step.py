"""One LoRA training step on SmolLM2-135M (fp32): lorakit against HF peft, in the same run.

Each case runs in its own subprocess so its peak RSS is its own. Prints a table and writes bench/results/step.json.
    python bench/step.py [--steps 5] [--dropout 0.05] [--cases peft,lorakit,lorakit-label,...]
A case is the library (peft or lorakit) and options: -label, lorakit's label-only chunked LM loss (loss.py) instead
of transformers' full-logits loss; -compile, torch.compile of each decoder block (lorakit.kernels.compile_blocks), for
PEFT as for lorakit; its compile happens in the warm-up steps, which are not timed; -dora, DoRA adapters (PEFT's
use_dora, lorakit's dora): compare them at --dropout 0, where both compute the same function (with dropout PEFT
also runs the base matmul on the dropped input); -bf16, the frozen base stored in bf16 (lorakit's `precision: bf16`;
PEFT on a model loaded in bf16, its adapters fp32 as PEFT keeps them); -autocast, the forward under autocast to bf16
over fp32 weights (transformers' Trainer with bf16=True). lorakit's cases on a CPU run lorakit's training kernels
(attention, RMSNorm, SwiGLU, the loss's softmax: models/native.py), as `lorakit train` does; PEFT's transformers'
SDPA and modules, its default. PEFT's autocast step is the noisiest case on 2-core boxes: time its ratio over
--steps 16 (docs/precision.md).
bf16 on a CPU with AVX-512 BF16 or AMX:
    python bench/step.py --cases peft,peft-autocast,peft-bf16,lorakit-label,lorakit-label-bf16 --out \
        bench/results/step-bf16.json
Then (--interleave, the default) all cases again in one process, a step each in turn, for speed ratios that the
machine's drift does not skew.
On a GPU: --device cuda --precision bf16 (autocast to bf16 over fp32 weights, as transformers' Trainer does with
bf16=True), memory as peak CUDA allocation; the case peft-trainer runs PEFT under transformers' Trainer itself (its
own loop, timed by a callback; alone only, it cannot take turns):
    python bench/step.py --device cuda --precision bf16 --cases peft,peft-trainer,lorakit,lorakit-label,\
        lorakit-label-compile --steps 20 --warmup 5 --batch 8 --out bench/results/step-gpu.json
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


def build(case: str, dropout: float, device: str = "cpu"):
    """SmolLM2 with r=8 LoRA on the 7 projections by peft or lorakit (the case's first word), on `device`;
    -compile: compiled; -bf16: the frozen base in bf16 (lorakit's precision bf16, PEFT on a bf16-loaded model)."""
    import torch

    from lorakit import LoRAConfig, add_lora
    from lorakit.models.attention import use_attention_kernel
    from lorakit.models.kernels import compile_blocks, fuse_swiglu
    from lorakit.models.loading import load_model
    from lorakit.models.rms_norm import use_norm_kernel
    from lorakit.engine import store_frozen
    model, _ = load_model("smollm2", "instruct")
    model.to(device)
    tags = case.split("-")
    dora = "dora" in tags
    if case.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        if "bf16" in tags:  # loaded in bf16 as PEFT users do on GPUs; PEFT keeps its adapters in fp32
            model.to(torch.bfloat16)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, use_dora=dora,
                                                 target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    elif case.startswith("lorakit"):
        model = add_lora(model, LoRAConfig(r=8, alpha=16, dropout=dropout, targets=PROJECTIONS, dora=dora))
        fuse_swiglu(model)  # as `lorakit train` does by default
        store_frozen(model, torch.bfloat16 if "bf16" in tags else torch.float32)  # `precision: bf16`
        if device == "cpu" and "compile" not in tags:  # as `lorakit train` does on a CPU
            use_attention_kernel(model)
            use_norm_kernel(model)
    else:
        raise SystemExit(f"unknown case {case!r}")
    if "compile" in case.split("-"):
        compile_blocks(model)
    return model


def device_of(a: argparse.Namespace) -> str:
    """--device: auto is cuda where there is a GPU, else cpu."""
    import torch
    device = getattr(a, "device", "cpu")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def sync(device) -> None:
    """Wait for the device's queued work: a GPU step's time is its kernels', not their launches'."""
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_gpu_gb() -> float | None:
    """Peak CUDA memory allocated since the last reset (None without a GPU)."""
    import torch
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def reset_peak_rss() -> None:
    """Hand freed heap back to the OS and restart the kernel's high-water mark (VmHWM) from the current RSS, and
    the peak CUDA allocation where there is a GPU."""
    import ctypes

    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
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
        from lorakit.training.loss import causal_lm_loss
        return causal_lm_loss
    return lambda model, batch: model(**batch).loss


def one_step(model, opt, loss_fn, batch: dict, precision: str = "fp32") -> tuple[float, float]:
    """One AdamW training step on `batch` (moved to the model's device first, untimed): (seconds, loss). bf16:
    the forward under autocast to bf16 (transformers' Trainer with bf16=True), the weights and optimizer as built."""
    import torch
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t0, loss.item()


def precision_of(case: str, a: argparse.Namespace) -> str:
    """bf16 (autocast) for a case tagged -autocast or under --precision bf16, else fp32."""
    return "bf16" if "autocast" in case.split("-") else getattr(a, "precision", "fp32")


def random_ids(a: argparse.Namespace):
    """The step benches' batch: --batch x --seq random token ids (SmolLM2's vocabulary), the same in every case."""
    import torch
    return torch.randint(0, 49152, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))


def interleaved_speed(cases: list[str], a: argparse.Namespace) -> dict[str, float]:
    """{case: median step seconds} with every case's model in this one process, one step each in turn, round after
    round: the machine's drift (tens of percent over minutes here) reaches all cases alike, so the ratios hold."""
    import torch
    torch.set_num_threads(2)
    torch.manual_seed(0)
    ids = random_ids(a)
    runs = {}
    for case in cases:
        model = build(case, a.dropout, device_of(a)).train()
        runs[case] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4),
                      loss_of(case))
    times = {case: [] for case in cases}
    warmup = max(a.warmup, 3)
    for i in range(warmup + a.steps):
        for case, (model, opt, loss_fn) in runs.items():
            dt, loss = one_step(model, opt, loss_fn, {"input_ids": ids, "labels": ids}, precision_of(case, a))
            if i >= warmup:
                times[case].append(dt)
            print(f"  interleaved round {i + 1}/{warmup + a.steps} {case}: {dt:.2f}s loss {loss:.4f}",
                  file=sys.stderr, flush=True)
    return {case: statistics.median(t) for case, t in times.items()}


def linear_ceiling(device: str = "cpu", precision: str = "fp32") -> float:
    """GFLOP/s of F.linear on square matrices (2048 on a CPU, 8192 on a GPU) in the bench's precision, now: the
    machine's speed at the time a case runs (this box's speed drifts by tens of percent over minutes, so each case
    carries its own yardstick)."""
    import torch
    n = 8192 if torch.device(device).type == "cuda" else 2048
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    x, w = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    torch.nn.functional.linear(x, w)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        torch.nn.functional.linear(x, w)
    sync(device)
    return 10 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9


def matmul_params(config) -> int:
    """Weights that take part in a matmul: the projections of every layer and the LM head (Llama-shaped config)."""
    c = config
    h, kv = c.hidden_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * c.intermediate_size) + c.vocab_size * h


def step_result(case: str, a: argparse.Namespace, model, times: list[float], losses: list[float]) -> dict:
    """A case's row: median step, tokens/s, FLOP rate against the F.linear ceiling now, peak memory."""
    step = statistics.median(times)
    tokens = a.batch * a.seq
    gflops = 4 * matmul_params(model.config) * tokens / step / 1e9  # forward 2N + input-gradient 2N per token
    device = next(model.parameters()).device
    bf16 = {"bf16", "autocast"} & set(case.split("-"))
    ceiling = linear_ceiling(device, "bf16" if bf16 else getattr(a, "precision", "fp32"))
    return {"case": case, "step_s": step, "tokens_per_s": tokens / step, "gflops": gflops,
            "linear_ceiling_gflops": ceiling, "of_ceiling": gflops / ceiling,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,  # loading included
            "step_peak_rss_gb": vm_hwm_gb(),  # since the model was built: the training steps' own peak
            "peak_gpu_gb": peak_gpu_gb() if device.type == "cuda" else None,
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "losses": losses,
            "step_times": times}


def warmup_of(case: str, a: argparse.Namespace) -> int:
    return max(a.warmup, 3) if "compile" in case.split("-") else a.warmup  # compiling, then settling


def time_steps(case: str, model, a: argparse.Namespace) -> dict:
    """Median wall time of AdamW training steps on random tokens (after warm-up), peak memory, FLOP rate."""
    import torch
    loss_fn = loss_of(case)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    reset_peak_rss()
    ids = random_ids(a)
    times, losses = [], []
    warmup = warmup_of(case, a)
    for i in range(warmup + a.steps):
        dt, loss = one_step(model, opt, loss_fn, {"input_ids": ids, "labels": ids}, precision_of(case, a))
        losses.append(loss)
        if i >= warmup:
            times.append(dt)
        print(f"  {case} step {i + 1}/{warmup + a.steps}: {dt:.2f}s loss {loss:.4f}", file=sys.stderr,
              flush=True)
    return step_result(case, a, model, times, losses)


def trainer_steps(case: str, a: argparse.Namespace) -> dict:
    """PEFT under transformers' Trainer (its own loop, AdamW, bf16 autocast with --precision bf16) on the same
    random tokens: each step timed by a callback from its start to the end of its optimizer step."""
    from transformers import Trainer, TrainingArguments, default_data_collator
    device = device_of(a)
    model = build(case, a.dropout, device)
    ids = random_ids(a)
    warmup = warmup_of(case, a)
    data = [{"input_ids": row, "labels": row} for row in ids] * (warmup + a.steps)
    times, losses = [], []
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=a.batch, max_steps=warmup + a.steps,
                                 learning_rate=1e-4, lr_scheduler_type="constant", optim="adamw_torch",
                                 bf16=a.precision == "bf16", use_cpu=device == "cpu", logging_steps=1,
                                 save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
                                 seed=0)
        reset_peak_rss()
        Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                callbacks=[step_timer(times, losses, warmup, device)]).train()
    return step_result(case, a, model, times, losses)


def step_timer(times: list[float], losses: list[float], warmup: int, device: str = "cpu"):
    """A transformers TrainerCallback that appends each step's seconds after `warmup` (from its start to the end of
    its optimizer step) to `times`, and each logged loss to `losses`."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            if state.global_step > warmup:
                times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
    return Timer()


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

    from lorakit.evaluation.runs import cpu_model
    out = {"bench": bench, "date": datetime.date.today().isoformat(), "machine": platform.machine(),
           "processor": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), "config": {k: v for k, v in vars(a).items() if k not in ("case", "json")},
           "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


def run_case(case: str, a: argparse.Namespace) -> dict:
    if "trainer" in case.split("-"):
        return trainer_steps(case, a)
    return time_steps(case, build(case, a.dropout, device_of(a)), a)


def main() -> None:
    ap = bench_args(__doc__, "step", "peft,peft-compile,lorakit,lorakit-label,lorakit-label-compile", steps=5)
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                    help="also time all cases in one process, a step each in turn (the speed ratios reported)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda where there is a GPU)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: every case under autocast to bf16 over fp32 weights (a GPU's mode)")
    results, a = run_cases(ap, __file__, run_case)
    if results is None:
        return
    if a.interleave:  # a Trainer runs its own loop: it cannot take turns, its ratio comes from the alone runs
        turns = [r["case"] for r in results if "trainer" not in r["case"].split("-")]
        steps = interleaved_speed(turns, a)
        for r in results:
            if r["case"] in steps:
                r["interleaved_step_s"] = steps[r["case"]]
                r["interleaved_tokens_per_s"] = a.batch * a.seq / steps[r["case"]]
    ref = next((r for r in results if r["case"] == "peft"), results[0])
    memory = "peak_gpu_gb" if ref.get("peak_gpu_gb") is not None else "peak_rss_gb"
    print(f"\nSmolLM2-135M {a.precision} on {device_of(a)}, batch {a.batch} x {a.seq}, r=8 on 7 projections, "
          f"dropout {a.dropout}, AdamW, 2 threads")
    for r in results:
        speed = "interleaved_tokens_per_s" if "interleaved_tokens_per_s" in r and ref.get(
            "interleaved_tokens_per_s") else "tokens_per_s"
        r["speed_vs_peft"] = r[speed] / ref[speed]
        r["memory_vs_peft"] = r[memory] / ref[memory]
    nan = float("nan")
    print_table(results, [("case", lambda r: r["case"], ""), ("alone s", lambda r: r["step_s"], ".2f"),
                          ("tokens/s", lambda r: r["tokens_per_s"], ".1f"), ("GFLOP/s", lambda r: r["gflops"], ".1f"),
                          ("of ceil", lambda r: r["of_ceiling"], ".0%"),
                          ("turns s", lambda r: r.get("interleaved_step_s", nan), ".2f"),
                          ("tokens/s", lambda r: r.get("interleaved_tokens_per_s", nan), ".1f"),
                          ("speed x", lambda r: r["speed_vs_peft"], ".2f"), ("peak GB", lambda r: r[memory], ".2f"),
                          ("mem x", lambda r: r["memory_vs_peft"], ".2f")])
    print(f"alone: each case in its own process (its peak {'CUDA memory' if memory == 'peak_gpu_gb' else 'RSS'}; "
          "speed at the time it ran, of ceil = GFLOP/s / F.linear then); turns: all cases in one process, a step "
          "each in turn (speed x; a Trainer case's from the alone runs)")
    machine("step", a, results)


if __name__ == "__main__":
    main()
