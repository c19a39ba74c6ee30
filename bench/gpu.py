"""GPU figures in one command: training, QLoRA and generation on one NVIDIA GPU, against PEFT + Trainer and
transformers' generate, written as JSON to a folder (each part its own file, so a second call can repeat one part).

    python bench/gpu.py --out bench/results/gpu            # on a GPU machine; under 8 minutes on one H100
    python bench/gpu.py --smoke --out /tmp/gpu-smoke       # every part at toy sizes on the CPU (the test suite runs it)

No internet on the GPU machine: the models are built from configs (a Llama-architecture config of ~1.1B parameters,
random weights, for speed and memory) or read from lorakit's local cache (SmolLM2-135M, for generation).
Parts:
  steps     LoRA training steps in bf16 (autocast over fp32 weights, as Trainer's bf16=True), batch 8 x 1024 on the
            1.1B config, r=16 on the 7 projections: peft, peft-trainer (PEFT under transformers' Trainer), lorakit,
            lorakit-label (the label-only loss), lorakit-label-compile (each block compiled); tokens/s and peak CUDA
            memory each; a torch.profiler table of one lorakit-label step
  qlora     QLoRA (bitsandbytes Linear4bit NF4 base, paged 8-bit AdamW, gradient checkpointing): a few steps on one
            batch (the loss falls), peak memory against bf16 LoRA, merge_and_unload from NF4 (outputs kept)
  generate  greedy decoding, tokens/s at batch 1 and 32: lorakit's decode loop against transformers' generate, and
            how many rows' tokens agree
  tests     the suite's CUDA-only tests (pytest -m cuda)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from step import loss_of, one_step, step_timer, sync  # noqa: E402
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEP_CASES = ("peft", "peft-trainer", "lorakit", "lorakit-label", "lorakit-label-compile")


def sizes(a: argparse.Namespace) -> dict:
    """The model config and the work per part: the real sizes, or toy ones for --smoke."""
    if a.smoke:
        return {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv": 2, "vocab": 512, "batch": 2,
                "seq": 32, "steps": 2, "warmup": 1, "qlora_steps": 3, "gen_batch": (1, 4), "new_tokens": 8}
    return {"hidden": 2048, "layers": 22, "intermediate": 5632, "heads": 32, "kv": 4, "vocab": 32000, "batch": 8,
            "seq": 1024, "steps": 10, "warmup": 3, "qlora_steps": 10, "gen_batch": (1, 32), "new_tokens": 128}


def device_of(a: argparse.Namespace) -> str:
    import torch
    return "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"


def reset_peak(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None


def llama(s: dict, device: str, dtype=None):
    """A random-weight Llama of the part's size (seeded), on `device`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                         max_position_embeddings=max(2048, s["seq"]), tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype or torch.float32)


def with_lora(model, case: str):
    """The model with r=16 LoRA on the 7 projections by PEFT or lorakit (lorakit as `lorakit train` sets it up)."""
    from lorakit import LoRAConfig, add_lora
    from lorakit.models.kernels import compile_blocks, fuse_swiglu
    if case.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS, task_type="CAUSAL_LM"))
    add_lora(model, LoRAConfig(r=16, alpha=32, targets=PROJECTIONS))
    fuse_swiglu(model)
    if "compile" in case:
        compile_blocks(model)
    return model


def batch_of(s: dict, device: str):
    import torch
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(0))
    return ids.to(device)


def loop_steps(case: str, s: dict, device: str) -> dict:
    """AdamW steps in bf16 autocast (fp32 on the CPU in --smoke), timed after warm-up (bench/step.py's one_step)."""
    import torch
    model = with_lora(llama(s, device), case).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn, ids = loss_of(case), batch_of(s, device)
    reset_peak(device)
    steps = [one_step(model, opt, loss_fn, {"input_ids": ids, "labels": ids}, "bf16" if device == "cuda" else "fp32")
             for _ in range(s["warmup"] + s["steps"])]
    times, losses = [seconds for seconds, _ in steps[s["warmup"]:]], [loss for _, loss in steps]
    return {"case": case, "step_s": statistics.median(times), "tokens_per_s": s["batch"] * s["seq"] / statistics.median(times),
            "peak_gb": peak_gb(device), "losses": losses}


def trainer_steps(s: dict, device: str) -> dict:
    """PEFT under transformers' Trainer (its loop, bf16=True on the GPU), each step timed by a callback."""
    from transformers import Trainer, TrainingArguments, default_data_collator
    model = with_lora(llama(s, device), "peft")
    ids = batch_of(s, "cpu")
    data = [{"input_ids": row, "labels": row} for row in ids] * (s["warmup"] + s["steps"])
    times, losses = [], []
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(out, per_device_train_batch_size=s["batch"], max_steps=s["warmup"] + s["steps"],
                                 learning_rate=1e-4, lr_scheduler_type="constant", optim="adamw_torch",
                                 bf16=device == "cuda", use_cpu=device == "cpu", logging_steps=1, save_strategy="no",
                                 report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0)
        reset_peak(device)
        Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                callbacks=[step_timer(times, losses, s["warmup"], device)]).train()
    step = statistics.median(times)
    return {"case": "peft-trainer", "step_s": step, "tokens_per_s": s["batch"] * s["seq"] / step,
            "peak_gb": peak_gb(device), "losses": losses}


def profile_step(s: dict, device: str) -> str:
    """A torch.profiler table of one lorakit-label step (where the time goes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from lorakit.training.loss import causal_lm_loss
    model = with_lora(llama(s, device), "lorakit-label").train()
    ids = batch_of(s, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    for _ in range(2):  # warm-up, then the profiled step
        with profile(activities=activities) as prof:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
            loss.backward()
            sync(device)
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25)


def part_steps(a: argparse.Namespace) -> dict:
    s, device = sizes(a), device_of(a)
    rows = []
    for case in STEP_CASES:
        if "compile" in case and device == "cpu" and a.smoke:
            rows.append({"case": case, "skipped": "compile is timed on the GPU only"})
            continue
        rows.append(trainer_steps(s, device) if case == "peft-trainer" else loop_steps(case, s, device))
        print(f"steps {case}: {rows[-1].get('tokens_per_s', 0):.0f} tokens/s, peak {rows[-1].get('peak_gb')} GB",
              flush=True)
    ran = [r for r in rows if "tokens_per_s" in r]
    reference = next(r for r in ran if r["case"] == "peft-trainer")
    best = max((r for r in ran if r["case"].startswith("lorakit")), key=lambda r: r["tokens_per_s"])
    summary = {"best": best["case"], "speed_vs_peft_trainer": best["tokens_per_s"] / reference["tokens_per_s"],
               "memory_vs_peft_trainer": (best["peak_gb"] / reference["peak_gb"]) if reference["peak_gb"] else None,
               "targets": {"speed": 1.3, "memory": 0.7}}
    met = summary["speed_vs_peft_trainer"] >= 1.3 and (summary["memory_vs_peft_trainer"] or 0) <= 0.7
    return {"rows": rows, "summary": summary, "profile": None if met else profile_step(s, device)}


def part_qlora(a: argparse.Namespace) -> dict:
    """QLoRA against bf16 LoRA on the same batch: loss falls, peak memory, merge from NF4."""
    import torch
    from lorakit import LoRAConfig, add_lora, merge_and_unload
    from lorakit.training.loss import causal_lm_loss
    s, device = sizes(a), device_of(a)
    backend = "bitsandbytes" if device == "cuda" else "torch"
    ids = batch_of(s, device)
    rows = {}
    for kind in ("lora-bf16", "qlora"):
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = llama(s, device, dtype)
        quant = {"quantize": "nf4", "quant_backend": backend} if kind == "qlora" else {}
        add_lora(model, LoRAConfig(r=16, alpha=32, targets=PROJECTIONS, **quant))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        params = [p for p in model.parameters() if p.requires_grad]
        if kind == "qlora" and device == "cuda":
            import bitsandbytes as bnb
            opt = bnb.optim.PagedAdamW8bit(params, lr=2e-3)
        else:
            opt = torch.optim.AdamW(params, lr=2e-3)
        model.train()
        reset_peak(device)
        losses, t0 = [], time.perf_counter()
        for _ in range(s["qlora_steps"]):
            loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        sync(device)
        rows[kind] = {"losses": losses, "loss_fell": losses[-1] < losses[0], "peak_gb": peak_gb(device),
                      "seconds": time.perf_counter() - t0, "optimizer": type(opt).__name__, "backend": backend}
        if kind == "qlora":
            model.eval()
            with torch.no_grad():
                before = model(input_ids=ids[:1, :64]).logits.float()
                merged = merge_and_unload(model)
                after = merged(input_ids=ids[:1, :64]).logits.float()
            rows[kind]["merge_max_abs_diff"] = (before - after).abs().max().item()
        del model, opt
    lora, qlora = rows["lora-bf16"]["peak_gb"], rows["qlora"]["peak_gb"]
    return rows | {"qlora_memory_vs_bf16_lora": (qlora / lora) if lora else None}


def part_generate(a: argparse.Namespace) -> dict:
    """Greedy tokens/s: lorakit's decode loop against transformers' generate, at batch 1 and 32 (SmolLM2-135M from
    the local cache where it is there; else the part's random Llama)."""
    from lorakit.inference import Sampling, generate
    s, device = sizes(a), device_of(a)
    try:
        from lorakit import load_model
        if a.smoke:
            raise OSError("smoke: the toy model")
        model, tok = load_model("smollm2", "instruct")
        model.to(device)
        source = "smollm2 (cache)"
    except Exception as error:  # noqa: BLE001 - no cache on this machine: a random model of the part's size
        from transformers import PreTrainedTokenizerFast
        sys.path.insert(0, str(HERE.parent / "tests"))
        from conftest import word_tokenizer
        model, tok, source = llama(s | {"vocab": 128}, device), word_tokenizer(), f"random llama ({error})"
        assert isinstance(tok, PreTrainedTokenizerFast)
    model.eval()
    prompts = [" ".join(f"w{(7 * i + j) % 100 + 5}" for j in range(16 + i % 8)) for i in range(max(s["gen_batch"]))]
    sampling = Sampling(max_new_tokens=s["new_tokens"])
    rows = []
    for batch in s["gen_batch"]:
        chunk = prompts[:batch]
        out = {}
        for engine in ("auto", "transformers"):
            generate(model, tok, chunk[:1], Sampling(max_new_tokens=2), "alpaca", engine=engine)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            texts = generate(model, tok, chunk, sampling, "alpaca", batch_size=batch, engine=engine)
            sync(device)
            seconds = time.perf_counter() - t0
            tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
            out[engine] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "texts": texts}
        rows.append({"batch": batch, "lorakit_tokens_per_s": out["auto"]["tokens_per_s"],
                     "transformers_tokens_per_s": out["transformers"]["tokens_per_s"],
                     "speed": out["auto"]["tokens_per_s"] / out["transformers"]["tokens_per_s"],
                     "same_text": sum(x == y for x, y in zip(out["auto"]["texts"], out["transformers"]["texts"])),
                     "rows": batch})
    return {"model": source, "device": device, "rows": rows}


def part_tests(a: argparse.Namespace) -> dict:
    """The suite's CUDA-only tests (marker `cuda`); in --smoke only collected, not run."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(HERE.parent / "tests")]
    if a.smoke:
        command.append("--collect-only")
    proc = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
    return {"returncode": proc.returncode, "summary": tail[0], "collected_only": a.smoke}


PARTS = {"steps": part_steps, "qlora": part_qlora, "generate": part_generate, "tests": part_tests}


def environment() -> dict:
    import torch
    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda, "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the JSON files (one per part, and summary.json)")
    ap.add_argument("--smoke", action="store_true", help="every part at toy sizes on the CPU")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    a = ap.parse_args(argv)
    import torch
    torch.manual_seed(0)
    if not a.smoke and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; use --smoke for the CPU check", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"environment": environment(), "smoke": a.smoke, "parts": {}}
    for name in a.parts.split(","):
        t0 = time.perf_counter()
        try:
            result = PARTS[name](a)
        except Exception as error:  # noqa: BLE001 - one part's failure is recorded; the others still run
            result = {"error": f"{type(error).__name__}: {error}"}
        result["seconds"] = time.perf_counter() - t0
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        summary["parts"][name] = {"seconds": result["seconds"], "error": result.get("error")}
        print(f"{name}: {result['seconds']:.0f} s{' ERROR ' + result['error'] if 'error' in result else ''}", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if any(p["error"] for p in summary["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
