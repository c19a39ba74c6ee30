"""The evaluation layer: base against adapted on the same examples, and runs against each other.

One run's evaluation (evaluate.py: classifiers in classify.py, generative tasks in generative.py), its metrics
(metrics.py, bertscore.py), its report (report.py: the terminal table, eval.png, report.html), and many runs in child
processes: full vs LoRA vs QLoRA (compare.py) and grids of settings (sweep.py), sharing runs.py.

Imports everything below it (config, engine, data, models, training's held-out loss and checkpoint name, inference);
never export, the web page or the CLI.
"""
from .evaluate import evaluate_run, run_config

__all__ = ["evaluate_run", "run_config"]
