"""A preference run's reference log-probabilities computed once, before the first step (`precompute_reference`): the
step then runs the policy alone. They are kept in the run directory (reference_logps.safetensors, keyed by the
model, the reference adapter and every pair's tokens), so --resume, or the same run again, does not compute them
again."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import atomic_file
from ..models import adapter_dir
from .preference import reference_logps
from .setup import Run

FILE = "reference_logps.safetensors"


def reference_key(run: Run) -> str:
    """What the reference values depend on: the base, its quantisation, the reference adapter (its weights, so an
    adapter trained again in place counts as another), and the pairs."""
    digest = hashlib.sha1(json.dumps([run.cfg.model, run.cfg.quantize, run.cfg.init_adapter, run.reference]).encode())
    if run.cfg.init_adapter:
        for weights in sorted(adapter_dir(run.cfg.init_adapter).glob("*.safetensors")):
            digest.update(weights.read_bytes())
    for part in (run.data.train, run.data.val):
        for pair in part:
            for ids in (pair.prompt_ids, pair.chosen.input_ids, pair.chosen.labels, pair.rejected.input_ids,
                        pair.rejected.labels):
                digest.update(json.dumps(ids).encode())
        digest.update(b"|")
    return digest.hexdigest()


def precompute_reference(run: Run) -> None:
    """Set every training and validation pair's `reference`, from the run directory's file when it was computed
    for these pairs before, else by running the reference over them (and keeping the result)."""
    key, f = reference_key(run), run.out / FILE
    parts = {"train": run.data.train, "val": run.data.val}
    values = _read(f, key)
    if values is None:
        device = run.accelerator.device
        values = {name: reference_logps(run.model, pairs, run.data.collate, run.cfg.batch_size, run.reference, device,
                                        progress=f"reference log-probs ({name})" if run.main else None)
                  for name, pairs in parts.items() if pairs}
        if run.main:
            run.out.mkdir(parents=True, exist_ok=True)
            with atomic_file(f) as tmp:
                save_file({k: v.contiguous() for k, v in values.items()}, str(tmp), metadata={"key": key})
    else:
        run.log(f"lorakit: reference log-probabilities read from {f} (computed for these pairs before)")
    for name, pairs in parts.items():
        for pair, (chosen, rejected) in zip(pairs, values.get(name, torch.empty(0, 2)).tolist()):
            pair.reference = (chosen, rejected)


def _read(f: Path, key: str) -> dict[str, torch.Tensor] | None:
    if not f.is_file():
        return None
    try:
        with safe_open(str(f), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") != key:
                return None
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception:  # a damaged file is computed again
        return None
