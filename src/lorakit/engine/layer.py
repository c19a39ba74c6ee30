"""The LoRA layer: a frozen base linear plus named low-rank branches, one active at a time.

    y = base(x) + B · A · dropout(x) · scaling,     scaling = alpha / r   (or alpha / sqrt(r) with rsLoRA)

A has shape (r, in) and B (out, r); how they start is init.py's (Kaiming-uniform A and zero B by default, so the
adapted model equals the base until the first optimizer step). The layer keeps the base module's own `weight` and
`bias` Parameter objects (frozen), so the base part of a state dict keeps its key names. Beside it, as PEFT keeps
its variants: the math in function.py, DoRA in dora.py, the initialisations in init.py, batches that mix adapters by
row in mixed_rows.py, and the frozen weight's storage (dense or NF4) in frozen_base.py.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import LoRAError, lora_scaling
from .dora import add_magnitude, base_changed, dora_scale, scale_output
from .frozen_base import DenseBase, FrozenBase, StoredLinear, quantized_base
from .function import LoRAFunction, lora_linear
from .init import FROM_BASE, init_A, init_from_base, initial_pair
from .mixed_rows import Span, mixed_forward

try:  # GPT-2 style linear with a transposed (in, out) weight; optional so a plain-torch model needs no transformers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, this guards odd installs only
    Conv1D = None


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def is_lora_target_type(module: nn.Module) -> bool:
    """Layers LoRA can wrap: nn.Linear (and subclasses), transformers' GPT-2 Conv1D, a StoredLinear."""
    return isinstance(module, (nn.Linear, StoredLinear)) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a Conv1D (weight stored (in, out)), a LoRALinear or a
    StoredLinear."""
    if isinstance(module, (LoRALinear, StoredLinear)):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape if is_conv1d(module) else module.weight.shape[::-1]
    return in_f, out_f


def compute_dtype(weight: torch.Tensor | None, dtype: torch.dtype, A: torch.Tensor) -> torch.dtype:
    """What a LoRA term runs in for inputs of `dtype`: bf16 when the base weight is stored in bf16 (precision.py;
    an NF4 base in a model computing in bf16 too), the fp32 adapter cast per call; else the adapter's dtype."""
    base = weight.dtype if weight is not None else dtype
    autocast = torch.is_autocast_enabled(A.device.type)
    return base if base == torch.bfloat16 and A.dtype == torch.float32 and not autocast else A.dtype


def kept_storage(base: nn.Module) -> FrozenBase | None:
    """The storage a linear about to be wrapped already has: a StoredLinear's, or the copy in oneDNN's layout that
    pack_for_batches keeps beside an nn.Linear (an LM head's copy in AMX's layout is not one a LoRA layer reads)."""
    if isinstance(base, StoredLinear):
        return base.frozen
    packed = base.__dict__.pop("packed_base", None)
    return packed if type(packed) is DenseBase else None


class LoRALinear(nn.Module):
    """A base linear (nn.Linear or Conv1D) with any number of named LoRA branches, one active at a time."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not is_lora_target_type(base):
            raise LoRAError(f"LoRA wraps nn.Linear or Conv1D, not {type(base).__name__}")
        self.fan_in_fan_out = is_conv1d(base)  # Conv1D stores its weight as (in, out)
        self.in_features, self.out_features = linear_features(base)
        self.frozen: FrozenBase = kept_storage(base) or DenseBase(base.weight, transposed=self.fan_in_fan_out)
        self.bias = base.bias
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only: m, one per output feature
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: str | None = None
        self.merged: str | None = None  # the adapter folded into the base weight, if any
        self.disabled = False
        self.row_adapters = None  # a batch mixing adapters: see mixed_rows.py
        self.token_spans: tuple[Span, ...] | None = None  # a packed row's prompts by adapter: mixed_rows.py
        # The original module, kept out of the module tree, so merge_and_unload can hand back the original class.
        # It lets go of its weight meanwhile: a second reference would keep a full copy alive under FSDP sharding.
        base.bias = None
        if isinstance(base, StoredLinear):
            base.frozen = None
        else:
            base.weight = None
        object.__setattr__(self, "_base_module", base)

    # ---- adapters
    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
            dora: bool = False, init: str = "kaiming") -> None:
        """Add adapter `name`, started as `init` says (init.py); with DoRA, its magnitude (dora.py)."""
        if name in self.lora_A:
            raise LoRAError(f"adapter {name!r} already exists on this layer")
        dev, dt = self.frozen.device, self._lora_dtype()
        self.lora_A[name] = nn.Parameter(init_A(torch.empty(r, self.in_features, device=dev, dtype=dt), init))
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))
        self.scaling[name] = lora_scaling(r, alpha, rslora)
        self.dropout[name] = dropout
        if init in FROM_BASE:
            init_from_base(self, name, init)
        if dora:
            add_magnitude(self, name)
        self.__dict__.pop("_stacked", None)  # mixed_rows.stacked: built again with the adapters as they are

    def initial_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A₀, B₀) of an adapter initialised from the base (PiSSA, OLoRA), else None."""
        return initial_pair(self, name)

    def remove(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name]
        self.__dict__.pop("_stacked", None)
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        if self.active == name:
            self.active = None

    def _lora_dtype(self) -> torch.dtype:
        # Adapters stay in full precision even when the base is half precision or quantised.
        dt = self.frozen.dtype
        return dt if dt.is_floating_point and dt.itemsize >= 4 else torch.float32

    # ---- the frozen base weight (frozen_base.py)
    @property
    def weight(self) -> nn.Parameter | None:
        """The dense base weight as the original layer stored it; None while it is quantised."""
        return self.frozen.weight if self.frozen.kind == "dense" else None

    @property
    def quantized(self) -> bool:
        return self.frozen.kind != "dense"

    @property
    def quant_backend(self) -> str | None:
        """None (dense), "torch" (lorakit's NF4) or "bitsandbytes" (Linear4bit)."""
        return None if self.frozen.kind == "dense" else self.frozen.kind

    @torch.no_grad()
    def quantize_(self, backend: str = "auto") -> None:
        """Store the base weight in NF4 (QLoRA) and drop the dense one."""
        self.frozen = quantized_base(self.dense_weight().detach(), backend)
        base_changed(self)

    def nf4_nbytes(self) -> int:
        """Bytes the quantised base weight takes (codes and scales); 0 when not quantised."""
        return self.frozen.nbytes() if self.quantized else 0

    @torch.no_grad()
    def dequantize_(self) -> None:
        """Back to a dense (full-precision) base weight; NF4 rounding stays in it."""
        w = self.frozen.dense().to(self.frozen.dtype)
        w = nn.Parameter(w.t().contiguous() if self.fan_in_fan_out else w, requires_grad=False)
        self.frozen = DenseBase(w, transposed=self.fan_in_fan_out)
        base_changed(self)

    def untie(self) -> None:
        """Give this layer a copy of its dense weight of its own (it was shared with another module)."""
        self.frozen = DenseBase(nn.Parameter(self.weight.detach().clone(), requires_grad=False), self.fan_in_fan_out)

    def dense_weight(self) -> torch.Tensor:
        """The base weight laid out (out, in), as F.linear takes it: a view of a dense one (in-place changes land
        in it), a dequantised copy of an NF4 one."""
        return self.frozen.dense()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen.matmul(x, self.bias)

    # ---- merging
    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling · B · A, laid out like this layer's base weight."""
        delta = (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        """Fold the active adapter into the base weight, so inference costs what the base costs.

        An NF4 base is dequantised first and the merged weight kept in full precision; requantize=True stores it
        in NF4 again, which rounds the merged weight (and cannot be unmerged exactly). DoRA's W' = (W + s·B·A) ·
        m/‖W + s·B·A‖ is folded row by row.
        """
        if self.active is None or self.merged == self.active:
            return
        if self.merged is not None:
            self.unmerge()
        backend = self.quant_backend or "auto"
        if requantize and backend not in ("auto", "torch", "bitsandbytes"):
            raise LoRAError(f"requantize re-quantises to NF4; this base is {backend}: merge without it")
        if self.quantized:
            self.dequantize_()
        is_dora = self.active in self.lora_magnitude
        if is_dora:
            self._merged_scale = dora_scale(self, self.active)
        self.weight.data += self.delta_weight(self.active).to(self.weight.dtype)
        if is_dora:  # dense_weight() is a view: the change lands in the stored weight
            self.dense_weight().mul_(self._merged_scale.to(self.weight.dtype)[:, None])
        self.merged = self.active
        base_changed(self)
        if requantize:
            warnings.warn("re-quantising the merged weight to NF4 rounds it: outputs move slightly", stacklevel=2)
            self.quantize_(backend)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        if self.quantized:
            self.dequantize_()
        dense = self.dense_weight()
        if self.merged in self.lora_magnitude:
            dense.div_(self._merged_scale.to(dense.dtype)[:, None])
        self.weight.data -= self.delta_weight(self.merged).to(self.weight.dtype)
        self.merged = None
        base_changed(self)

    # ---- forward
    @property
    def row_adapters(self) -> list[str | None] | None:
        """A batch mixing adapters: row i uses adapter row_adapters[i] (None: none). Set by `adapters_by_row`."""
        return self._row_adapters

    @row_adapters.setter
    def row_adapters(self, rows: list[str | None] | None) -> None:
        self._row_adapters, self._row_weights = rows, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active
        if (self.row_adapters is not None or self.token_spans is not None) and not self.disabled:
            return mixed_forward(self, x)
        if self.disabled or name is None or name == self.merged:
            return self.base_forward(x)
        y = self.lora_forward(x, name)
        return scale_output(self, name, y) if name in self.lora_magnitude else y

    def lora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """W·x + bias + s·B·A·dropout(x) for adapter `name`: fused into one Function when the base is dense."""
        A, B = self.lora_A[name], self.lora_B[name]
        p = self.dropout[name] if self.training else 0.0
        compute = compute_dtype(self.weight, x.dtype, A)
        fused = self._fusable(compute, A)  # base matmul and LoRA term in one; else the base runs on its own (NF4)
        x2 = x.to(compute).reshape(-1, x.shape[-1])  # (tokens, in); the output is viewed back
        if fused and self.frozen.takes_packed(x2):  # inference on the weight's packed copy: the term added as fused
            out = self.frozen.matmul(x2, self.bias)
            return lora_linear(x2, None, None, A, B, self.scaling[name], p, out=out)[0].view(*x.shape[:-1], -1)
        args = (x2, self.dense_weight() if fused else None, self.bias if fused else None, A, B, self.scaling[name], p)
        y = (LoRAFunction.apply(*args) if torch.is_grad_enabled() else lora_linear(*args)[0]).view(*x.shape[:-1], -1)
        if fused:
            return y
        # In place: the base matmul's backward does not need its output, so this saves one (tokens, out) tensor.
        out = self.base_forward(x)
        return out.add_(y.to(out.dtype))

    def _fusable(self, dtype: torch.dtype, A: torch.Tensor) -> bool:
        """Whether base and branch can run as one LoRAFunction on inputs of `dtype`: a dense frozen base in that
        dtype (the adapter's, or bf16 for an fp32 adapter), no autocast (which would not reach the matmuls that
        write into the output)."""
        w, b = self.weight, self.bias
        return (w is not None and dtype == w.dtype and A.dtype in (dtype, torch.float32) and not w.requires_grad
                and (b is None or not b.requires_grad) and not torch.is_autocast_enabled(A.device.type))

    def extra_repr(self) -> str:
        ranks = {n: f"{a.shape[0]}{' dora' if n in self.lora_magnitude else ''}" for n, a in self.lora_A.items()}
        storage = {"dense": "", "int8": ", int8"}.get(self.frozen.kind, f", nf4 ({self.quant_backend})")
        return (f"in={self.in_features}, out={self.out_features}, adapters={ranks}, active={self.active!r}"
                f"{', conv1d' if self.fan_in_fan_out else ''}{storage}")

    def unwrap(self) -> nn.Module:
        """The original module, holding this layer's (possibly merged) weight and bias."""
        base = self._base_module
        if isinstance(base, StoredLinear):
            base.frozen, base.bias = self.frozen, self.bias
            return base
        if self.quantized:
            self.dequantize_()
        base.weight, base.bias = self.weight, self.bias
        return base
