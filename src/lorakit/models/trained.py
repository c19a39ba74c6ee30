"""Rebuilding a trained run: the base model with its adapter (or a full fine-tune's model directory), the task's
head and its label names, ready to evaluate, generate or merge.

It joins loading.py (a base model) and the engine's PEFT files; loading.py itself knows nothing of adapters.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..engine.peft_format import BASE_ALIASES, load_adapter, read_adapter_config, read_metadata, same_base
from .loading import EMBEDDED, ModelError, load_model

BASE_ALIASES.update({spec: hub_id for spec, (_, _, hub_id) in EMBEDDED.items()})


def same_model(a: str, b: str) -> bool:
    """Whether two model specs name the same base: the same embedded alias, hub id or resolved directory."""
    return same_base(a, b)


def foreign_base(adapter: Path, *serving: str) -> str | None:
    """The base model `adapter` was trained on (its lorakit.json, else PEFT's base_model_name_or_path) when it is
    none of the `serving` specs; None when it is one of them, or the adapter does not say. Reading its
    adapter_config.json first, it says so in one line where `adapter` is not an adapter."""
    config = read_adapter_config(adapter)
    trained_on = read_metadata(adapter).get("model") or config.get("base_model_name_or_path")
    return trained_on if trained_on and not any(same_model(trained_on, spec) for spec in serving) else None


def adapter_dir(path: str | Path) -> Path:
    """An adapter directory, given it or the run directory that holds it (RUN/adapter)."""
    p = Path(str(path).strip()).expanduser()
    if (p / "adapter").is_dir() and not (p / "adapter_config.json").is_file():
        return p / "adapter"
    return p


def load_trained(path: str | Path, model: str | None = None) -> tuple[nn.Module, object, dict]:
    """A trained result: an adapter directory (see load_adapted) or a full fine-tune's model directory."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return load_adapted(p, model)
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: neither an adapter (adapter_config.json) nor a model directory (config.json)")
    meta = read_metadata(p)
    labels = meta.get("labels")
    model, tokenizer = load_model(str(p), meta.get("task") or "instruct", num_labels=len(labels) if labels else None)
    model.eval()
    return model, tokenizer, meta


def load_adapted(adapter_dir: str | Path, model: str | None = None, adapter: str = "default") -> tuple[nn.Module, object, dict]:
    """Rebuild a trained model from an adapter directory: base model (from lorakit.json or `model`), the task's
    head with the saved label names, and the adapter. Returns (model, tokenizer, metadata)."""
    peft_config = read_adapter_config(adapter_dir)
    meta = read_metadata(adapter_dir)
    spec = model or meta.get("model") or peft_config.get("base_model_name_or_path")
    if not spec:
        raise ModelError(f"{adapter_dir}: the adapter does not say which base model it is for; pass the model")
    task = meta.get("task") or {"SEQ_CLS": "classify", "SEQ_2_SEQ_LM": "summarize"}.get(peft_config.get("task_type"), "instruct")
    labels = meta.get("labels")
    adapted, tokenizer = load_model(spec, task, num_labels=len(labels) if labels else None)
    if labels:
        adapted.config.id2label = dict(enumerate(labels))
        adapted.config.label2id = {name: i for i, name in enumerate(labels)}
    load_adapter(adapted, adapter_dir, adapter, quantize=meta.get("quantize"))  # a QLoRA base is re-quantised
    adapted.eval()
    return adapted, tokenizer, meta
