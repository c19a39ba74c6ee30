"""Which modules an adapter targets: presets per architecture (all-linear, attention, mlp), module names under PEFT's
suffix rule, or a regex; heads are left out of all-linear. Errors name the closest module names."""
from __future__ import annotations

import difflib
import re

from torch import nn

from .config import LoRAConfig, LoRAError
from .embedding import LoRAEmbedding
from .layer import LoRALinear, is_lora_target_type, linear_features
from .registry import lora_layers
from .trained_copies import trained_copies

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


def is_head(qualified: str, module: nn.Module, vocab: int | None, output: nn.Module | None) -> bool:
    """A head: named like one, the model's output layer, or (a model that does not say which) vocab-sized."""
    if qualified.split(".")[-1] in HEAD_NAMES or (output is not None and module is output):
        return True
    return output is None and vocab is not None and linear_features(module)[1] == vocab


def closest(wanted: str, names: list[str]) -> str:
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
    chosen, inner = [], inside_lora(model)
    for name, m in model.named_modules():
        if not name or name in inner or name in trainable or any(name.startswith(t + ".") for t in trainable):
            continue
        if config.exclude and _matches_any(name, config.exclude):
            continue
        linear = is_lora_target_type(m) or isinstance(m, LoRALinear)
        if config.targets == "all-linear":
            if linear and not is_head(name, m, vocab, output):
                chosen.append(name)
        elif _matches_any(name, wanted):
            if not (linear or (preset is None and isinstance(m, (nn.Embedding, LoRAEmbedding)))):
                raise LoRAError(f"target {name!r} is a {type(m).__name__}; LoRA wraps nn.Linear, Conv1D and "
                                "nn.Embedding (an embedding when named)")
            chosen.append(name)
    if isinstance(config.targets, tuple):
        for t in config.targets:
            if not any(name_matches(n, t) for n in chosen):
                raise LoRAError(f"target {t!r} matches no module; closest names: {closest(t, all_names)}")
    if not chosen:
        hint = closest(config.targets, all_names) if isinstance(config.targets, str) else ""
        raise LoRAError(f"targets {config.targets!r} select no linear layer" + (f"; closest names: {hint}" if hint else ""))
    return chosen


def inside_lora(model: nn.Module) -> set[str]:
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
            raise LoRAError(f"trainable module {want!r} not found; closest names: {closest(want, all_names)}")
        found += [h for h in hits if h not in found]
    return found
