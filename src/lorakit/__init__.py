"""lorakit: LoRA and QLoRA fine-tuning you can read, measure and ship as a small PEFT-format adapter."""
from .adapters import load_adapter, save_adapter
from .inject import (
    adapters_by_row,
    add_lora,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    parameter_report,
    set_adapter,
    unmerge,
)
from .lora import LoRAConfig, LoRAError, LoRALinear

__version__ = "0.1.0"

__all__ = [
    "LoRAConfig", "LoRAError", "LoRALinear", "add_lora", "adapters_by_row", "set_adapter", "disable_adapters", "delete_adapter",
    "merge", "unmerge", "merge_and_unload", "parameter_report", "save_adapter", "load_adapter",
]
