"""What is trained: trainable versus total parameters, with a row per adapted or fully trained module."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from .embedding import LoRAEmbedding
from .registry import active_adapter, adapter_params_by_module, lora_layers, packed_params
from .trained_copies import TrainedCopies

@dataclass
class ParameterReport:
    """Trainable versus total parameters, with a row per adapted or fully trained module."""

    trainable: int
    total: int
    rows: list[dict] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / {self.total:,} ({100 * self.fraction:.2f}%)"

    def table(self, group: bool = True) -> str:
        """The per-module table; with group=True, modules that differ only in a layer index share one line."""
        rows = self.rows
        if group:
            merged: dict[tuple, dict] = {}
            for row in rows:
                key = (re.sub(r"\.\d+\.", ".*.", row["module"]), row["kind"], row["shape"], row["r"])
                g = merged.setdefault(key, {**row, "module": key[0], "count": 0, "trainable": 0, "total": 0})
                g["count"] += 1
                g["trainable"] += row["trainable"]
                g["total"] += row["total"]
            rows = list(merged.values())
        head = f"{'module':<48} {'n':>4} {'kind':<18} {'shape':>12} {'r':>3} {'trainable':>12} {'total':>13}"
        lines = [head, "-" * len(head)]
        for row in rows:
            lines.append(f"{row['module']:<48} {row.get('count', 1):>4} {row['kind']:<18} {row['shape']:>12} "
                         f"{row['r'] or '':>3} {row['trainable']:>12,} {row['total']:>13,}")
        lines.append("-" * len(head))
        lines.append(str(self))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"trainable": self.trainable, "total": self.total, "fraction": self.fraction, "modules": self.rows}


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count trainable and total parameters (shared weights once) and list what is trained, module by module."""
    packed = packed_params(model)
    unique = [p for i, p in {id(p): p for p in model.parameters()}.items() if i not in packed]  # 4-bit: counted below
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    nf4 = sum(layer.frozen.numel() for _, layer in lora_layers(model) if layer.quantized)  # NF4 / int8 codes: buffers
    total = sum(p.numel() for p in unique) + nf4
    rows = []
    active = active_adapter(model)
    for path, params in (adapter_params_by_module(model, active) if active else {}).items():
        m = model.get_submodule(path)
        n = sum(p.numel() for p in params.values())
        trained = sum(p.numel() for p in params.values() if p.requires_grad)
        if isinstance(m, TrainedCopies):
            w = getattr(m.copies[active], "weight", None)
            shape = "x".join(str(d) for d in w.shape[::-1]) if isinstance(w, nn.Parameter) else ""  # in x out
            rows.append({"module": path, "kind": f"full({type(m.original).__name__})", "shape": shape, "r": 0,
                         "trainable": trained, "total": n})
            continue
        kind = "Embedding" if isinstance(m, LoRAEmbedding) else "Conv1D" if m.fan_in_fan_out else "Linear"
        rows.append({"module": path, "kind": f"{'DoRA' if active in m.lora_magnitude else 'LoRA'}({kind})",
                     "shape": f"{m.in_features}x{m.out_features}", "r": m.lora_A[active].shape[0],
                     "trainable": trained, "total": n + m.in_features * m.out_features
                     + (m.bias.numel() if m.bias is not None else 0)})
    return ParameterReport(trainable, total, rows)
