"""Putting LoRA into a model and taking it out: swap each target for a LoRA layer, freeze the rest, switch, disable,
mix by row, delete, merge. Works on any nn.Module (the registry is registry.py's)."""
from __future__ import annotations

import collections
import contextlib
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import LorakitWarning
from .config import LoRAConfig, LoRAError
from .embedding import LoRAEmbedding
from .frozen_base import FrozenBase
from .layer import LoRALinear, is_lora_target_type
from .mixed_rows import Span
from .registry import (REGISTRY, AdapterInfo, active_adapter, adapter_info, adapter_params, adapters, lora_layers,
                       packed_params)
from .targets import inside_lora, is_head, output_layer, resolve_modules, resolve_targets, vocab_size
from .trained_copies import TrainedCopies, trained_copies

def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_lora(model: nn.Module, config: LoRAConfig, adapter: str = "default", targets: list[str] | None = None) -> nn.Module:
    """Wrap each targeted layer with LoRA adapter `adapter`, make it the active one, and freeze all else.

    `targets` (qualified names) overrides config.targets; load_adapter uses it to rebuild a saved adapter exactly.
    """
    reg = adapters(model)
    if adapter in reg:
        raise LoRAError(f"adapter {adapter!r} already exists; pick a new name or delete_adapter() it first")
    names = targets if targets is not None else resolve_targets(model, config)
    trainable = resolve_modules(model, config.trainable) if config.trainable else []
    for name in trainable:
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, TrainedCopies):
            wrapper = TrainedCopies(wrapper)
            _set_submodule(model, name, wrapper)
        wrapper.add(adapter)
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Embedding):
            layer = LoRAEmbedding(layer)
            _set_submodule(model, name, layer)
        elif not isinstance(layer, (LoRALinear, LoRAEmbedding)):
            layer = LoRALinear(layer)
            _set_submodule(model, name, layer)
        if config.quantize == "nf4" and isinstance(layer, LoRALinear) and not layer.quantized:
            layer.quantize_(config.quant_backend)
        layer.add(adapter, config.r, config.alpha, config.dropout, config.rslora, config.dora, config.init)
    if config.quantize and config.quantize_all:
        _quantize_rest(model, config, set(names), trainable)
    if config.quantize:
        _detach_from_checkpoint(model)
    reg[adapter] = AdapterInfo(config, list(names), trainable)
    set_adapter(model, adapter)
    return model


@torch.no_grad()
def _detach_from_checkpoint(model: nn.Module) -> None:
    """Copy the remaining full-precision tensors into memory of their own.

    transformers memory-maps safetensors checkpoints: while one tensor (the embedding, a norm) still views the mapped
    file, every page the quantiser read stays resident, and a QLoRA model would use as much RAM as the fp32 one."""
    packed = packed_params(model)
    for p in model.parameters():
        if id(p) not in packed:
            p.data = p.data.clone()
    for m in model.modules():
        if isinstance(m, FrozenBase):  # NF4 codes are new tensors already
            continue
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = b.clone()


def _quantize_rest(model: nn.Module, config: LoRAConfig, adapted: set[str], trainable: list[str]) -> None:
    """Store every other linear in NF4 as well: an adapter-less LoRALinear, frozen, that only holds the codes."""
    vocab, inner, output = vocab_size(model), inside_lora(model), output_layer(model)
    for name, m in list(model.named_modules()):
        if name in adapted or name in inner or not is_lora_target_type(m) or is_head(name, m, vocab, output):
            continue
        if any(name == t or name.startswith(t + ".") for t in trainable):
            continue
        layer = LoRALinear(m)
        layer.quantize_(config.quant_backend)
        _set_submodule(model, name, layer)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one used in forward and the one trained; everything else is frozen."""
    adapter_info(model, name)  # an unknown name is an error naming the ones there are
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.active = name if name in layer.lora_A else None
        if layer.merged is not None and layer.merged != layer.active:
            layer.unmerge()
    for _, wrapper in trained_copies(model):
        wrapper.active = name if name in wrapper.copies else None
    for p in adapter_params(model, name).values():
        p.requires_grad_(True)
    model.__dict__["lorakit_active"] = name


def disable_adapters(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Within the block the model computes its base output; merged adapters are taken out and put back."""
    return _unmerged_with(model, "disabled", lambda layer: True)


def adapters_by_row(model: nn.Module, names: list[str | None]) -> contextlib.AbstractContextManager[nn.Module]:
    """Within the block, row i of every batch uses adapter names[i] (None: the base alone): one batch, and one
    generate() call, serves requests for several adapters. For inference; merged adapters are taken out first."""
    for name in dict.fromkeys(names):
        if name is not None:
            adapter_info(model, name)
    return _unmerged_with(model, "row_adapters", lambda layer: list(names))


def adapters_by_span(model: nn.Module, spans: list[Span]) -> contextlib.AbstractContextManager[nn.Module]:
    """Within the block, the tokens start:stop of every batch (its rows laid end to end) use adapter name, for each
    (name, start, stop) of `spans` (None: the base alone): prompts packed into one row, each on its own adapter
    (mixed_rows.spans_forward). For inference on LoRA linear layers (`spans_apply`); merged adapters taken out first."""
    if not spans_apply(model):
        raise LoRAError("adapters by span take LoRA linear layers without DoRA, not on the head; this model has "
                        "LoRA embeddings, modules trained in full, a DoRA adapter or an adapted head: mix adapters by "
                        "row (adapters_by_row)")
    for name in dict.fromkeys(name for name, _, _ in spans):
        if name is not None:
            adapter_info(model, name)
    return _unmerged_with(model, "token_spans", lambda layer: tuple(spans))


def spans_apply(model: nn.Module) -> bool:
    """Whether adapters by span compute `model` as its adapters would alone: every adapter layer a LoRA linear
    without DoRA (an embedding's or a trained copy's rows are not split by span), none on the output head (which
    reads one row a prompt, not the packed tokens)."""
    head = output_layer(model)
    return not any(trained_copies(model)) and all(
        isinstance(layer, LoRALinear) and not layer.lora_magnitude and layer is not head
        for _, layer in lora_layers(model))


def adapter_in_use(model: nn.Module, name: str) -> contextlib.AbstractContextManager[nn.Module]:
    """Within the block the model computes with adapter `name` (the base at layers it does not adapt), beside the
    one being trained (a preference run's frozen reference): the active adapter and what requires grad stay as they
    are; merged adapters are taken out meanwhile."""
    adapter_info(model, name)
    return _unmerged_with(model, "active", lambda layer: name if name in (
        layer.copies if isinstance(layer, TrainedCopies) else layer.lora_A) else None)


@contextlib.contextmanager
def _unmerged_with(model: nn.Module, attr: str, value_for: Callable[[nn.Module], object]) -> Iterator[nn.Module]:
    """Every LoRA layer and trained copy with `attr` = value_for(layer) inside the block, put back as it was after;
    merged adapters taken out meanwhile."""
    layers = [layer for _, layer in lora_layers(model)]
    remerge = [layer for layer in layers if layer.merged is not None]
    for layer in remerge:
        layer.unmerge()
    layers += [wrapper for _, wrapper in trained_copies(model)]
    before = [getattr(layer, attr) for layer in layers]
    for layer in layers:
        setattr(layer, attr, value_for(layer))
    try:
        yield model
    finally:
        for layer, value in zip(layers, before):
            setattr(layer, attr, value)
        for layer in remerge:
            layer.merge()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer; layers with no adapter left become their original modules."""
    adapter_info(model, name)
    for lname, layer in list(lora_layers(model)):
        if name in layer.lora_A:
            layer.remove(name)
            if not layer.lora_A:
                _set_submodule(model, lname, layer.unwrap())
    for wname, wrapper in list(trained_copies(model)):
        if name in wrapper.copies:
            wrapper.remove(name)
            if not wrapper.copies:
                _set_submodule(model, wname, wrapper.original)
    del adapters(model)[name]
    if active_adapter(model) == name:
        model.__dict__["lorakit_active"] = None
        for p in model.parameters():
            p.requires_grad_(False)


def tied_weights(model: nn.Module) -> set[int]:
    """ids of the parameters more than one module holds (an input embedding tied to the LM head)."""
    counts = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {i for i, n in counts.items() if n > 1}


def merge(model: nn.Module, requantize: bool = False) -> None:
    """Fold the active adapter into the base weights in place (undo with unmerge). NF4 bases are dequantised
    first and stay in full precision unless requantize=True (which rounds the merged weights). A layer whose
    weight is tied to another module stays unmerged (merging would change the other): the output is the same."""
    tied = tied_weights(model)
    for _, layer in lora_layers(model):
        if layer.weight is None or id(layer.weight) not in tied:
            layer.merge(requantize)


def unmerge(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and put the original layer classes back: a plain model with no LoRA left (a module
    the active adapter trained in full becomes that adapter's copy; others their original)."""
    tied = tied_weights(model)
    for name, layer in list(lora_layers(model)):
        if layer.weight is not None and id(layer.weight) in tied and layer.active is not None:
            warnings.warn(f"{name}: its weight is tied to another module's (an input embedding and the LM head "
                          f"share one); {name} gets a merged copy of its own and the other keeps the original",
                          LorakitWarning, stacklevel=2)
            layer.untie()
        layer.merge()
        _set_submodule(model, name, layer.unwrap())
    for name, wrapper in list(trained_copies(model)):
        _set_submodule(model, name, wrapper.module_for(active_adapter(model)))
    model.__dict__.pop(REGISTRY, None)
    model.__dict__.pop("lorakit_active", None)
    return model
