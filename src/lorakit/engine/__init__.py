"""The adapter engine: LoRA on any nn.Module, equal to PEFT's numbers, in PEFT's file format both ways.

The layer and its math (layer.py, function.py, dropout.py), its variants beside it as PEFT keeps them (DoRA in
dora.py, the initialisations kaiming / gaussian / PiSSA / OLoRA in init.py, batches mixing adapters by row in
mixed_rows.py), LoRA on embeddings (embedding.py), the frozen base weight dense or NF4 (frozen_base.py, quant.py),
modules trained in full per adapter (trained_copies.py), the frozen base stored in bf16 where the hardware computes it
(precision.py), what the compiled decode step reads of a LoRA layer (step_terms.py); putting adapters into a model
and taking them out
(targets.py, inject.py, registry.py), the parameter report (report.py), the PEFT format (peft_format.py) and adapter
arithmetic (combine.py).

Imports only `lorakit.errors`, `lorakit.files` and the choice lists of `lorakit.config`: the engine knows nothing
of recipes, data, model loading or training, so it works on any model a user builds.
"""
from .combine import combine_adapters
from .config import LoRAConfig, LoRAError
from .embedding import LoRAEmbedding
from .inject import (adapter_in_use, add_lora, adapters_by_row, adapters_by_span, delete_adapter, disable_adapters,
                     merge, merge_and_unload, set_adapter, spans_apply, unmerge)
from .layer import LoRALinear
from .precision import native_bf16, resolve_dtype, store_frozen
from .peft_format import load_adapter, read_adapter_config, read_metadata, save_adapter
from .quant import NF4Weight, dequantize_nf4, quantize_nf4
from .registry import active_adapter, adapters, lora_layers
from .report import ParameterReport, parameter_report
from .trained_copies import TrainedCopies

__all__ = ["combine_adapters", "LoRAConfig", "LoRAError", "LoRAEmbedding", "adapter_in_use", "add_lora", "adapters_by_row",
           "adapters_by_span", "spans_apply", "delete_adapter", "disable_adapters", "merge", "merge_and_unload",
           "set_adapter", "unmerge", "LoRALinear",
           "load_adapter", "read_adapter_config", "read_metadata", "save_adapter", "NF4Weight", "dequantize_nf4",
           "quantize_nf4", "active_adapter", "adapters", "lora_layers", "ParameterReport", "parameter_report",
           "TrainedCopies", "native_bf16", "resolve_dtype", "store_frozen"]
