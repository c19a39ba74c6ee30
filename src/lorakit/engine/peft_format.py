"""Adapters on disk, in the HF PEFT format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r) (DoRA adds
`.lora_magnitude_vector`, (out,)); fully trained
modules (a new classification head) are saved under their own parameter names. PEFT loads what we write and we
load what PEFT writes. Weights are read with safetensors only: never pickle.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import LorakitWarning
from ..files import atomic_file, write_text_atomic
from .config import LoRAConfig, LoRAError
from .embedding import LoRAEmbedding
from .frozen_base import StoredLinear
from .inject import add_lora, set_adapter
from .layer import LoRALinear, is_lora_target_type, linear_features
from .registry import PEFT_PREFIX, active_adapter, adapter_params, adapters, peft_keys
from .targets import closest, name_matches
from .trained_copies import TrainedCopies

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_NAME = "lorakit.json"


def task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class, or None for a custom module."""
    cls = type(model).__name__
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def _config_targets(model: nn.Module, modules: list[str]) -> list[str]:
    """Short names (q_proj, ...) when they select exactly `modules` under PEFT's suffix rule, else full paths."""
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    hit = {n for n, _ in model.named_modules() if n and any(name_matches(n, s) for s in short)}
    return short if hit == set(modules) else list(modules)


def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for `adapter` (default: the active one), keyed in PEFT's format."""
    name = adapter or active_adapter(model)
    if name is None or name not in adapters(model):
        raise LoRAError(f"no adapter {name!r} on this model; add_lora() or load_adapter() first")
    state = {k: p.detach() for k, p in adapter_params(model, name).items()}
    # FSDP-sharded parameters are DTensors: gather each in full (a collective: every rank must call this).
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).to("cpu").contiguous() for k, v in state.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None,
                 adapter: str | None = None, metadata: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter (default: the active one) as a PEFT adapter directory; returns the directory.

    `metadata` (task, label names, model spec, ...) goes to lorakit.json beside the PEFT files; PEFT ignores it.
    `state` is the adapter's tensors when already gathered (from sharded training); by default they are read here.
    """
    name = adapter or active_adapter(model)
    state = state if state is not None else adapter_state_dict(model, name)
    info = adapters(model)[name]
    cfg = info.config
    state, r, alpha = for_the_original_base(model, name, state)
    layers = [model.get_submodule(p) for p in info.modules]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": task_type(model),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _config_targets(model, info.modules),
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "use_rslora": cfg.rslora,
        "modules_to_save": list(info.trainable) or None,
        "bias": "none",
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": cfg.dora,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / WEIGHTS_NAME) as tmp:  # each file whole or not at all: the old one stays on a failure
        save_file(state, tmp, metadata={"format": "pt"})
    write_text_atomic(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    if metadata is not None:
        write_text_atomic(out / METADATA_NAME, json.dumps(metadata, indent=2) + "\n")
    return out


def for_the_original_base(model: nn.Module, name: str, state: dict[str, torch.Tensor]
                          ) -> tuple[dict[str, torch.Tensor], int, float]:
    """(tensors, r, alpha) to save for adapter `name`. An adapter initialised from the base (PiSSA, OLoRA) trained
    on W_res = W - s·B₀·A₀; its update of the original W is s·B·A - s·B₀·A₀ = s·[B, -B₀]·[A; A₀]: a plain LoRA of
    rank 2r (alpha doubled, or times √2 with rsLoRA, so s stays), as PEFT's path_initial_model_for_weight_conversion
    writes it. Anyone can then apply it to the untouched base."""
    info = adapters(model)[name]
    cfg = info.config
    pairs = {path: model.get_submodule(path).initial_pair(name) for path in info.modules}
    if not any(pairs.values()):
        return state, cfg.r, cfg.alpha
    state = dict(state)
    for path, (A0, B0) in pairs.items():
        keys = peft_keys(path, model.get_submodule(path))
        a_key, b_key = keys["lora_A"], keys["lora_B"]
        state[a_key] = torch.cat([state[a_key], A0.to(state[a_key])])
        state[b_key] = torch.cat([state[b_key], -B0.to(state[b_key])], dim=1)
    return state, 2 * cfg.r, cfg.alpha * (2 ** 0.5 if cfg.rslora else 2)


def read_metadata(path: str | os.PathLike) -> dict:
    """lorakit.json of an adapter directory ({} for adapters written by PEFT or without metadata)."""
    f = Path(path) / METADATA_NAME
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{f}: not valid JSON ({e})") from None


def read_adapter_config(path: str | os.PathLike) -> dict:
    """The adapter_config.json of an adapter directory, with errors that say what is wrong."""
    d = Path(path)
    if not (d / CONFIG_NAME).is_file():
        raise LoRAError(f"{d}: not an adapter directory (no {CONFIG_NAME})")
    try:
        cfg = json.loads((d / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{d / CONFIG_NAME}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{d}: peft_type is {cfg.get('peft_type')!r}; lorakit loads LORA adapters only")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"{d}: bias={cfg['bias']!r} is not supported; lorakit adapters train no biases")
    return cfg


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    f = d / WEIGHTS_NAME
    if not f.is_file():
        extra = " (a pickled adapter_model.bin is there: lorakit never loads pickle; re-save it with safetensors)" \
            if (d / "adapter_model.bin").exists() else ""
        raise LoRAError(f"{d}: no {WEIGHTS_NAME}{extra}")
    return read_safetensors(f)


def read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, damaged or truncated file is a LoRAError naming it."""
    if not f.is_file():
        raise LoRAError(f"{f}: no such file; train or save the adapter again")
    try:
        with safe_open(str(f), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"{f}: damaged or truncated safetensors file ({str(e).splitlines()[0][:120]}, "
                        f"{f.stat().st_size:,} bytes); save or train it again") from None


# Short names that stand for a hub id (lorakit's embedded models: "smollm2" -> its hub id); the models layer fills it.
BASE_ALIASES: dict[str, str] = {}


def same_base(a: str, b: str) -> bool:
    """Whether two base_model_name_or_path values name one model: the same string or alias, or the same path."""
    a, b = BASE_ALIASES.get(a, a), BASE_ALIASES.get(b, b)
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def warn_if_other_base(model: nn.Module, cfg: dict, d: Path) -> None:
    """A LorakitWarning when the adapter names another base model than the one it is being loaded onto (shapes
    that do not fit fail later on their own; the same shapes on another model would go unnoticed)."""
    saved = cfg.get("base_model_name_or_path")
    loaded = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not saved or not loaded or same_base(saved, loaded):
        return
    warnings.warn(f"{d}: the adapter was trained on {saved!r} but is being loaded onto {loaded!r}", LorakitWarning,
                  stacklevel=3)


def _pattern_value(path: str, pattern: dict, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key the module path ends with."""
    for key, value in (pattern or {}).items():
        if name_matches(path, key) or path == key:
            return value
    return default


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default",
                 quantize: str | None = None, quant_backend: str = "auto") -> nn.Module:
    """Add the adapter saved at `path` (by lorakit or by PEFT) to `model` under `adapter`, and make it active.
    quantize="nf4" stores the adapted layers' base weights in NF4 first (QLoRA: the base is re-quantised on load)."""
    d = Path(path)
    cfg = read_adapter_config(d)
    warn_if_other_base(model, cfg, d)
    lora, full = split_tensors(_read_tensors(d), d)
    check_base_copies(model, full, d)
    lora = check_fit(model, lora, full, d)
    r, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    config = LoRAConfig(r=r, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0), targets=list(lora),
                        trainable=tuple(sorted({k.rpartition(".")[0] for k in full})),
                        rslora=bool(cfg.get("use_rslora", False)), dora=bool(cfg.get("use_dora", False)),
                        quantize=quantize, quant_backend=quant_backend)
    add_lora(model, config, adapter, targets=list(lora))
    for mpath, pair in lora.items():  # a module of another rank or alpha (PEFT's rank_pattern / alpha_pattern)
        layer = model.get_submodule(mpath)
        r_mod, a_mod = pair["lora_A"].shape[0], float(_pattern_value(mpath, cfg.get("alpha_pattern"), alpha))
        if r_mod != r or a_mod != alpha:
            layer.remove(adapter)
            layer.add(adapter, r_mod, a_mod, config.dropout, config.rslora, config.dora)
    saved = {peft_keys(m, model.get_submodule(m))[part]: t for m, pair in lora.items() for part, t in pair.items()}
    saved |= {f"{PEFT_PREFIX}{k}": t for k, t in full.items()}
    load_adapter_state(model, saved, adapter)
    set_adapter(model, adapter)
    return model


def split_tensors(tensors: dict[str, torch.Tensor], d: Path) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                      dict[str, torch.Tensor]]:
    """A saved adapter's tensors as ({module path: {"lora_A": A, "lora_B": B}}, {parameter path: tensor} of the
    modules trained in full), the PEFT prefix taken off."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for part, suffix in (("lora_A", ".lora_A.weight"), ("lora_B", ".lora_B.weight"),
                             ("lora_A", ".lora_embedding_A"), ("lora_B", ".lora_embedding_B"),
                             ("lora_magnitude", ".lora_magnitude_vector")):
            if k.endswith(suffix):
                lora.setdefault(k[: -len(suffix)], {})[part] = t
                break
        else:
            if "lora_" in k:
                raise LoRAError(f"{d}: tensor {key!r} is of a LoRA kind lorakit does not support")
            full[k] = t
    if not lora:
        raise LoRAError(f"{d}: {WEIGHTS_NAME} holds no lora_A/lora_B tensors")
    return lora, full


def check_base_copies(model: nn.Module, full: dict[str, torch.Tensor], d: Path) -> None:
    """PEFT saves an adapted embedding's own table too (save_embedding_layers, `<path>.base_layer.weight`): taken
    out of `full` when it is this base's table; a different one (a resized or retrained vocabulary) is refused."""
    for k in [k for k in full if k.endswith(".base_layer.weight")]:
        module = model.get_submodule(k[: -len(".base_layer.weight")])
        own = module.weight if isinstance(module, (nn.Embedding, LoRAEmbedding)) else None
        if own is None or own.shape != full[k].shape or not torch.equal(own.detach().cpu(), full[k].to(own.dtype)):
            raise LoRAError(f"{d}: the adapter carries its own {k.rsplit('.', 2)[0]} weights (PEFT's "
                            "save_embedding_layers), which differ from this base's: it was trained with another "
                            "vocabulary; load it onto that model")
        del full[k]


def check_fit(model: nn.Module, lora: dict[str, dict[str, torch.Tensor]], full: dict[str, torch.Tensor],
              d: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A LoRAError naming the first module (in model order) the saved adapter does not fit; `lora` in model order."""
    all_names = [n for n, _ in model.named_modules() if n]
    order = {n: i for i, n in enumerate(all_names)}
    lora = dict(sorted(lora.items(), key=lambda kv: order.get(kv[0], len(order))))
    for mpath, pair in lora.items():
        if mpath not in order:
            raise LoRAError(f"{d}: adapter module {mpath!r} is not in this model; closest: {closest(mpath, all_names)}")
        if not {"lora_A", "lora_B"} <= set(pair):
            raise LoRAError(f"{d}: module {mpath!r} has only {sorted(pair)}")
        layer = model.get_submodule(mpath)
        embedding = isinstance(layer, (nn.Embedding, LoRAEmbedding))
        if not (is_lora_target_type(layer) or isinstance(layer, LoRALinear) or embedding):
            raise LoRAError(f"{d}: module {mpath!r} is a {type(layer).__name__}, not a linear or embedding layer")
        in_f, out_f = (layer.weight.shape if embedding else linear_features(layer))
        A, B = pair["lora_A"], pair["lora_B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1]:
            raise LoRAError(f"{d}: adapter does not fit the model at {mpath!r}: lora_A {tuple(A.shape)}, "
                            f"lora_B {tuple(B.shape)}, but the model's layer is in={in_f}, out={out_f} "
                            f"(lora_A must be (r, {in_f}), lora_B ({out_f}, r))")
    for k, t in full.items():
        module_path, _, pname = k.rpartition(".")
        module = model.get_submodule(module_path) if module_path in order else None
        if isinstance(module, TrainedCopies):  # trained by another adapter already: check against the original
            module = module.original
        if isinstance(module, StoredLinear):
            raise LoRAError(f"{d}: the adapter trains {module_path!r} in full, which this model holds as "
                            f"{module.frozen.kind} codes: load it onto the model in fp32 or bf16 (--dtype)")
        p = dict(module.named_parameters()).get(pname) if module is not None else None
        if p is None:
            raise LoRAError(f"{d}: saved module parameter {k!r} is not in this model; "
                            f"closest: {closest(module_path, all_names)}")
        if p.shape != t.shape:
            raise LoRAError(f"{d}: adapter does not fit the model at {k!r}: {tuple(t.shape)} in the adapter, "
                            f"{tuple(p.shape)} in the model")
    return lora


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], adapter: str | None = None) -> None:
    """Copy tensors keyed as adapter_state_dict() returns them into the model's existing adapter, in place."""
    name = adapter or active_adapter(model)
    params = adapter_params(model, name)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state))[:3], sorted(set(state) - set(params))[:3]
        raise LoRAError(f"adapter state does not match adapter {name!r}: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for key, p in params.items():
            value = state[key].to(p.dtype)
            if hasattr(p, "device_mesh"):  # an FSDP-sharded DTensor: keep only this rank's shard
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
            p.copy_(value)
