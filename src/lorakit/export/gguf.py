"""GGUF files for llama.cpp, written with the `gguf` package in pure Python (no llama.cpp build): the merged model
with its tokenizer and chat template (f32, f16, q8_0 or q4_0), or an adapter alone in llama.cpp's LoRA format.

Llama-family decoders (Llama, SmolLM2, Mistral; Qwen2) are supported. llama.cpp's Llama conversion reorders the
rows of q_proj and k_proj (its rotary embedding pairs neighbouring dimensions, transformers' pairs the two halves of
each head), so those weights, and a LoRA's B for them, are permuted the same way here.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config.choices import EXPORT_QUANTS
from ..engine.peft_format import CONFIG_NAME, WEIGHTS_NAME, read_safetensors
from ..engine.registry import PEFT_PREFIX
from ..errors import LorakitWarning, UserError

ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}  # model_type: (arch, permute)
# llama.cpp's pre-tokenizer names for the byte-level BPE splitting rules of tokenizer.json
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace("\\p{N}{1,3}", "\\p{N}")


class ExportError(UserError):
    """A run or option that cannot be exported; the message says why and what is supported."""


def _gguf():
    import gguf
    return gguf


def architecture(config) -> tuple[str, bool]:
    """(llama.cpp architecture, whether q/k rows are permuted) for a transformers config, or an ExportError."""
    arch = ARCHS.get(getattr(config, "model_type", None))
    if arch is None:
        raise ExportError(f"GGUF export supports {', '.join(sorted(ARCHS))} models (Llama, SmolLM2, Mistral, Qwen2); "
                          f"this is {getattr(config, 'model_type', type(config).__name__)!r}")
    rope = getattr(config, "rope_scaling", None) or (getattr(config, "rope_parameters", None) or {})
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise ExportError(f"rope scaling {kind!r} is not written by lorakit's GGUF export yet; plain RoPE only")
    return arch


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for q_proj/k_proj (convert_hf_to_gguf's LlamaModel.permute): within each head, the
    rows of the first and second half interleaved."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def llama_cpp_rows(hf_name: str, tensor: torch.Tensor, config, permute: bool) -> torch.Tensor:
    """`tensor` (the weight `hf_name`, or a LoRA B for it) in llama.cpp's row order: q/k permuted by their head
    counts where the architecture is converted that way, anything else as it is."""
    if permute and hf_name.endswith("q_proj.weight"):
        return permute_rows(tensor, config.num_attention_heads)
    if permute and hf_name.endswith("k_proj.weight"):
        return permute_rows(tensor, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    return tensor


def _hparams(writer, config) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's splitting rule; 'default' (with a warning) for one it does not know."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = parts[0].get("pattern", {}).get("Regex")
        if regex in (LLAMA3_SPLIT, QWEN2_SPLIT):
            return "llama-bpe" if regex == LLAMA3_SPLIT else "qwen2"
    warnings.warn("the tokenizer's splitting rule is not one llama.cpp names; written as 'default', so llama.cpp may "
                  "split some texts differently than transformers", LorakitWarning, stacklevel=2)
    return "default"


def _tokenizer(writer, tokenizer, vocab_size: int, tmp: Path) -> None:
    """Tokens, their types, merges, special ids and the chat template (byte-level BPE tokenizers)."""
    gguf = _gguf()
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    if spec.get("model", {}).get("type") != "BPE" or spec["model"].get("byte_fallback"):
        raise ExportError("GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen2, GPT-2); this one is "
                          "a SentencePiece-style tokenizer, which is not written yet")
    ids = tokenizer.get_vocab()
    added = tokenizer.added_tokens_decoder
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in ids.items():
        if i < vocab_size:
            tokens[i] = text
            types[i] = (gguf.TokenType.NORMAL if i not in added else
                        gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    tokenizer.save_pretrained(tmp)
    special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    special.chat_template = None  # written below from the tokenizer itself
    special.add_to_gguf(writer, quiet=True)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tensor(tensor: torch.Tensor, quant: str):
    """(data, raw dtype) for the writer: 1-D tensors in f32, matrices in `quant` (f16 where rows do not split
    into the quantisation's blocks)."""
    gguf = _gguf()
    data = tensor.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or quant == "f32":
        return data, gguf.GGMLQuantizationType.F32
    kind = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}[quant]
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    if kind == gguf.GGMLQuantizationType.F16 or data.shape[-1] % block:
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, kind), kind


FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}  # llama.cpp's LlamaFileType (general.file_type)


def write_model_gguf(model: nn.Module, tokenizer, path: Path, quant: str = "f32", name: str = "") -> Path:
    """The whole (merged) causal LM as one GGUF file."""
    import tempfile
    gguf = _gguf()
    if quant not in EXPORT_QUANTS:
        raise ExportError(f"--quant {quant!r}: use {', '.join(EXPORT_QUANTS)}")
    config = model.config
    arch, permute = architecture(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(name or Path(path).stem)
    _hparams(writer, config)
    writer.add_file_type(FILE_TYPES[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with tempfile.TemporaryDirectory() as tmp:
        _tokenizer(writer, tokenizer, config.vocab_size, Path(tmp))
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the embedding as the output layer when there is no `output` tensor
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"{hf_name}: no GGUF tensor name for it in llama.cpp's {arch} mapping")
        data, kind = _tensor(llama_cpp_rows(hf_name, tensor, config, permute), quant)
        writer.add_tensor(gguf_name, data, raw_dtype=kind)
    _finish(writer)
    return path


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_lora_gguf(adapter_dir: Path, config, path: Path) -> Path:
    """A PEFT LoRA adapter as llama.cpp's LoRA GGUF: `<base tensor>.lora_a` (r, in) and `.lora_b` (out, r) per
    adapted weight, and adapter.lora.alpha such that llama.cpp's alpha / r is the adapter's scale."""
    gguf = _gguf()
    peft = json.loads((adapter_dir / CONFIG_NAME).read_text())
    if peft.get("use_dora"):
        raise ExportError("a DoRA adapter cannot be written as llama.cpp's LoRA GGUF (it has no magnitude vector); "
                          "export the merged model with --format gguf")
    if peft.get("modules_to_save"):
        raise ExportError(f"this adapter trains {', '.join(peft['modules_to_save'])} in full, which a llama.cpp LoRA "
                          "cannot hold; export the merged model with --format gguf")
    if peft.get("rank_pattern") or peft.get("alpha_pattern"):
        raise ExportError("per-module ranks or alphas (rank_pattern/alpha_pattern) cannot be written: llama.cpp's "
                          "LoRA GGUF has one alpha; export the merged model with --format gguf")
    arch, permute = architecture(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    r, alpha = int(peft["r"]), float(peft["lora_alpha"])
    scale = alpha / math.sqrt(r) if peft.get("use_rslora") else alpha / r
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", scale * r)  # llama.cpp scales by alpha / r
    tensors = read_safetensors(adapter_dir / WEIGHTS_NAME)
    modules = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    for module in modules:
        if f"{PEFT_PREFIX}{module}.lora_A.weight" not in tensors:
            raise ExportError(f"{module}: an embedding LoRA (lora_embedding_A/B) is not written to llama.cpp's "
                              "LoRA GGUF; export the merged model with --format gguf")
        a, b = tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"]
        gguf_name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ExportError(f"{module}: no GGUF tensor name for it in llama.cpp's {arch} mapping")
        writer.add_tensor(f"{gguf_name}.lora_a", a.float().numpy())
        b = llama_cpp_rows(f"{module}.weight", b, config, permute)
        writer.add_tensor(f"{gguf_name}.lora_b", b.float().numpy())
    _finish(writer)
    return path
