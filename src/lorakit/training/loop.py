"""The training loop: a plain loop over accelerate.Accelerator, so `accelerate launch` / `torchrun` run it unchanged.

`train()` is the whole run as named steps: check the launch and the run directory, set up the run (data, model,
LoRA, kernels, wrapping: setup.py), plan the steps, build the optimizer and schedule (optim.py), resume, fit,
finish. `fit()` is the loop on one screen; `train_step()` one optimizer step. Checkpoints are in checkpoint.py,
run.json and loss.png in run_record.py. With method=full the same loop trains every parameter and saves a whole
model directory (model/) instead of an adapter.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..engine import save_adapter
from ..errors import UserError
from ..files import atomic_dir
from ..models.rms_norm import uses_norm_kernel
from .checkpoint import CHECKPOINT, TrainState, load_checkpoint, load_weights_state, save_checkpoint, weights_state
from .distributed import all_sum, rank_share
from .metrics_log import MetricsLog, NoMetricsLog
from .optim import build_optimizer
from .reference import precompute_reference
from .run_record import timings, versions, write_run_record
from .setup import (Plan, Run, check_launch, check_run_dir, log_plan, make_accelerator, plan_steps, precision_note,
                    set_up)
from .stop import StopRequest, stopped
from .trackers import check_installed
from .validation import validate, validate_pairs

SHOWN = {"rewards/accuracies": "acc", "rewards/margins": "margin"}  # on the progress bar, beside the loss


def epoch_order(n: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None,
                group: int = 32) -> list[list[int]]:
    """The micro-batches of one epoch, drawn from (seed, epoch) only, so resuming replays them exactly.

    With `lengths`, each run of `group` batches of the shuffled order is sorted by length before it is cut into
    batches (then the batches are shuffled): rows of a batch have similar lengths and padding mostly disappears.
    """
    g = torch.Generator().manual_seed(seed * 1009 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if not lengths:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    span = batch_size * group
    batches = []
    for i in range(0, n, span):
        chunk = sorted(order[i:i + span], key=lambda j: -lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]


def batch_tokens(batch: dict) -> int:
    """Tokens a batch feeds the model: its attention mask's ones (padding not counted)."""
    m = batch.get("attention_mask")
    return int(m.sum()) if m is not None and m.dim() == 2 else batch["input_ids"].numel()


def save_full_model(model, tokenizer, path: Path, meta: dict, state: dict | None = None) -> None:
    """A whole fine-tuned model as a transformers directory (safetensors) with lorakit.json beside it."""
    if state is not None:
        load_weights_state(model, state, full=True)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "lorakit.json").write_text(json.dumps(meta, indent=2) + "\n")


def start_state(run: Run, optimizer, scheduler, resume: bool) -> tuple[TrainState, dict | None]:
    """A fresh loop state, or the checkpoint's (weights, optimizer, scheduler and RNG restored) with --resume."""
    if run.world > 1:
        torch.manual_seed(run.cfg.seed + run.accelerator.process_index)  # ranks draw different dropout masks
    if not resume:
        return TrainState(), None
    if not (run.out / CHECKPOINT).is_dir():
        raise UserError(f"--resume: no checkpoint in {run.out / CHECKPOINT}; train without --resume first")
    state, best_state = load_checkpoint(run.out, run.model, optimizer, scheduler, run.accelerator, run.fsdp,
                                        run.full)
    state.stopped_by = ""  # what stopped it last time (a signal, a non-finite loss) is over
    run.log(f"lorakit: resumed at step {state.step} (epoch {state.epoch}, batch {state.micro})")
    return state, best_state


def train_step(run: Run, optimizer, scheduler, group: list[list[int]]) -> tuple[float, int, float | None, dict]:
    """One optimizer step over the micro-batches of `group` (gradient accumulation); returns the step's mean loss,
    its tokens summed over all processes, the gradient norm before clipping, and the objective's own metrics (a
    preference loss's rewards and log-probabilities), averaged. A non-finite loss is returned without stepping."""
    loss_sum, tokens, sums = 0.0, 0, {}
    for rows in group:
        rows = rank_share(rows, run.accelerator.process_index, run.world) if run.world > 1 else rows
        batch = {k: v.to(run.accelerator.device) for k, v in run.data.collate([run.data.train[i] for i in rows]).items()}
        with run.accelerator.autocast():
            loss, metrics = run.objective(run.wrapped, batch)
            loss = loss / len(group)
        run.accelerator.backward(loss)
        loss_sum += loss.item()
        tokens += batch_tokens(batch)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v / len(group)
    loss_sum, tokens, *values = all_sum([loss_sum / run.world, tokens, *(v / run.world for v in sums.values())],
                                        run.accelerator)
    grad_norm = None
    if math.isfinite(loss_sum):  # a non-finite loss is never applied: the weights stay those of the last good step
        # the norm before clipping (clipping to infinity only measures it), as transformers logs grad_norm
        grad_norm = float(run.accelerator.clip_grad_norm_(run.trained, run.cfg.max_grad_norm or float("inf")))
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, int(tokens), grad_norm, dict(zip(sums, values))


def validate_and_keep_best(run: Run, state: TrainState, best_state: dict | None) -> dict | None:
    """Validate, record it, and return the weights of the best validation loss so far; sets stopped_early when
    `early_stopping` evaluations in a row brought no improvement."""
    with torch.compiler.set_stance("force_eager"):  # eval-mode shapes: not worth another compile
        if run.cfg.task == "preference":
            val = validate_pairs(run.wrapped, run.data.val, run.data.collate, run.cfg.batch_size,
                                 run.accelerator.device, run.accelerator.autocast, run.objective)
        else:
            val = validate(run.wrapped, run.data.val, run.data.collate, run.cfg.batch_size, run.accelerator.device,
                           run.accelerator.autocast, run.accelerator)
    state.val_history.append({"step": state.step, **val})
    run.log(f"step {state.step}: val loss {val['loss']:.4f}"
            + (f", val accuracy {val['accuracy']:.4f}" if "accuracy" in val else "")
            + (f", val reward accuracy {val['rewards/accuracies']:.4f}" if "rewards/accuracies" in val else ""))
    if state.best_val is None or val["loss"] < state.best_val:
        state.best_val, state.best_step, state.bad_evals = val["loss"], state.step, 0
        # a copy: on CPU the state dict's tensors are the live parameters themselves
        return {k: v.clone() for k, v in weights_state(run.model, run.full).items()}
    state.bad_evals += 1
    if run.cfg.early_stopping and state.bad_evals >= run.cfg.early_stopping:
        state.stopped_early = True
        run.log(f"early stop at step {state.step}: no val improvement in {state.bad_evals} evaluations")
    return best_state


def step_record(state: TrainState, plan: Plan, loss: float, lr: float, grad_norm: float | None,
                validated: bool) -> dict:
    """metrics.jsonl's record of the step just taken (transformers' log_history names)."""
    record = {"step": state.step, "epoch": round(state.epoch + state.micro / plan.micro_per_epoch, 4), "loss": loss,
              "learning_rate": lr, "grad_norm": grad_norm,
              "tokens_per_second": state.tokens / max(state.train_seconds, 1e-9)}
    if validated:
        record |= {f"eval_{k}": v for k, v in state.val_history[-1].items() if k != "step"}
    return record


def fit(run: Run, plan: Plan, optimizer, scheduler, state: TrainState, best_state: dict | None,
        stop: StopRequest, metrics: MetricsLog | NoMetricsLog) -> dict | None:
    """The loop: epochs of length-grouped micro-batches drawn from (seed, epoch), an optimizer step per
    `grad_accum` of them, validation and checkpoints on their schedules, each step logged to `metrics`, until the
    last step, early stopping, a non-finite loss or a stop request. Returns the best validation weights."""
    cfg = run.cfg
    bar = tqdm(total=plan.total, initial=state.step, desc=f"train {cfg.name}", disable=not run.main,
               dynamic_ncols=True, mininterval=1.0)
    run.wrapped.train()
    loop_started = time.perf_counter() - state.train_seconds
    while state.step < plan.total and not state.stopped_early:
        order = epoch_order(len(run.data.train), plan.global_batch, cfg.seed, state.epoch,
                            run.data.lengths if cfg.group_by_length else None)[:plan.micro_per_epoch]
        while state.micro < len(order) and state.step < plan.total:
            group = order[state.micro:state.micro + cfg.grad_accum]
            lr = scheduler.get_last_lr()[0]  # the rate this step applies
            loss, tokens, grad_norm, step_metrics = train_step(run, optimizer, scheduler, group)
            if not math.isfinite(loss):
                state.stopped_by = "loss"
                run.log(f"lorakit: step {state.step + 1}: the loss is {loss}; stopped before applying it")
                break
            state.micro, state.step, state.tokens = state.micro + len(group), state.step + 1, state.tokens + tokens
            state.train_loss.append([state.step, loss])
            state.train_seconds = time.perf_counter() - loop_started
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}",
                            **{SHOWN[k]: f"{v:.3f}" for k, v in step_metrics.items() if k in SHOWN})
            if step_metrics:
                state.train_metrics.append({"step": state.step, **step_metrics})
            validated = run.data.val and (state.step % plan.eval_every == 0 or state.step == plan.total)
            if validated:
                best_state = validate_and_keep_best(run, state, best_state)
            metrics.log(step_record(state, plan, loss, lr, grad_norm, validated) | step_metrics)
            if state.stopped_early:
                break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                save_checkpoint(run.out, run.model, optimizer, scheduler, state, best_state, run.accelerator,
                                run.fsdp, run.full)
            if (signal_name := stop.asked(run.accelerator)):
                state.stopped_by = signal_name
                break
        if state.stopped_by:
            break
        if state.micro >= len(order):
            state.epoch, state.micro = state.epoch + 1, 0
    bar.close()
    return best_state


def finish(run: Run, optimizer, scheduler, state: TrainState, best_state: dict | None) -> None:
    """The last checkpoint; the adapter (or model/) of the best validation step; run.json and loss.png."""
    cfg, what = run.cfg, "model" if run.full else "adapter"
    if cfg.checkpoint_every or state.stopped_by:
        save_checkpoint(run.out, run.model, optimizer, scheduler, state, best_state, run.accelerator, run.fsdp,
                        run.full)
    if state.stopped_by and state.stopped_by != "loss":
        run.accelerator.wait_for_everyone()
        return  # interrupted: the checkpoint is the result; --resume finishes the run
    keep_best = best_state is not None and state.best_step != state.step
    result = best_state if keep_best else weights_state(run.model, run.full)  # collective under FSDP
    if run.main:
        if keep_best:
            run.log(f"lorakit: keeping the {what} of step {state.best_step} (best val loss {state.best_val:.4f})")
        meta = {"task": cfg.task, "model": cfg.model, "labels": run.splits.labels, "template": cfg.template,
                "max_length": cfg.max_length, "run": cfg.name, "quantize": cfg.quantize or None, "method": cfg.method}
        if run.full:
            save_full_model(run.model, run.tokenizer, run.out / "model", meta, result if keep_best else None)
        else:
            save_adapter(run.model, run.out / "adapter", metadata=meta, state=result)
        record = {"config": cfg.to_dict(), "versions": versions(), "parameters": run.report.to_dict(),
                  "data": run.splits.stats | {"train_rows": len(run.data.train), "val_rows": len(run.data.val),
                                              "test_rows": len(run.splits.test), "notes": run.data.notes},
                  "distributed": {"processes": run.world, "strategy": run.strategy if run.world > 1 else "none",
                                  "global_batch": cfg.batch_size * run.world * cfg.grad_accum},
                  "precision": precision_note(cfg),
                  "attention": getattr(run.model.config, "_attn_implementation", None),
                  "rms_norm": "lorakit" if uses_norm_kernel(run.model) else "transformers",
                  "timings": timings(state, time.perf_counter() - run.started),
                  "logs": {"metrics": "metrics.jsonl", "report_to": cfg.report_to}}
        method = "full fine-tune" if run.full else f"{'QLoRA' if cfg.quantize else 'LoRA'} r={cfg.r}"
        if cfg.task == "preference":
            method += f", {cfg.loss} beta={cfg.beta:g}"
        write_run_record(run.out, record, state, f"{cfg.name}: {cfg.model} + {method}")
        run.log(f"lorakit: {what} -> {run.out / what}; run.json and loss.png in {run.out}")
    run.accelerator.wait_for_everyone()


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Train `cfg`'s adapter (or, with method=full, the whole model); returns the run directory (adapter/ or
    model/, run.json, loss.png).

    Under `accelerate launch` / `torchrun` every process runs this: `batch_size` is per device, each global
    micro-batch (batch_size x processes) is split between the ranks, and only rank 0 logs and writes.
    """
    accelerator = make_accelerator(cfg)
    strategy = check_launch(cfg, accelerator.num_processes)
    check_run_dir(cfg.out_dir, resume, overwrite)
    check_installed(cfg.report_to)
    run = set_up(cfg, accelerator, strategy)
    if cfg.task == "preference" and cfg.precompute_reference:
        precompute_reference(run)
    plan = plan_steps(run)
    optimizer, scheduler = build_optimizer(run, plan)
    state, best_state = start_state(run, optimizer, scheduler, resume)
    log_plan(run, plan)
    metrics = (MetricsLog(run.out, cfg.report_to, cfg.to_dict(), state.step if resume else None) if run.main
               else NoMetricsLog())
    status = "KILLED"  # what the trackers record if the loop does not come back
    try:
        with StopRequest(run.log) as stop:
            best_state = fit(run, plan, optimizer, scheduler, state, best_state, stop, metrics)
        status = "KILLED" if state.stopped_by else "FINISHED"
    finally:
        metrics.close(status)
    finish(run, optimizer, scheduler, state, best_state)
    # under torchrun: gloo's threads stopped before exit (left to the interpreter's exit, they can abort the process)
    accelerator.state.destroy_process_group()
    if state.stopped_by:
        raise stopped(run, state)
    return run.out
