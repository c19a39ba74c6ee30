"""The serving layer: one base model in memory and any number of adapters on it, switched without reloading.

The workbench that holds them (workbench.py: answers streamed per column, classification, run summaries) and the
web page over it (page.py, Gradio: `lorakit serve`).

Imports `lorakit.errors`, `lorakit.config`, the engine, data (prompt and chat templates), models and inference;
never training, evaluation, export or the CLI.
"""
from .workbench import BASE, Answer, Workbench

__all__ = ["BASE", "Answer", "Workbench"]
