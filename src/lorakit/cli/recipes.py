"""`lorakit recipes`: the built-in recipes, listed with a line each, shown, or copied to edit (as `tune cp` does)."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

from ..config import RECIPES, builtin_recipes, recipe_file
from ..errors import UserError


def describe(path: Path) -> tuple[str, str, str]:
    """(model, task, the first comment line) of a recipe file."""
    text = path.read_text()
    raw = yaml.safe_load(text) or {}
    section = raw.get("model") if isinstance(raw.get("model"), dict) else raw
    first = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
    return str(section.get("model", "smollm2")), str(section.get("task", "instruct")), first


def cmd_recipes(args: argparse.Namespace) -> int:
    """List the built-in recipes (name, model, task, what it is); `show NAME` prints one, `copy NAME [DEST]` copies
    it to edit, then `lorakit train DEST`."""
    action = getattr(args, "action", None) or "list"
    if action == "show":
        print(recipe_file(args.name).read_text(), end="")
        return 0
    if action == "copy":
        return copy_recipe(args.name, args.dest, args.force)
    files = builtin_recipes()
    if not files:
        raise UserError(f"no recipes found in {RECIPES}; is lorakit installed whole?")
    for f in files:
        model, task, what = describe(f)
        print(f"{f.stem:<30} {model:<36} {task:<10} {what}")
    return 0


def copy_recipe(name: str, dest: str | None, force: bool) -> int:
    source = recipe_file(name)
    target = Path(dest) if dest else Path(f"{source.stem}.yaml")
    if target.is_dir():
        target = target / f"{source.stem}.yaml"
    if target.exists() and not force:
        raise UserError(f"{target} exists; give another DEST or pass --force to replace it")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: no such directory")
    shutil.copyfile(source, target)
    print(f"lorakit: {source.stem} -> {target}; edit it, then: lorakit train {target}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("recipes", help="the built-in recipes: list, show NAME, copy NAME [DEST]",
                       description=cmd_recipes.__doc__)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", help="the built-in recipes, a line each (the default)")
    show = actions.add_parser("show", help="print a recipe")
    show.add_argument("name", help="a built-in recipe's name or a recipe file")
    copy = actions.add_parser("copy", help="copy a recipe to edit (default ./NAME.yaml)")
    copy.add_argument("name", help="a built-in recipe's name or a recipe file")
    copy.add_argument("dest", nargs="?", help="a file or a directory (default ./NAME.yaml)")
    copy.add_argument("--force", action="store_true", help="replace DEST if it exists")
    p.set_defaults(func=cmd_recipes)
