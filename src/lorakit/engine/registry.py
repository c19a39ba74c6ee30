"""The adapters on a model, and their parameters under PEFT's names.

The registry lives on the root module as `model.lorakit_adapters` ({name: AdapterInfo}), so any nn.Module works: a
HF model, a custom wrapper around one, or a model written from scratch. `adapter_params` is the one map from an
adapter to its parameters keyed as PEFT saves them: save, load, checkpoints, set_adapter and the parameter report all
go through it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

from .config import LoRAConfig, LoRAError
from .embedding import LoRAEmbedding
from .layer import LoRALinear

REGISTRY = "lorakit_adapters"


@dataclass
class AdapterInfo:
    """What add_lora did for one adapter: its config, the modules it wrapped, the modules it trains in full."""

    config: LoRAConfig
    modules: list[str]
    trainable: list[str]


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAEmbedding]]:
    """(qualified name, layer) for every layer holding LoRA adapters: linear and embedding layers alike."""
    for name, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRAEmbedding)):
            yield name, m


def adapters(model: nn.Module) -> dict[str, AdapterInfo]:
    """The adapters on `model` by name (empty if none)."""
    return model.__dict__.setdefault(REGISTRY, {})


def active_adapter(model: nn.Module) -> str | None:
    return model.__dict__.get("lorakit_active")


def adapter_info(model: nn.Module, name: str) -> AdapterInfo:
    reg = adapters(model)
    if name not in reg:
        raise LoRAError(f"no adapter named {name!r}; this model has: {sorted(reg) or 'none'}")
    return reg[name]


def packed_params(model: nn.Module) -> set[int]:
    """ids of the parameters that hold bitsandbytes' packed 4-bit bytes (not weights to count or copy)."""
    return {id(p) for _, layer in lora_layers(model) if layer.quant_backend == "bitsandbytes"
            for p in layer.frozen.parameters()}


PEFT_PREFIX = "base_model.model."  # PEFT's keys: base_model.model.<module path>.lora_A.weight, ...


def peft_keys(path: str, layer: nn.Module) -> dict[str, str]:
    """The PEFT keys of a LoRA layer's tensors: lora_A.weight / lora_B.weight (an embedding's lora_embedding_A /
    lora_embedding_B) and DoRA's lora_magnitude_vector."""
    embedding = isinstance(layer, LoRAEmbedding)
    a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    return {"lora_A": f"{PEFT_PREFIX}{path}.{a}", "lora_B": f"{PEFT_PREFIX}{path}.{b}",
            "lora_magnitude": f"{PEFT_PREFIX}{path}.lora_magnitude_vector"}


def adapter_params(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter `name`'s parameters keyed as PEFT saves them: `<path>.lora_A.weight` (r, in) and `.lora_B.weight`
    (out, r) per adapted module (and DoRA's `<path>.lora_magnitude_vector`, (out,)), `<path>.<param>` for a module
    it trains in full (its own copy), each behind PEFT_PREFIX. Save, load, checkpoints, set_adapter and the
    parameter report all go through this one map."""
    return {key: p for params in adapter_params_by_module(model, name).values() for key, p in params.items()}


def adapter_params_by_module(model: nn.Module, name: str) -> dict[str, dict[str, nn.Parameter]]:
    """`adapter_params`, grouped by the module path they belong to (adapted modules first, in model order)."""
    info = adapter_info(model, name)
    grouped: dict[str, dict[str, nn.Parameter]] = {}
    for path in info.modules:
        layer = model.get_submodule(path)
        keys = peft_keys(path, layer)
        params = grouped[path] = {keys["lora_A"]: layer.lora_A[name], keys["lora_B"]: layer.lora_B[name]}
        if name in layer.lora_magnitude:
            params[keys["lora_magnitude"]] = layer.lora_magnitude[name]
    for path in info.trainable:
        grouped[path] = {f"{PEFT_PREFIX}{path}.{pname}": p
                         for pname, p in model.get_submodule(path).copies[name].named_parameters()}
    return grouped
