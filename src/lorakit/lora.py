"""The LoRA layer and its math: a frozen base linear plus named low-rank branches.

    y = base(x) + B · A · dropout(x) · scaling,     scaling = alpha / r   (or alpha / sqrt(r) with rsLoRA)

A has shape (r, in) and is Kaiming-uniform; B has shape (out, r) and starts at zero, so the adapted model equals
the base model until the first optimizer step. The layer keeps the base module's own `weight` and `bias` Parameter
objects (frozen), so the base part of a state dict keeps its key names.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import dropout_drops, dropout_scale, zero_at, zeroed
from .errors import UserError
from .config import INITS, QUANT_BACKENDS, TARGET_PRESETS
from .frozen_base import DenseBase, FrozenBase, quantized_base

try:  # GPT-2 style linear with a transposed (in, out) weight; optional so a plain-torch model needs no transformers
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, this guards odd installs only
    Conv1D = None


class LoRAError(UserError):
    """A mistake in LoRA configuration or use; the message says what to do."""


def regex_problem(pattern: str) -> str | None:
    """Why `pattern` is not a regular expression Python can compile, or None when it is."""
    try:
        re.compile(pattern)
    except re.error as e:
        return str(e)
    return None


@dataclass
class LoRAConfig:
    """What to adapt and how: rank, scale, dropout, which modules get LoRA and which are trained in full."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str | Sequence[str] = "all-linear"  # a preset (all-linear, attention, mlp), module names or a regex
    exclude: Sequence[str] = ()
    trainable: Sequence[str] = ()
    rslora: bool = False
    dora: bool = False  # DoRA: a trained magnitude per output feature times the direction of W + s·B·A
    init: str = "kaiming"  # A and B at the start: kaiming, gaussian, pissa or olora (INITS; PEFT's init_lora_weights)
    quantize: str | None = None  # "nf4": QLoRA, the adapted layers' base weights stored in 4-bit NormalFloat
    quantize_all: bool = False  # with quantize: every other linear too (not the heads, not `trainable` modules)
    quant_backend: str = "auto"  # "torch" (quant.py), "bitsandbytes" (Linear4bit), "auto": bitsandbytes where installed

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoRAError(f"r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise LoRAError(f"alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.quantize not in (None, "nf4"):
            raise LoRAError(f"quantize must be None or 'nf4', got {self.quantize!r}")
        if self.init not in INITS:
            raise LoRAError(f"init {self.init!r} is not one of {', '.join(INITS)}")
        if self.init in ("pissa", "olora") and self.quantize:
            raise LoRAError(f"init {self.init} rewrites the base weights from their SVD or QR; it needs a "
                            "full-precision base, not quantize=nf4 (train PiSSA/OLoRA with method lora)")
        if self.quant_backend not in QUANT_BACKENDS:
            raise LoRAError(f"quant_backend must be one of {', '.join(QUANT_BACKENDS)}, got {self.quant_backend!r}")
        if not isinstance(self.targets, str):
            self.targets = tuple(self.targets)
            if not self.targets:
                raise LoRAError(f"targets is empty: use {', '.join(TARGET_PRESETS)}, a list of module names, or a "
                                "regex string")
        elif self.targets not in TARGET_PRESETS and (problem := regex_problem(self.targets)):
            raise LoRAError(f"targets {self.targets!r} is not a valid regular expression ({problem}); use "
                            f"{', '.join(TARGET_PRESETS)}, module names like q_proj,v_proj, or a regex such as "
                            "'.*(q|v)_proj'")
        self.exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        self.trainable = (self.trainable,) if isinstance(self.trainable, str) else tuple(self.trainable)

    @property
    def scaling(self) -> float:
        """The factor on B·A·x: alpha/r, or alpha/sqrt(r) for rank-stabilised LoRA."""
        return lora_scaling(self.r, self.alpha, self.rslora)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """alpha/r (LoRA paper) or alpha/sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def is_conv1d(module: nn.Module) -> bool:
    return Conv1D is not None and isinstance(module, Conv1D)


def is_lora_target_type(module: nn.Module) -> bool:
    """Layers LoRA can wrap: nn.Linear (and subclasses) and transformers' GPT-2 Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def lora_linear(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, p: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x @ W.T + b + scaling · B · A · dropout(x) for x of shape (tokens, in) (W None: the LoRA term alone), with
    what a backward needs: the rank-r activations h = A · dropout(x) and dropout's drops (flat indices). LoRAFunction
    wraps it for training; inference calls it bare, without autograd's per-call cost, which shows when decoding one
    token at a time (three ops then, the LoRA term added into the base output in place)."""
    drops = dropout_drops(x.numel(), p, x.device) if p > 0 else None
    h = F.linear(x, A) if drops is None else F.linear(zero_at(x, drops), A).mul_(dropout_scale(p))
    if weight is None:
        return torch.mm(h, (B * scaling).t()), h, drops
    out = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return out.addmm_(h, B.t(), alpha=scaling), h, drops


class LoRAFunction(torch.autograd.Function):
    """`lora_linear` as one autograd Function, on (tokens, in) inputs. The base weight and bias must be frozen.

    What plain autograd would do and this does not: keep a full-size copy of dropout(x) per adapted layer (q, k and
    v each their own) -- this keeps x, shared by the layers that read it, and the indices of the drops; write the
    LoRA term to a (tokens, out) temporary and add it -- here it is accumulated into the base output in place
    (addmm_); return the input gradients of base and branch as two (tokens, in) tensors to be summed -- here the
    base's is accumulated into the branch's. Dropout's 1/(1-p) rescale is applied on the rank-r side, and gradients
    nobody asks for are not computed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, scaling: float, p: float) -> torch.Tensor:
        out, h, drops = lora_linear(x, weight, bias, A, B, scaling, p)
        ctx.save_for_backward(x, weight, A, B, h, drops)
        ctx.scaling, ctx.rescale = scaling, dropout_scale(p)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, A, B, h, drops = ctx.saved_tensors
        # Under autocast (bf16 on a GPU) the output, h and grad are half precision while A and B stay fp32: the
        # adapter's gradients are computed in its own dtype. No-ops otherwise.
        dt = A.dtype
        grad = grad.to(dt)
        # The skinny products are written in the operand layouts MKL runs fastest: grad·B with B transposed in
        # memory, B's gradient as (hᵀ·grad)ᵀ rather than gradᵀ·h (the README's engine section has the figures).
        gh = F.linear(grad, B.t().contiguous()).mul_(ctx.scaling * (ctx.rescale if drops is not None else 1.0))
        gx = gA = gB = None
        if ctx.needs_input_grad[4]:
            gB = (h.to(dt).t() @ grad).mul_(ctx.scaling).t()
        if ctx.needs_input_grad[3]:
            xd = x.to(dt)  # a no-op: forward callers pass x in the adapter's dtype
            gA = gh.t() @ (xd if drops is None else zero_at(xd, drops))
        if ctx.needs_input_grad[0]:
            # the branch's input gradient, zero where x was dropped; then the base's is added in place
            shape = (len(gh), A.shape[1])
            gx = gh @ A if drops is None else zeroed(shape, A, drops, lambda out: torch.mm(gh, A, out=out))
            gx = (gx if weight is None else gx.addmm_(grad, weight)).to(x.dtype)
        return gx, None, None, gA, gB, None, None


def dora_scale_(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(y - bias)·scale + bias, in place: y·scale + bias·(1 - scale), two passes over y and no temporary."""
    y.mul_(scale)
    return y if bias is None else y.add_(bias * (1 - scale))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear, a Conv1D (weight stored (in, out)) or a LoRALinear."""
    if isinstance(module, LoRALinear):
        return module.in_features, module.out_features
    in_f, out_f = module.weight.shape if is_conv1d(module) else module.weight.shape[::-1]
    return in_f, out_f


class LoRALinear(nn.Module):
    """A base linear (nn.Linear or Conv1D) with any number of named LoRA branches, one active at a time."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        if not is_lora_target_type(base):
            raise LoRAError(f"LoRA wraps nn.Linear or Conv1D, not {type(base).__name__}")
        self.fan_in_fan_out = is_conv1d(base)  # Conv1D stores its weight as (in, out)
        self.in_features, self.out_features = linear_features(base)
        self.frozen: FrozenBase = DenseBase(base.weight, transposed=self.fan_in_fan_out)  # the base weight's storage
        self.bias = base.bias
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()  # DoRA adapters only: m, one per output feature
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self.disabled = False
        self.row_adapters = None  # a batch mixing adapters: see mixed_forward
        # The original module, kept out of the module tree, so merge_and_unload can hand back the original class.
        # It lets go of its weight meanwhile: a second reference would keep a full copy alive under FSDP sharding.
        base.weight, base.bias = None, None
        object.__setattr__(self, "_base_module", base)

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
            dora: bool = False, init: str = "kaiming") -> None:
        """Add adapter `name`: A Kaiming-uniform (as nn.Linear inits its weight) or Gaussian (std 1/r) and B zero,
        so the layer starts as the base; or PiSSA / OLoRA (see `init_from_base`). With DoRA, the magnitude
        m = ‖W + s·B·A‖ per output feature, so the layer starts as it was."""
        if name in self.lora_A:
            raise LoRAError(f"adapter {name!r} already exists on this layer")
        dev, dt = self._device(), self._lora_dtype()
        A = torch.empty(r, self.in_features, device=dev, dtype=dt)
        if init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))
        self.scaling[name] = lora_scaling(r, alpha, rslora)
        self.dropout[name] = dropout
        if init in ("pissa", "olora"):
            self.init_from_base(name, init)
        if dora:
            self.lora_magnitude[name] = nn.Parameter(self.weight_norm(name))

    @torch.no_grad()
    def init_from_base(self, name: str, init: str) -> None:
        """PiSSA (Meng et al., 2024): A, B from the r principal singular directions of W, W keeping the rest; OLoRA
        (Büyükakyüz, 2024): B, A from the first r columns of W's QR decomposition. Either way W becomes
        W_res = W - s·B₀·A₀ (the layer's output is unchanged), and the first A₀, B₀ are kept: the saved adapter is
        then written for the original W (`initial_pair`). PEFT's pissa_init / olora_init, on the (out, in) layout."""
        if self.quantized:
            raise LoRAError(f"init {init} needs a full-precision base weight, not an NF4 one")
        s, r = self.scaling[name], self.lora_A[name].shape[0]
        w = self.dense_weight().float()
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(w, full_matrices=False)
            root = torch.diag(torch.sqrt(S[:r] / s))
            A, B = root @ Vh[:r], U[:, :r] @ root
        else:
            Q, R = torch.linalg.qr(w)
            A, B = R[:r], Q[:, :r]
        self.lora_A[name].copy_(A)
        self.lora_B[name].copy_(B)
        self.dense_weight().copy_((w - s * B @ A).to(self.weight.dtype))
        self._base_changed()
        self.__dict__.setdefault("initial", {})[name] = (A.clone(), B.clone())

    def initial_pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A₀, B₀) of an adapter initialised from the base (PiSSA, OLoRA), else None."""
        return self.__dict__.get("initial", {}).get(name)

    # ---- DoRA (Liu et al., 2024): W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖, the norm per output feature (a row of the
    # (out, in) weight) and, as in the paper and PEFT, treated as a constant in backward. The norm is never formed
    # from the (out, in) matrix W + s·B·A, which PEFT builds in every forward: per row,
    #   ‖W + s·B·A‖² = ‖W‖² + 2s·(W·Aᵀ ⊙ B)·1 + s²·(B·(A·Aᵀ) ⊙ B)·1,
    # with ‖W‖² per row kept (W is frozen) and W·Aᵀ (out, r) one base matmul over the r rows of A: O(out·in·r),
    # on a dense or NF4 base alike, and no (out, in) temporary.

    @torch.no_grad()
    def weight_norm(self, name: str) -> torch.Tensor:
        """‖W + s·B·A‖ per output feature, for DoRA adapter `name` (no gradient). Kept until A, B or the base
        change (in-place updates bump a tensor's version), so decoding does not recompute it per token."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        key = (name, A._version, B._version, id(A), id(B), s, self.__dict__.get("_base_epoch", 0))
        cached = self.__dict__.setdefault("_norms", {}).get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        wa = self.base_forward(A.to(self.frozen.dtype))  # (r, out) = A·Wᵀ (+ bias)
        if self.bias is not None:
            wa = wa - self.bias
        cross = (wa.t().to(B.dtype) * B).sum(1)
        lora_sq = ((B @ (A @ A.t())) * B).sum(1)
        norm = (self._row_sq_norm() + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()
        self._norms[name] = (key, norm)
        return norm

    def _row_sq_norm(self) -> torch.Tensor:
        """‖W‖² per output feature of the frozen base, computed once per state of the base (`_base_changed`)."""
        if getattr(self, "_w_sq", None) is None:
            self._w_sq = self.frozen.dense().float().pow(2).sum(1)
        return self._w_sq

    def _base_changed(self) -> None:
        """The base weight changed (merge, quantisation, PiSSA): what DoRA keeps of it is out of date."""
        self._w_sq = None
        self._base_epoch = self.__dict__.get("_base_epoch", 0) + 1

    def dora_scale(self, name: str) -> torch.Tensor:
        """m / ‖W + s·B·A‖ per output feature: what multiplies (W + s·B·A)·x."""
        return self.lora_magnitude[name] / self.weight_norm(name)

    def _lora_dtype(self) -> torch.dtype:
        # Adapters stay in full precision even when the base is half precision or quantised.
        dt = self.frozen.dtype
        return dt if dt.is_floating_point and dt.itemsize >= 4 else torch.float32

    def _device(self) -> torch.device:
        return self.frozen.device

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
        """Store the base weight in NF4 (QLoRA) and drop the dense one (frozen_base.py)."""
        self.frozen = quantized_base(self.dense_weight().detach(), backend)
        self._base_changed()

    def nf4_nbytes(self) -> int:
        """Bytes the quantised base weight takes (codes and scales); 0 when not quantised."""
        return self.frozen.nbytes() if self.quantized else 0

    @torch.no_grad()
    def dequantize_(self) -> None:
        """Back to a dense (full-precision) base weight; NF4 rounding stays in it."""
        w = self.frozen.dense().to(self.frozen.dtype)
        w = nn.Parameter(w.t().contiguous() if self.fan_in_fan_out else w, requires_grad=False)
        self.frozen = DenseBase(w, transposed=self.fan_in_fan_out)
        self._base_changed()

    def untie(self) -> None:
        """Give this layer a copy of its dense weight of its own (it was shared with another module)."""
        self.frozen = DenseBase(nn.Parameter(self.weight.detach().clone(), requires_grad=False), self.fan_in_fan_out)

    def remove(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name]
        if name in self.lora_magnitude:
            del self.lora_magnitude[name]
        if self.active == name:
            self.active = None

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling · B · A, laid out like this layer's base weight."""
        delta = (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]
        return delta.t() if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        """Fold the active adapter into the base weight, so inference costs what the base costs.

        An NF4 base is dequantised first and the merged weight kept in full precision; requantize=True stores it
        in NF4 again, which rounds the merged weight (and cannot be unmerged exactly).
        """
        if self.active is None or self.merged == self.active:
            return
        if self.merged is not None:
            self.unmerge()
        backend = self.quant_backend or "auto"
        if self.quantized:
            self.dequantize_()
        if self.active in self.lora_magnitude:  # DoRA: W' = (W + s·B·A) · m/‖W + s·B·A‖, row by row
            self._merged_scale = self.dora_scale(self.active)
        self.weight.data += self.delta_weight(self.active).to(self.weight.dtype)
        if self.active in self.lora_magnitude:  # dense_weight() is a view: the change lands in the stored weight
            self.dense_weight().mul_(self._merged_scale.to(self.weight.dtype)[:, None])
        self.merged = self.active
        self._base_changed()
        if requantize:
            warnings.warn("re-quantising the merged weight to NF4 rounds it: outputs move slightly", stacklevel=2)
            self.quantize_(backend)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is not None:
            if self.quantized:
                self.dequantize_()
            dense = self.dense_weight()
            if self.merged in self.lora_magnitude:
                dense.div_(self._merged_scale.to(dense.dtype)[:, None])
            self.weight.data -= self.delta_weight(self.merged).to(self.weight.dtype)
            self.merged = None
            self._base_changed()

    def dense_weight(self) -> torch.Tensor:
        """The base weight laid out (out, in), as F.linear takes it: a view of a dense one (in-place changes land
        in it), a dequantised copy of an NF4 one."""
        return self.frozen.dense()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen.matmul(x, self.bias)

    @property
    def row_adapters(self) -> list[str | None] | None:
        """A batch mixing adapters: row i uses adapter row_adapters[i] (None: none). Set by `adapters_by_row`."""
        return self._row_adapters

    @row_adapters.setter
    def row_adapters(self, rows: list[str | None] | None) -> None:
        self._row_adapters, self._row_weights = rows, None

    @torch.no_grad()
    def _stack_rows(self, rows: list[str | None]) -> tuple[torch.Tensor, ...]:
        """Per row, its adapter's A (rows, r, in) and scaled B (rows, out, r), ranks zero-padded to the largest;
        zeros for a row without an adapter here. Empty when no row's adapter is on this layer."""
        names = [n for n in dict.fromkeys(rows) if n is not None and n in self.lora_A]
        if not names:
            return ()
        r, any_A = max(self.lora_A[n].shape[0] for n in names), self.lora_A[names[0]]
        A = any_A.new_zeros(len(rows), r, self.in_features)
        B = any_A.new_zeros(len(rows), self.out_features, r)
        dora = any(n in self.lora_magnitude for n in names)
        scale = any_A.new_ones(len(rows), 1, self.out_features) if dora else None  # DoRA rows: m/‖W + s·B·A‖
        for i, n in enumerate(rows):
            if n in names:
                k = self.lora_A[n].shape[0]
                A[i, :k] = self.lora_A[n]
                B[i, :, :k] = self.lora_B[n] * self.scaling[n]
                if n in self.lora_magnitude:
                    scale[i, 0] = self.dora_scale(n)
        return A, B, scale

    def mixed_forward(self, x: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
        """A batch whose row i uses adapter rows[i]: the base matmul plus one batched rank-r product (bmm) over
        all rows, whatever adapter each uses, so serving three adapters costs what serving one does. The stacked
        adapter weights are built at the first call and reused while `row_adapters` stays set: for inference."""
        if len(rows) != x.shape[0]:
            raise LoRAError(f"the batch has {x.shape[0]} rows but {len(rows)} adapter names were given")
        out = self.base_forward(x)
        if self._row_weights is None:
            self._row_weights = self._stack_rows(rows)
        if not self._row_weights:
            return out
        A, B, scale = self._row_weights
        x3 = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)  # (rows, tokens, in)
        delta = torch.bmm(torch.bmm(x3, A.transpose(1, 2)), B.transpose(1, 2))
        out = out.add_(delta.view(out.shape).to(out.dtype))
        if scale is None:
            return out
        return dora_scale_(out.view(delta.shape), scale.to(out.dtype), self.bias).view(out.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = self.active
        if self.row_adapters is not None and not self.disabled:
            return self.mixed_forward(x, self.row_adapters)
        if self.disabled or name is None or name == self.merged:
            return self.base_forward(x)
        y = self.lora_forward(x, name)
        if name not in self.lora_magnitude:
            return y
        # DoRA: m/‖W + s·B·A‖ ⊙ (W·x + s·B·A·x) + bias, from the LoRA output W·x + bias + s·B·A·x, in place
        scale = self.dora_scale(name).to(y.dtype)
        if not torch.is_grad_enabled():
            return dora_scale_(y, scale, self.bias)
        # autograd keeps y - bias for m's gradient; a hand-written Function that works in place measured no faster
        return y * scale if self.bias is None else (y - self.bias) * scale + self.bias

    def lora_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """W·x + bias + s·B·A·dropout(x) for adapter `name`: fused into one Function when the base is dense."""
        A, B = self.lora_A[name], self.lora_B[name]
        p = self.dropout[name] if self.training else 0.0
        fused = self._fusable(x.dtype, A)  # base matmul and LoRA term in one; else the base runs on its own (NF4, bf16)
        x2 = x.to(A.dtype).reshape(-1, x.shape[-1])  # (tokens, in); the output is viewed back
        args = (x2, self.dense_weight() if fused else None, self.bias if fused else None, A, B, self.scaling[name], p)
        y = (LoRAFunction.apply(*args) if torch.is_grad_enabled() else lora_linear(*args)[0]).view(*x.shape[:-1], -1)
        if fused:
            return y
        # In place: the base matmul's backward does not need its output, so this saves one (tokens, out) tensor.
        out = self.base_forward(x)
        return out.add_(y.to(out.dtype))

    def _fusable(self, dtype: torch.dtype, A: torch.Tensor) -> bool:
        """Whether base and branch can run as one LoRAFunction on inputs of `dtype`: a dense frozen base in the
        adapter's dtype, no autocast (which would not reach the matmuls that write into the output)."""
        w, b = self.weight, self.bias
        return (w is not None and dtype == w.dtype == A.dtype and not w.requires_grad
                and (b is None or not b.requires_grad) and not torch.is_autocast_enabled(A.device.type))

    def inference_terms(self, dtype: torch.dtype) -> tuple | None:
        """(W, bias, A, B, scaling) when this layer's no-grad forward on inputs of `dtype` is x·Wᵀ + bias plus at
        most one LoRA term s·(x·Aᵀ)·Bᵀ computed as `lora_linear` does (A, B None: no term): what the compiled decode
        step computes. None for anything else: a quantised base, DoRA, adapters mixed by row, dropout in training."""
        if self.row_adapters is not None and not self.disabled:
            return None
        name = self.active
        if self.disabled or name is None or name == self.merged:
            return (self.dense_weight(), self.bias, None, None, 0.0) if self.weight is not None else None
        A, B = self.lora_A[name], self.lora_B[name]
        if name in self.lora_magnitude or (self.training and self.dropout[name] > 0) or not self._fusable(dtype, A):
            return None
        return self.dense_weight(), self.bias, A, B, self.scaling[name]

    def extra_repr(self) -> str:
        ranks = {n: f"{a.shape[0]}{' dora' if n in self.lora_magnitude else ''}" for n, a in self.lora_A.items()}
        return (f"in={self.in_features}, out={self.out_features}, adapters={ranks}, active={self.active!r}"
                f"{', conv1d' if self.fan_in_fan_out else ''}{f', nf4 ({self.quant_backend})' if self.quantized else ''}")

    def unwrap(self) -> nn.Module:
        """The original module, holding this layer's (possibly merged) weight and bias."""
        if self.quantized:
            self.dequantize_()
        base = self._base_module
        base.weight, base.bias = self.weight, self.bias
        return base
