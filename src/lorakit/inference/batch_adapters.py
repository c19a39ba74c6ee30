"""Which adapters a served model computes with, batch by batch: one adapter for every row, or rows mixed by adapter
(`adapters_by_row`), and the C++ step's view of the model for each, built once and rebuilt only when what the
layers hold changes (the engine switches between them at every prefill and step)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..engine import adapter_in_use, disable_adapters, lora_layers
from ..engine.trained_copies import trained_copies
from .decode import compiled_view


class BatchAdapters:
    """The adapter settings of `model` for the engine's batches, and the C++ step's views for them."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        self.views: dict[str | None, object] = {}  # the C++ step's view per adapter alone, built once each
        self.rows: list[str | None] | None = None  # the row adapters the layers hold now
        self.rows_view: object = None  # the C++ step's view for those rows (False: none), rebuilt as they change

    def alone(self, name: str | None) -> contextlib.AbstractContextManager:
        """Every row through adapter `name` (None: the base) while the context lasts."""
        self.mix(None)
        return disable_adapters(self.model) if name is None else adapter_in_use(self.model, name)

    def by_row(self, rows: list[str | None]) -> contextlib.AbstractContextManager:
        """Row i through adapter rows[i] while the context lasts: that adapter alone when all rows ask for one."""
        if len(set(rows)) == 1:
            return self.alone(rows[0])
        self.mix(rows)
        return contextlib.nullcontext()

    def mix(self, rows: list[str | None] | None) -> None:
        """Row i through adapter rows[i] (None: no rows mixed), set on the layers only when it changes (they set
        their adapters side by side again then, and the C++ step's view of them is rebuilt)."""
        if rows == self.rows:
            return
        for _, layer in [*lora_layers(self.model), *trained_copies(self.model)]:
            layer.row_adapters = rows
        self.rows, self.rows_view = rows, None

    def view(self, name: str | None):
        """The C++ step's view with adapter `name` alone (None: the base)."""
        if name not in self.views:
            with self.alone(name):
                self.views[name] = compiled_view(self.model, self.dtype)
        return self.views[name]

    def mixed_view(self):
        """The C++ step's view for the rows set by `mix` (None where it cannot describe them)."""
        if self.rows_view is None:
            self.rows_view = compiled_view(self.model, self.dtype) or False
        return self.rows_view or None

    def changed(self) -> None:
        """Adapters were loaded or unloaded: every view is built again when next needed, no rows mixed."""
        self.views.clear()
        self.rows, self.rows_view = None, None
