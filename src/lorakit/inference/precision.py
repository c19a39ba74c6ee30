"""The dtype a model generates in (`--dtype`, recipe key `infer_dtype`): fp32, bf16, or int8 weights computing in bf16.

fp32 is the exact path, token for token what transformers' generate gives. bf16 halves the bytes each decode step
reads and, where the hardware computes bf16 natively, runs the products about twice as fast; int8 halves them again
(int8.py). `auto` is bf16 where the hardware computes it, fp32 elsewhere (engine/precision.py's `resolve_dtype`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..engine.frozen_base import DenseBase, packing_supported
from ..engine.trained_copies import TrainedCopies
from ..engine.precision import cast_params, dtype_name, resolve_dtype
from ..models.attention import use_attention_kernel
from .int8 import holds_int8, quantize_int8
from .logits import batch_base, keep_fp32_logits
from .residual_stream import keep_fp32_stream


@torch.no_grad()
def cast_for_inference(model: nn.Module, name: str, device_type: str = "cpu") -> str:
    """Put a model for generation or evaluation in `name` (auto, fp32, bf16 or int8): every floating-point parameter,
    adapters included, cast once (buffers kept), and for int8 every dense linear's weight quantised after; the LM
    head then gives fp32 logits (logits.py), and a Llama-family model carries its residual stream in fp32
    (residual_stream.py) and runs its prompts' attention on lorakit's kernel where the CPU has it (models/attention.py).
    fp32 leaves the model as it is. Run again after an adapter is added, it brings the adapter to the same dtype.
    Returns the name of what is used, for the record."""
    dtype = resolve_dtype("bf16" if name == "int8" else name, device_type,
                          "--dtype int8 computes in" if name == "int8" else "--dtype")
    if dtype != torch.float32:
        cast_params(model, dtype, frozen_only=False)
    if name == "int8":
        quantize_int8(model)
    if dtype != torch.float32:
        keep_fp32_logits(model)
        if keep_fp32_stream(model):  # the Llama family: its prompts' attention on lorakit's kernel too
            use_attention_kernel(model)
    return "int8" if name == "int8" else dtype_name(dtype)


def dtype_of(model: nn.Module) -> str:
    """The name `cast_for_inference` gave `model`: int8 where a linear holds int8 codes, else its parameters'."""
    if any(holds_int8(m) for m in model.modules()):
        return "int8"
    return dtype_name(next(model.parameters()).dtype)


@torch.no_grad()
def pack_for_batches(model: nn.Module) -> list[DenseBase]:
    """Give every bf16 dense linear of `model` a copy in oneDNN's blocked layout (DenseBase.pack), so products of
    many rows (prompts, a server's batched steps) skip laying the weight out again on each call: the same bits as
    F.linear, faster, for the weights' bytes again. A plain nn.Linear (the LM head) keeps its copy beside it
    (frozen_base.packed_linear), for the C++ step; a head giving fp32 logits gets AMX's layout (logits.py). Modules
    that train in full (trained copies) are left as they are. Run again after an adapter is added, it packs what is
    new. Returns the bases it packed (none: not bf16, or no oneDNN bf16 in this PyTorch), whose `unpack` gives the
    memory back."""
    if not packing_supported():
        return []
    trained = {id(m) for copies in model.modules() if isinstance(copies, TrainedCopies) for m in copies.modules()}
    packed = []
    for module in model.modules():
        if id(module) in trained:
            continue
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16:
            module.__dict__.setdefault("packed_base", batch_base(module))  # not a submodule: no state_dict key
        base = module.__dict__.get("packed_base") or getattr(module, "frozen", None)
        if isinstance(base, DenseBase) and base.packed() is None and base.pack():
            packed.append(base)
    return packed
