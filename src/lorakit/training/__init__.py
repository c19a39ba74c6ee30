"""The training layer: one run of supervised training, on one process or many.

The run as named steps and the loop on one screen (loop.py), its set-up (setup.py: launch, model, data, plan), the
optimizer and schedule (optim.py), the label-only loss and the held-out loss (loss.py, validation.py), resumable
checkpoints (checkpoint.py), stopping on a signal or a bad loss (stop.py), DDP / FSDP (distributed.py), and the
run's record (run_record.py: run.json, loss.png).

Imports `lorakit.errors`, `lorakit.files`, `lorakit.config`, the engine, data and models; never inference,
evaluation or anything above.
"""
from .loop import train
from .setup import Run

__all__ = ["train", "Run"]
