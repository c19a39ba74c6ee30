"""lorakit: LoRA and QLoRA fine-tuning you can read, measure and ship as a small PEFT-format adapter.

The public API is this module: everything the README and docs use is importable as `from lorakit import NAME`.
The engine's calls are imported at once (they need only torch); model loading, quantisation helpers, adapter
arithmetic and generation load on first use, so `import lorakit` stays light.

The layers below, each a subpackage, import only layers under them (tests/test_layout.py checks it):
    errors, files, version     foundation
    config                     what a run is: RunConfig, recipes, choice lists, paths
    engine, data               the adapter engine (any nn.Module); the data path read -> split -> encode -> batch
    models                     base models and trained runs
    training, inference        the training loop; generation (decode loop, C++ step)
    evaluation, export, serve  base vs adapted, compare, sweep; GGUF and Ollama; the web page
    cli                        the `lorakit` command
"""
from __future__ import annotations

import importlib

from .engine import (LoRAConfig, LoRAError, LoRALinear, ParameterReport, adapters_by_row, add_lora, delete_adapter,
                     disable_adapters, load_adapter, merge, merge_and_unload, parameter_report, save_adapter,
                     set_adapter, unmerge)
from .errors import DataError, UserError
from .version import __version__

# name -> the module it comes from, imported when the name is first used
_LAZY = {
    "combine_adapters": "lorakit.engine.combine",
    "quantize_nf4": "lorakit.engine.quant", "dequantize_nf4": "lorakit.engine.quant",
    "NF4Weight": "lorakit.engine.quant",
    "load_model": "lorakit.models", "load_adapted": "lorakit.models", "load_trained": "lorakit.models",
    "generate": "lorakit.inference", "stream": "lorakit.inference", "merged": "lorakit.inference",
    "Sampling": "lorakit.inference",
    "load_recipe": "lorakit.config", "RunConfig": "lorakit.config",
    "train": "lorakit.training",
    "evaluate_run": "lorakit.evaluation",
    "export_run": "lorakit.export",
}

__all__ = ["LoRAConfig", "LoRAError", "LoRALinear", "ParameterReport", "add_lora", "adapters_by_row", "set_adapter",
           "disable_adapters", "delete_adapter", "merge", "unmerge", "merge_and_unload", "parameter_report",
           "save_adapter", "load_adapter", "DataError", "UserError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
