"""LoRA on an embedding table (nn.Embedding): a token's vector E[t] + s·B·A[:, t], PEFT's `lora_embedding_A/B`.

A is (r, vocabulary) and B (dim, r), as PEFT keeps them. Unlike a linear layer's LoRA, PEFT starts A at zero and
B Gaussian (the look-up of a zero column is zero either way: the model starts as the base). There is no dropout on
a look-up, no DoRA and no PiSSA/OLoRA here: those are refused when the adapter is added. The layer offers the same
adapter interface as LoRALinear (named adapters, active, disabled, row_adapters, merge), so inject.py treats both
alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoRAError, lora_scaling


class LoRAEmbedding(nn.Module):
    """An nn.Embedding with named LoRA adapters, one active at a time."""

    fan_in_fan_out = False
    quantized = False
    quant_backend = None

    def __init__(self, base: nn.Embedding) -> None:
        super().__init__()
        self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        self.weight = base.weight
        self.bias = None
        self.lora_A = nn.ParameterDict()  # (r, vocabulary): PEFT's lora_embedding_A
        self.lora_B = nn.ParameterDict()  # (dim, r): lora_embedding_B
        self.lora_magnitude = nn.ParameterDict()  # always empty: no DoRA on embeddings
        self.scaling: dict[str, float] = {}
        self.active: str | None = None
        self.merged: str | None = None
        self.disabled = False
        self.row_adapters: list[str | None] | None = None
        self._lookup = {"padding_idx": base.padding_idx, "max_norm": base.max_norm, "norm_type": base.norm_type,
                        "scale_grad_by_freq": base.scale_grad_by_freq, "sparse": base.sparse}
        object.__setattr__(self, "_base_module", base)  # out of the module tree, for unwrap()

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
            dora: bool = False, init: str = "kaiming") -> None:
        """Add adapter `name`: A zero, B standard normal (PEFT's embedding init)."""
        if name in self.lora_A:
            raise LoRAError(f"adapter {name!r} already exists on this layer")
        if dora or init in ("pissa", "olora"):
            raise LoRAError(f"{'DoRA' if dora else f'init {init}'} is for Linear and Conv1D layers, not an "
                            "Embedding: leave the embedding out of targets, or use plain LoRA")
        w = self.weight
        self.lora_A[name] = nn.Parameter(torch.zeros(r, self.in_features, device=w.device, dtype=torch.float32))
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, r, device=w.device, dtype=torch.float32))
        self.scaling[name] = lora_scaling(r, alpha, rslora)

    def remove(self, name: str) -> None:
        if self.merged == name:
            self.unmerge()
        del self.lora_A[name], self.lora_B[name], self.scaling[name]
        if self.active == name:
            self.active = None

    def untie(self) -> None:
        """A copy of the table of its own (it was shared with the LM head)."""
        self.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=False)

    def initial_pair(self, name: str) -> None:
        return None

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·(B·A)ᵀ, laid out like the table: (vocabulary, dim)."""
        return (self.lora_B[name] @ self.lora_A[name]).t() * self.scaling[name]

    @torch.no_grad()
    def merge(self, requantize: bool = False) -> None:
        if self.active is None or self.merged == self.active:
            return
        if self.merged is not None:
            self.unmerge()
        self.weight.data += self.delta_weight(self.active).to(self.weight.dtype)
        self.merged = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is not None:
            self.weight.data -= self.delta_weight(self.merged).to(self.weight.dtype)
            self.merged = None

    def base_forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, **self._lookup)

    def lora_term(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        """s·B·A[:, ids]: the r-vector of each token from A's columns, then B."""
        return F.embedding(ids, self.lora_A[name].t()) @ (self.lora_B[name].t() * self.scaling[name])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base_forward(ids)
        if self.disabled:
            return out
        if self.row_adapters is not None:
            if len(self.row_adapters) != ids.shape[0]:
                raise LoRAError(f"the batch has {ids.shape[0]} rows but {len(self.row_adapters)} adapter names")
            for name in dict.fromkeys(self.row_adapters):
                rows = [i for i, n in enumerate(self.row_adapters) if n == name]
                if name in self.lora_A:
                    out[rows] = out[rows] + self.lora_term(ids[rows], name).to(out.dtype)
            return out
        name = self.active
        if name is None or name == self.merged:
            return out
        return out + self.lora_term(ids, name).to(out.dtype)

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"vocabulary={self.in_features}, dim={self.out_features}, adapters={ranks}, active={self.active!r}"

    def unwrap(self) -> nn.Module:
        base = self._base_module
        base.weight = self.weight
        return base
