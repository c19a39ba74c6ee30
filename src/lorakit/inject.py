"""Putting LoRA into a model: choose target modules by name, swap in LoRALinear, freeze the rest, report.

The registry of adapters lives on the root module as `model.lorakit_adapters` ({name: AdapterInfo}), so any
nn.Module works: a HF model, a custom wrapper around one, or a model written from scratch.
"""
from __future__ import annotations

import collections
import contextlib
import difflib
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .errors import LorakitWarning
from .frozen_base import FrozenBase
from .lora import LoRAConfig, LoRAError, LoRALinear, is_lora_target_type, linear_features
from .lora_embedding import LoRAEmbedding
from .trained_copies import TrainedCopies, trained_copies

HEAD_NAMES = ("lm_head", "out_head", "classifier", "score")

# The `attention` and `mlp` target presets: per architecture family, a regex over the qualified module name.
# BERT's attention preset is query/key/value (the projection after attention, attention.output.dense, is in none).
PRESET_PATTERNS = {
    "llama": {"attention": r".*self_attn\.(q|k|v|o)_proj", "mlp": r".*mlp\.(gate|up|down)_proj"},
    "gpt2": {"attention": r".*attn\.(c_attn|c_proj)", "mlp": r".*mlp\.(c_fc|c_proj)"},
    "t5": {"attention": r".*(SelfAttention|EncDecAttention)\.(q|k|v|o)", "mlp": r".*DenseReluDense\.(wi|wi_0|wi_1|wo)"},
    "bert": {"attention": r".*attention\.self\.(query|key|value)",
             "mlp": r".*layer\.\d+\.(intermediate\.dense|output\.dense)"},
}
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama",
            "gemma2": "llama", "olmo2": "llama", "gpt2": "gpt2", "t5": "t5", "mt5": "t5", "bert": "bert",
            "roberta": "bert", "xlm-roberta": "bert"}
REGISTRY = "lorakit_adapters"


@dataclass
class AdapterInfo:
    """What add_lora did for one adapter: its config, the modules it wrapped, the modules it trains in full."""

    config: LoRAConfig
    modules: list[str]
    trainable: list[str]


def name_matches(qualified: str, name: str) -> bool:
    """PEFT's rule: a name matches a module whose qualified name equals it or ends with '.name'."""
    return qualified == name or qualified.endswith("." + name)


def _matches_any(qualified: str, spec: str | tuple[str, ...]) -> bool:
    if isinstance(spec, str):  # a single string is a regex over the whole qualified name
        return re.fullmatch(spec, qualified) is not None
    return any(name_matches(qualified, n) for n in spec)


def vocab_size(model: nn.Module) -> int | None:
    """The vocabulary size from the model's config, or from its input embedding; None if it has neither."""
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    if v:
        return int(v)
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


def output_layer(model: nn.Module) -> nn.Module | None:
    get_output = getattr(model, "get_output_embeddings", None)
    return get_output() if callable(get_output) else None


def _is_head(qualified: str, module: nn.Module, vocab: int | None, output: nn.Module | None) -> bool:
    """A head: named like one, the model's output layer, or (a model that does not say which) vocab-sized."""
    if qualified.split(".")[-1] in HEAD_NAMES or (output is not None and module is output):
        return True
    return output is None and vocab is not None and linear_features(module)[1] == vocab


def _closest(wanted: str, names: list[str]) -> str:
    pool = sorted(set(names) | {n.split(".")[-1] for n in names})
    close = difflib.get_close_matches(wanted.split(".")[-1], pool, n=5, cutoff=0.4)
    return ", ".join(close) if close else ", ".join(pool[:8])


def preset_pattern(model: nn.Module, preset: str) -> str:
    """The regex the `attention` or `mlp` preset means for this model's architecture; an unknown one is an error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise LoRAError(f"targets {preset!r} is defined for model types {', '.join(FAMILIES)}; this model's is "
                        f"{model_type!r}: use all-linear or name the modules (e.g. q_proj,v_proj)")
    return PRESET_PATTERNS[family][preset]


def resolve_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Qualified names of the modules `config` puts LoRA on, in model order; errors name what went wrong."""
    all_names = [n for n, _ in model.named_modules() if n]
    preset = config.targets if config.targets in ("attention", "mlp") else None
    wanted = preset_pattern(model, preset) if preset else config.targets
    trainable = set(resolve_modules(model, config.trainable)) if config.trainable else set()
    vocab, output = vocab_size(model), output_layer(model)
    chosen, inner = [], _inside_lora(model)
    for name, m in model.named_modules():
        if not name or name in inner or name in trainable or any(name.startswith(t + ".") for t in trainable):
            continue
        if config.exclude and _matches_any(name, config.exclude):
            continue
        linear = is_lora_target_type(m) or isinstance(m, LoRALinear)
        if config.targets == "all-linear":
            if linear and not _is_head(name, m, vocab, output):
                chosen.append(name)
        elif _matches_any(name, wanted):
            if not (linear or (preset is None and isinstance(m, (nn.Embedding, LoRAEmbedding)))):
                raise LoRAError(f"target {name!r} is a {type(m).__name__}; LoRA wraps nn.Linear, Conv1D and "
                                "nn.Embedding (an embedding when named)")
            chosen.append(name)
    if isinstance(config.targets, tuple):
        for t in config.targets:
            if not any(name_matches(n, t) for n in chosen):
                raise LoRAError(f"target {t!r} matches no module; closest names: {_closest(t, all_names)}")
    if not chosen:
        hint = _closest(config.targets, all_names) if isinstance(config.targets, str) else ""
        raise LoRAError(f"targets {config.targets!r} select no linear layer" + (f"; closest names: {hint}" if hint else ""))
    return chosen


def _inside_lora(model: nn.Module) -> set[str]:
    """Modules held inside a LoRALinear (a bitsandbytes Linear4bit base) or inside a module trained in full per
    adapter (its original and copies): never targets themselves."""
    wrappers = [*lora_layers(model), *trained_copies(model)]
    return {f"{n}.{c}" for n, wrapper in wrappers for c, _ in wrapper.named_modules() if c}


def resolve_modules(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Qualified names matching each of `names` (exact or '.name' suffix); an unmatched name is an error."""
    all_names = [n for n, _ in model.named_modules() if n]
    found = []
    for want in names:
        hits = [n for n in all_names if name_matches(n, want)]
        if not hits:
            raise LoRAError(f"trainable module {want!r} not found; closest names: {_closest(want, all_names)}")
        found += [h for h in hits if h not in found]
    return found


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


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


def _info(model: nn.Module, name: str) -> AdapterInfo:
    reg = adapters(model)
    if name not in reg:
        raise LoRAError(f"no adapter named {name!r}; this model has: {sorted(reg) or 'none'}")
    return reg[name]


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


def _packed_params(model: nn.Module) -> set[int]:
    """ids of the parameters that hold bitsandbytes' packed 4-bit bytes (not weights to count or copy)."""
    return {id(p) for _, layer in lora_layers(model) if layer.quant_backend == "bitsandbytes"
            for p in layer.frozen.parameters()}


@torch.no_grad()
def _detach_from_checkpoint(model: nn.Module) -> None:
    """Copy the remaining full-precision tensors into memory of their own.

    transformers memory-maps safetensors checkpoints: while one tensor (the embedding, a norm) still views the mapped
    file, every page the quantiser read stays resident, and a QLoRA model would use as much RAM as the fp32 one."""
    packed = _packed_params(model)
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
    vocab, inner, output = vocab_size(model), _inside_lora(model), output_layer(model)
    for name, m in list(model.named_modules()):
        if name in adapted or name in inner or not is_lora_target_type(m) or _is_head(name, m, vocab, output):
            continue
        if any(name == t or name.startswith(t + ".") for t in trainable):
            continue
        layer = LoRALinear(m)
        layer.quantize_(config.quant_backend)
        _set_submodule(model, name, layer)


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
    info = _info(model, name)
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


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the one used in forward and the one trained; everything else is frozen."""
    info = _info(model, name)
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
    return _unmerged_with(model, "disabled", True, False)


def adapters_by_row(model: nn.Module, names: list[str | None]) -> contextlib.AbstractContextManager[nn.Module]:
    """Within the block, row i of every batch uses adapter names[i] (None: the base alone): one batch, and one
    generate() call, serves requests for several adapters. For inference; merged adapters are taken out first."""
    for name in dict.fromkeys(names):
        if name is not None:
            _info(model, name)
    return _unmerged_with(model, "row_adapters", list(names), None)


@contextlib.contextmanager
def _unmerged_with(model: nn.Module, attr: str, value, reset) -> Iterator[nn.Module]:
    """Every LoRA layer with `attr` = value inside the block (reset after), merged adapters taken out meanwhile."""
    layers = [layer for _, layer in lora_layers(model)]
    remerge = [layer for layer in layers if layer.merged is not None]
    for layer in remerge:
        layer.unmerge()
    layers += [wrapper for _, wrapper in trained_copies(model)]
    for layer in layers:
        setattr(layer, attr, value)
    try:
        yield model
    finally:
        for layer in layers:
            setattr(layer, attr, reset)
        for layer in remerge:
            layer.merge()


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer; layers with no adapter left become their original modules."""
    _info(model, name)
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


@dataclass
class ParameterReport:
    """Trainable versus total parameters, with a row per adapted or fully trained module."""

    trainable: int
    total: int
    rows: list[dict] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / {self.total:,} ({100 * self.fraction:.2f}%)"

    def table(self, group: bool = True) -> str:
        """The per-module table; with group=True, modules that differ only in a layer index share one line."""
        rows = self.rows
        if group:
            merged: dict[tuple, dict] = {}
            for row in rows:
                key = (re.sub(r"\.\d+\.", ".*.", row["module"]), row["kind"], row["shape"], row["r"])
                g = merged.setdefault(key, {**row, "module": key[0], "count": 0, "trainable": 0, "total": 0})
                g["count"] += 1
                g["trainable"] += row["trainable"]
                g["total"] += row["total"]
            rows = list(merged.values())
        head = f"{'module':<48} {'n':>4} {'kind':<18} {'shape':>12} {'r':>3} {'trainable':>12} {'total':>13}"
        lines = [head, "-" * len(head)]
        for row in rows:
            lines.append(f"{row['module']:<48} {row.get('count', 1):>4} {row['kind']:<18} {row['shape']:>12} "
                         f"{row['r'] or '':>3} {row['trainable']:>12,} {row['total']:>13,}")
        lines.append("-" * len(head))
        lines.append(str(self))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"trainable": self.trainable, "total": self.total, "fraction": self.fraction, "modules": self.rows}


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count trainable and total parameters (shared weights once) and list what is trained, module by module."""
    packed = _packed_params(model)
    unique = [p for i, p in {id(p): p for p in model.parameters()}.items() if i not in packed]  # 4-bit: counted below
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    nf4 = sum(layer.frozen.numel() for _, layer in lora_layers(model) if layer.quantized)  # 4-bit base weights
    total = sum(p.numel() for p in unique) + nf4
    rows = []
    active = active_adapter(model)
    for path, params in (adapter_params_by_module(model, active) if active else {}).items():
        m = model.get_submodule(path)
        n = sum(p.numel() for p in params.values())
        trained = sum(p.numel() for p in params.values() if p.requires_grad)
        if isinstance(m, TrainedCopies):
            w = getattr(m.copies[active], "weight", None)
            shape = "x".join(str(d) for d in w.shape[::-1]) if isinstance(w, nn.Parameter) else ""  # in x out
            rows.append({"module": path, "kind": f"full({type(m.original).__name__})", "shape": shape, "r": 0,
                         "trainable": trained, "total": n})
            continue
        kind = "Embedding" if isinstance(m, LoRAEmbedding) else "Conv1D" if m.fan_in_fan_out else "Linear"
        rows.append({"module": path, "kind": f"{'DoRA' if active in m.lora_magnitude else 'LoRA'}({kind})",
                     "shape": f"{m.in_features}x{m.out_features}", "r": m.lora_A[active].shape[0],
                     "trainable": trained, "total": n + m.in_features * m.out_features
                     + (m.bias.numel() if m.bias is not None else 0)})
    return ParameterReport(trainable, total, rows)
