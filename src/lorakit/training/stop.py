"""Stopping on purpose: SIGINT / SIGTERM finish the step and checkpoint; the one line that says how the run ended
and how to go on, with its exit code."""
from __future__ import annotations

import signal
import threading

from ..errors import TrainingStopped
from .checkpoint import CHECKPOINT, TrainState
from .distributed import all_sum
from .setup import Run


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM while training: the current step finishes, a checkpoint is written, the run stops
    and says how to resume. A second Ctrl-C stops at once. On several processes every rank stops at the same step."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log) -> None:
        self.name, self.log, self.previous = "", log, {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            self.previous = {sig: signal.signal(sig, self.handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame) -> None:
        if self.name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name
        self.log(f"lorakit: {self.name}: finishing this step, then writing a checkpoint (Ctrl-C again: stop now)")

    def asked(self, accelerator) -> str:
        """The signal's name once one came (to any rank), else ''."""
        if accelerator.num_processes == 1:
            return self.name
        return (self.name or "SIGTERM") if all_sum([float(bool(self.name))], accelerator)[0] else ""


def stopped(run: Run, state: TrainState) -> TrainingStopped:
    """The one-line account of a run that stopped early on purpose, with the exit code that goes with it."""
    where = f"checkpoint in {run.out / CHECKPOINT}"
    if state.stopped_by == "loss":
        kept = (f"the adapter of step {state.best_step} (best validation loss)" if state.best_step else
                f"the weights of step {state.step}, the last good one")
        return TrainingStopped(
            f"step {state.step + 1}: the training loss is not finite (nan or inf), so training stopped before "
            f"applying it. Likely causes: a learning rate too high (lr {run.cfg.lr:g}: try 10x lower), fp16 overflow "
            f"(use bf16 or no mixed precision), or broken records. Saved: {kept} in {run.out}, {where}", 1)
    code = 128 + getattr(signal, state.stopped_by, signal.SIGINT)
    return TrainingStopped(f"interrupted ({state.stopped_by}) after step {state.step} of the run; {where}; "
                           "continue with the same command and --resume", code)
