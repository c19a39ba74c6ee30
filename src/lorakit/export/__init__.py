"""The export layer: a trained run in the formats other runtimes load.

GGUF for llama.cpp (gguf.py: the merged model, or the adapter alone in llama.cpp's LoRA format), Ollama's Modelfile
(ollama.py), and `lorakit export` putting them together for a run (run.py). (A plain merged transformers directory is
the engine's merge_and_unload plus save_pretrained: `lorakit merge`.)

Imports `lorakit.errors`, `lorakit.files`, `lorakit.config`, the engine and models; never training, inference,
evaluation or the CLI.
"""
from .gguf import ExportError, write_lora_gguf, write_model_gguf
from .run import export_run

__all__ = ["ExportError", "write_lora_gguf", "write_model_gguf", "export_run"]
