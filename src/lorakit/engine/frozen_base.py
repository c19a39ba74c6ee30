"""The frozen base weight of a LoRA layer, stored one of three ways behind one interface.

DenseBase     the layer's own full-precision weight (nn.Linear's (out, in), or Conv1D's (in, out))
NF4Base       lorakit's NF4 (quant.py): 4-bit codes and double-quantised scales, rebuilt block by block per matmul
Bnb4bitBase   a bitsandbytes Linear4bit (NF4 too), the CUDA default
(and for inference only, inference/int8.py's int8 codes with an fp32 scale per block of 32 along a row)
Each gives `matmul(x, bias)` (x·Wᵀ + bias), `dense()` (the (out, in) full-precision weight: a view of the stored one
for DenseBase, a dequantised copy otherwise), `nbytes()`, `numel()`, `dtype` (the full-precision dtype) and
`device`; `stored()` and `packed()` are what the compiled decode step reads. The LoRA layer (layer.py) holds one
and never asks which it is, except to merge (which needs a dense one). `StoredLinear` is a plain linear layer
holding one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant import (NF4Matmul, NF4Weight, bnb_dequantize, bnb_linear4bit, bnb_nbytes, dequantize_nf4, quantize_nf4,
                    resolve_backend)


class FrozenBase(nn.Module):
    """What every storage of a frozen base weight offers (see the module docstring)."""

    kind = ""  # "dense", or the quantisation: "torch", "bitsandbytes" (NF4), "int8"

    def __init__(self, shape: torch.Size, dtype: torch.dtype) -> None:
        super().__init__()
        self.shape, self.dtype = torch.Size(shape), dtype  # (out, in) and the full-precision dtype

    def numel(self) -> int:
        return self.shape.numel()

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(the (out, in) weight as stored, its scales or None) where the decode kernels read it as it is: a dense
        weight (scales None), int8 codes with their block scales; None for NF4."""
        return None

    def packed(self) -> torch.Tensor | None:
        """A copy of the weight laid out for oneDNN's GEMM (DenseBase.pack), while it holds the weight's values."""
        return None

    def takes_packed(self, x: torch.Tensor) -> bool:
        """Whether `matmul(x)` runs on the packed copy: inference, at least PACKED_ROWS rows."""
        return False


# rows from which oneDNN's GEMM on a packed bf16 weight is used (the C++ step's own: packed_rows())
PACKED_ROWS = 8


def packing_supported() -> bool:
    """Whether this CPU build of PyTorch has oneDNN's bf16 GEMM on packed weights."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class DenseBase(FrozenBase):
    """The weight as the original layer stored it; `transposed` for Conv1D's (in, out) layout."""

    kind = "dense"

    def __init__(self, weight: nn.Parameter, transposed: bool = False) -> None:
        super().__init__(weight.shape[::-1] if transposed else weight.shape, weight.dtype)
        self.weight = weight
        self.transposed = transposed
        self.packed_copy: tuple | None = None  # (oneDNN's layout, the weight's data_ptr and version then): see pack

    @torch.no_grad()
    def pack(self) -> bool:
        """Keep a copy of a bf16 weight in oneDNN's blocked layout, for inference: a product of many rows (a prompt,
        a batched decode step) then skips re-laying the weight out on every call, with the same bits as F.linear.
        Costs the weight's bytes again. False where it does not apply (another dtype or device, Conv1D's layout, no
        oneDNN bf16). A weight trained after is safe: autograd never uses the copy, and a changed weight drops it."""
        w = self.weight
        copy = None if self.transposed or w.dtype != torch.bfloat16 or w.device.type != "cpu" else self.laid_out(w)
        if copy is None:
            return False
        self.packed_copy = (copy, w.data_ptr(), w._version)
        return True

    def laid_out(self, w: torch.Tensor) -> torch.Tensor | None:
        """The copy `pack` keeps of a bf16 CPU weight: oneDNN's blocked layout (None without oneDNN bf16)."""
        return torch.ops.mkldnn._reorder_linear_weight(w, 16) if packing_supported() else None

    def unpack(self) -> None:
        """Drop the packed copy (its memory)."""
        self.packed_copy = None

    def packed(self) -> torch.Tensor | None:
        if self.packed_copy is None:
            return None
        copy, address, version = self.packed_copy
        if self.weight.data_ptr() != address or self.weight._version != version:  # merged into, or cast, since
            self.packed_copy = None
            return None
        return copy

    def takes_packed(self, x: torch.Tensor) -> bool:
        return (self.packed_copy is not None and x.numel() >= PACKED_ROWS * x.shape[-1] and not x.requires_grad
                and not torch.is_grad_enabled() and self.packed() is not None)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dense(self) -> torch.Tensor:
        """(out, in): a view, so in-place changes (merge) land in the stored weight."""
        return self.weight.t() if self.transposed else self.weight

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        w = self.dense()
        x = x if x.dtype == w.dtype else x.to(w.dtype)
        if self.takes_packed(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed(), bias, "none", [], "")
        return F.linear(x, w, bias)

    def stored(self) -> tuple[torch.Tensor, None]:
        return self.dense(), None

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class NF4Base(FrozenBase):
    """lorakit's NF4: the codes and scales as buffers (`.to(device)` moves them), no full-precision copy kept."""

    kind = "torch"

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__(w.shape, w.dtype)
        q = quantize_nf4(w)
        for k in ("codes", "scale_codes", "scale_scale", "scale_mean"):
            self.register_buffer(k, getattr(q, k))

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def nf4(self) -> NF4Weight:
        return NF4Weight(self.codes, self.scale_codes, self.scale_scale, self.scale_mean, self.shape, self.dtype)

    def dense(self) -> torch.Tensor:
        return dequantize_nf4(self.nf4())

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return NF4Matmul.apply(x, self.nf4(), bias)

    def nbytes(self) -> int:
        return self.nf4().nbytes()


class Bnb4bitBase(FrozenBase):
    """A bitsandbytes Linear4bit child (NF4, block 64, double-quantised scales), without the bias."""

    kind = "bitsandbytes"

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__(w.shape, w.dtype)
        self.linear = bnb_linear4bit(w)

    @property
    def device(self) -> torch.device:
        return self.linear.weight.device

    def dense(self) -> torch.Tensor:
        return bnb_dequantize(self.linear).to(self.dtype)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = self.linear(x)
        return out if bias is None else out.add_(bias)

    def nbytes(self) -> int:
        return bnb_nbytes(self.linear)


def quantized_base(w: torch.Tensor, backend: str = "auto") -> FrozenBase:
    """`w` (out, in) stored in NF4 by `backend` ("torch", "bitsandbytes", or "auto": bitsandbytes where installed)."""
    return Bnb4bitBase(w) if resolve_backend(backend) == "bitsandbytes" else NF4Base(w)


def packed_linear(module: nn.Module) -> torch.Tensor | None:
    """The packed copy kept beside a plain nn.Linear (inference/precision.py's pack_for_batches puts a DenseBase in
    its __dict__, not as a submodule), while it holds the weight's values."""
    base = module.__dict__.get("packed_base")
    return base.packed() if base is not None and base.weight is module.weight else None


class StoredLinear(nn.Module):
    """A linear layer (no LoRA) whose weight is held by a FrozenBase: a model's plain linears quantised for
    inference. LoRA wraps it as it wraps nn.Linear, keeping its storage."""

    def __init__(self, frozen: FrozenBase, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.frozen, self.bias = frozen, bias
        self.out_features, self.in_features = frozen.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen.matmul(x, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.frozen.kind}"
