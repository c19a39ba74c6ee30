"""The models layer: base models and trained runs.

Loading a base model and its tokenizer for a task from an embedded default, a local directory, a GGUF file or a hub
id (loading.py), rebuilding a trained run as base + adapter or a full fine-tune's directory (trained.py), and the
fused kernels for the architectures lorakit knows (kernels.py: the SwiGLU product, regional torch.compile;
attention.py: attention for training on CPU), and lorakit's C++ kernels (csrc/: the training attention and the
decode step's kernels, which the inference layer drives) with their build (native.py).

Imports `lorakit.errors`, `lorakit.config` and the engine (to put a saved adapter on its base); never data, training
or anything above.
"""
from .kernels import compile_blocks, fuse_swiglu
from .loading import (EMBEDDED, ModelError, cache_dir, head_name, is_seq2seq, load_model, load_tokenizer,
                      load_tokenizer_and_config, resolve_spec)
from .trained import adapter_dir, foreign_base, load_adapted, load_trained, same_model

__all__ = ["compile_blocks", "fuse_swiglu", "EMBEDDED", "ModelError", "cache_dir", "head_name", "is_seq2seq",
           "load_model", "load_tokenizer", "load_tokenizer_and_config", "resolve_spec", "same_model", "foreign_base", "adapter_dir",
           "load_adapted", "load_trained"]
