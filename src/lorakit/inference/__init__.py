"""The inference layer: generation from a base model and its adapters.

The decode loop (decode.py: a static KV cache in kv_cache.py, one pass over the model's own modules per token,
continuous batching), the token choice (sampling.py), the Llama-family step in C++ (compiled_step.py,
models/csrc/llama_step.cpp), and generation for callers (generation.py: batched, streamed, merged or not; transformers'
`generate` for what the loop does not drive).

Imports `lorakit.errors`, `lorakit.config`, the engine and models; never training, evaluation or anything above.
"""
from .generation import generate, generate_base_and_adapted, merged, stream
from .sampling import Choice, Sampling

__all__ = ["generate", "generate_base_and_adapted", "merged", "stream", "Choice", "Sampling"]
