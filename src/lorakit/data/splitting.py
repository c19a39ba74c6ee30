"""Splitting records into train / validation / test: stratified by a key, reproducible from the seed."""
from __future__ import annotations

import random

from ..errors import DataError


def stratified_split(items: list, key, fractions=(0.7, 0.1, 0.2), seed: int = 42) -> dict[str, list]:
    """Split `items` into train/val/test with each key group cut in the given proportions."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = random.Random(seed)
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    out: dict[str, list] = {"train": [], "val": [], "test": []}
    for k in sorted(groups):
        g = groups[k][:]
        rng.shuffle(g)
        n_train, n_val = round(len(g) * fractions[0]), round(len(g) * fractions[1])
        out["train"] += g[:n_train]
        out["val"] += g[n_train:n_train + n_val]
        out["test"] += g[n_train + n_val:]
    for part in out.values():
        rng.shuffle(part)
    return out
