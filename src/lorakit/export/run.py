"""`lorakit export`: a trained run for llama.cpp, Ollama and LM Studio.

gguf       the merged model (base + adapter, or a full fine-tune) with its tokenizer and chat template, in f32,
           f16, q8_0 or q4_0. A QLoRA run is merged into the dequantised NF4 weights it was trained against: merged
           into the original full-precision weights instead, the model differs from the adapter that was evaluated.
gguf-lora  the adapter alone in llama.cpp's LoRA format, for `llama-cli -m base.gguf --lora adapter.gguf`.
ollama     a directory: the merged GGUF and a Modelfile (FROM, TEMPLATE from the chat template, PARAMETER stop).
"""
from __future__ import annotations

from pathlib import Path

from ..engine import merge_and_unload, read_metadata
from ..files import atomic_dir, atomic_file
from ..models import adapter_dir, load_model, load_tokenizer_and_config, load_trained
from .gguf import ExportError, write_lora_gguf, write_model_gguf
from .ollama import write_modelfile


def export_run(run: str | Path, fmt: str, out: str | Path, quant: str = "f32", base_only: bool = False) -> Path:
    """Export a trained run (its directory, or the adapter / model directory in it) as `fmt`; returns the file or
    directory written. `base_only`: the run's base model without its adapter (the `-m` for a gguf-lora file)."""
    run = Path(run)
    source = run / "model" if (run / "model" / "config.json").is_file() else adapter_dir(run)
    full = (source / "config.json").is_file() and not (source / "adapter_config.json").is_file()
    if not full and not (source / "adapter_config.json").is_file():
        raise ExportError(f"{run}: not a run directory (no adapter/ or model/ written by `lorakit train`)")
    meta = read_metadata(source)
    if meta.get("task") == "classify":
        raise ExportError(f"{run} is a classification run: GGUF runtimes (llama.cpp, Ollama) serve language models, "
                          "not a classifier head; use the adapter with transformers or `lorakit serve`")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "gguf-lora":
        if full:
            raise ExportError(f"{run} is a full fine-tune: it has no adapter; export it with --format gguf")
        _, config = load_tokenizer_and_config(meta.get("model") or "smollm2")
        with atomic_file(out) as tmp:
            write_lora_gguf(source, config, Path(tmp))
        return out
    if base_only:
        model, tokenizer = load_model(meta.get("model") or "smollm2", "instruct")
    else:
        model, tokenizer, meta = load_trained(source)
        if not full:
            model = merge_and_unload(model)  # a QLoRA base: dequantised NF4 + the adapter, what was evaluated
    name = meta.get("name") or run.name
    if fmt == "gguf":
        with atomic_file(out) as tmp:
            write_model_gguf(model, tokenizer, Path(tmp), quant, name)
        return out
    with atomic_dir(out) as tmp:
        gguf_name = f"{name}-{quant}.gguf"
        write_model_gguf(model, tokenizer, Path(tmp) / gguf_name, quant, name)
        write_modelfile(Path(tmp), gguf_name, tokenizer, meta)
    return out
