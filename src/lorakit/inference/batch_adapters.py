"""Which adapters a served model computes with, batch by batch: one adapter for every row, rows mixed by adapter
(`adapters_by_row`), or a packed row's prompts each on its own (`adapters_by_span`), and the C++ step's view of the
model for each, built once and rebuilt only when what the layers hold changes (the engine switches between them at
every prefill and step)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..engine import adapter_in_use, adapters_by_span, disable_adapters, lora_layers
from ..engine.mixed_rows import Span
from ..engine.trained_copies import trained_copies
from .compiled_step import row_masks
from .decode import compiled_view
from .packed_prefill import packs


class BatchAdapters:
    """The adapter settings of `model` for the engine's batches, and the C++ step's views for them."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        self.views: dict[str | None, object] = {}  # the C++ step's view per adapter alone, built once each
        self.rows: list[str | None] | None = None  # the row adapters the layers hold now
        self.rows_view: object = None  # the C++ step's view for those rows (False: none), rebuilt as they change
        self.packed: bool | None = None  # whether prompts prefill as a packed row (packed_prefill.packs), once known
        self.layers: list[nn.Module] | None = None  # the layers holding adapters, once found
        self.mixed: tuple[frozenset, object] = (frozenset(), None)  # the adapters of the last mixed view, and it

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

    def by_span(self, adapters: list[str | None], lengths: list[int]) -> contextlib.AbstractContextManager:
        """Prompt i of a packed row (lengths[i] tokens, in order) through adapter adapters[i] while the context
        lasts, neighbours on one adapter one span (its term one product over them). The rows set by `mix` stay set."""
        spans: list[Span] = []
        end = 0
        for name, n in zip(adapters, lengths):
            start = spans.pop()[1] if spans and spans[-1][0] == name else end
            end += n
            spans.append((name, start, end))
        return adapters_by_span(self.model, spans)

    def packs(self) -> bool:
        """Whether the model's prompts prefill as one packed row (packed_prefill.packs), asked again after a change."""
        if self.packed is None:
            self.packed = packs(self.model)
        return self.packed

    def mix(self, rows: list[str | None] | None) -> None:
        """Row i through adapter rows[i] (None: no rows mixed), set on the layers only when it changes (they set
        their adapters side by side again then; the C++ step's view of them is given the new rows' masks where the
        rows use the same adapters as before, else rebuilt)."""
        if rows == self.rows:
            return
        if self.layers is None:
            self.layers = [layer for _, layer in [*lora_layers(self.model), *trained_copies(self.model)]]
        for layer in self.layers:
            layer.row_adapters = rows
        self.rows, self.rows_view = rows, None
        if rows is not None and self.mixed[0] == frozenset(rows) and self.mixed[1]:  # the same adapters side by side
            try:
                self.mixed[1].set_row_masks(row_masks(self.model, rows))
                self.rows_view = self.mixed[1]
            except RuntimeError:  # masks that do not fit it (some products may hold new ones): a view built anew
                self.mixed = (frozenset(), None)

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
            self.mixed = (frozenset(self.rows), self.rows_view)
        return self.rows_view or None

    def changed(self) -> None:
        """Adapters were loaded or unloaded: every view is built again when next needed, no rows mixed."""
        self.views.clear()
        self.rows, self.rows_view, self.packed, self.layers = None, None, None, None
        self.mixed = (frozenset(), None)
