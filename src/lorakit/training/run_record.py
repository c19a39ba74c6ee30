"""The record of a training run: run.json (config, versions, parameters, data counts, metrics, timings, peak
memory) and loss.png. report.py shows an evaluation; this shows how the model was trained."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from ..files import write_text_atomic
from .checkpoint import TrainState


def peak_memory() -> dict:
    """This process's peak memory so far: max allocated on a GPU, else peak RSS (loading included)."""
    if torch.cuda.is_available():
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9, "memory_kind": "GPU allocated"}
    import resource
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9, "memory_kind": "RSS"}


def versions() -> dict:
    """The library versions and machine a run used, so a result can be traced to its stack."""
    import accelerate
    import transformers

    from ..version import __version__
    return {"lorakit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version(), "machine": platform.machine()}


def plot_rewards(ax, rewards: list[dict], val_history: list[dict]) -> None:
    """Reward margin and accuracy per step (TRL's rewards/margins, rewards/accuracies), validation's as points."""
    steps = [m["step"] for m in rewards]
    ax.plot(steps, [m["rewards/margins"] for m in rewards], color="#258", lw=1, label="reward margin")
    ax.plot(steps, [m["rewards/accuracies"] for m in rewards], color="#5a5", lw=1, label="reward accuracy")
    val = [v for v in val_history if "rewards/accuracies" in v]
    if val:
        ax.plot([v["step"] for v in val], [v["rewards/accuracies"] for v in val], "o-", color="#d62",
                label="validation reward accuracy")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def metrics(state: TrainState) -> dict:
    """The training metrics of run.json: last train loss, best validation loss and where, the validation curve."""
    return {"final_train_loss": state.train_loss[-1][1] if state.train_loss else None,
            "best_val_loss": state.best_val, "best_step": state.best_step,
            "val_history": state.val_history, "stopped_early": state.stopped_early,
            "train_metrics": state.train_metrics,
            "stopped_by": state.stopped_by or None}


def timings(state: TrainState, total_s: float) -> dict:
    return {"total_s": total_s, "train_s": state.train_seconds, "steps": state.step, "tokens": state.tokens,
            "tokens_per_s": state.tokens / max(state.train_seconds, 1e-9), **peak_memory()}


def write_run_record(out: Path, record: dict, state: TrainState, title: str) -> None:
    """run.json (`record` plus the state's metrics, timings and loss curve) and loss.png, in `out`."""
    record = record | {"metrics": metrics(state), "train_loss": state.train_loss}
    write_text_atomic(out / "run.json", json.dumps(record, indent=2) + "\n")
    plot_losses(state, out / "loss.png", title)


def plot_losses(state: TrainState, path: Path, title: str) -> None:
    """Train loss per step (and a running mean when there are many steps) with the validation points; beside it,
    a preference run's reward accuracy and margin per step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rewards = [m for m in state.train_metrics if "rewards/margins" in m]
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(12 if rewards else 7, 4), squeeze=False)
    ax = axes[0][0]
    if rewards:
        plot_rewards(axes[0][1], rewards, state.val_history)
    if state.train_loss:
        steps, losses = zip(*state.train_loss)
        ax.plot(steps, losses, color="#9ab", lw=1, label="train (per step)")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, color="#258", lw=2, label=f"train (mean of {k})")
    if state.val_history:
        ax.plot([v["step"] for v in state.val_history], [v["loss"] for v in state.val_history], "o-",
                color="#d62", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
