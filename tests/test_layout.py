"""The package's shape: layers that import only layers below them, no import circle (lazy imports counted), every
subpackage saying what it holds and may import, classes and functions a reader can hold at once, one definition
of each choice list, CLI flags that reach their recipe keys."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lorakit import config
from lorakit.cli import build_parser
from lorakit.cli.common import overrides

PACKAGE = Path(config.__file__).resolve().parent.parent

# Lowest first. A module may import its own subpackage and any layer below its own, never one beside or above it.
LAYERS = [
    {"errors", "files", "version"},
    {"config"},
    {"engine", "data"},
    {"models"},
    {"training", "inference"},
    {"evaluation", "export", "serve"},
    {"cli"},
    {"__main__"},
]
MAX_CLASS_LINES, MAX_FUNCTION_LINES = 220, 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The lorakit modules a file imports anywhere in it (inside functions too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
            found.add(target)
            if not node.module:  # `from . import x`: x may be a module of the package
                found |= {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorakit"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lorakit")}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in imports(p) if t in files and t != m} for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def unit(module: str) -> str:
    """The layer unit a module belongs to: its subpackage (lorakit.engine.layer -> engine) or its own name."""
    return module.split(".")[1] if module != "lorakit" else ""


def layer(module: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit(module) in units)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """'a -> b' for every import of a unit beside or above the importer's (the root package, the public API, may
    import anything; nothing may import it)."""
    bad = []
    for module, targets in graph.items():
        if module == "lorakit":
            continue
        for target in targets:
            if target == "lorakit" or (unit(target) != unit(module) and layer(target) >= layer(module)):
                bad.append(f"{module} -> {target}")
    return sorted(bad)


def test_every_module_has_a_layer():
    units = {unit(m) for m in import_graph() if m != "lorakit"}
    assert units == set().union(*LAYERS), units ^ set().union(*LAYERS)


def test_nothing_imports_a_layer_beside_or_above_it():
    assert upward_imports(import_graph()) == []


def test_the_layer_check_finds_an_upward_import():
    graph = import_graph()
    graph["lorakit.engine.peft_format"] = graph["lorakit.engine.peft_format"] | {"lorakit.models.loading"}
    graph["lorakit.data.pipeline"] = graph["lorakit.data.pipeline"] | {"lorakit.engine.layer"}  # beside: refused
    assert upward_imports(graph) == ["lorakit.data.pipeline -> lorakit.engine.layer",
                                     "lorakit.engine.peft_format -> lorakit.models.loading"]


def test_no_import_circle_anywhere_in_the_package():
    graph = {m: t - {"lorakit"} for m, t in import_graph().items()}  # the package __init__ re-exports only
    assert len(graph) > 60 and "lorakit.engine.peft_format" in graph["lorakit.models.trained"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_lazy_import_circle():
    graph = import_graph()
    graph["lorakit.engine.peft_format"] = graph["lorakit.engine.peft_format"] | {"lorakit.models.trained"}
    assert find_cycle(graph) is not None


def test_model_loading_loads_models_only():
    assert import_graph()["lorakit.models.loading"] <= {"lorakit.config.choices", "lorakit.errors"}


def test_each_subpackage_says_what_it_holds_and_may_import():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 200 and ("Imports" in doc or "may import" in doc), init


def test_classes_and_functions_fit_on_a_screen():
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            limit = (MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else
                     MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            if limit and node.end_lineno - node.lineno + 1 > limit:
                too_long.append(f"{path.relative_to(PACKAGE)}:{node.name} {node.end_lineno - node.lineno + 1}")
    assert too_long == []


@pytest.mark.parametrize("flag, choices", [("--mixed-precision", config.PRECISIONS), ("--strategy", config.STRATEGIES),
                                           ("--quant-backend", config.QUANT_BACKENDS), ("--method", config.METHODS),
                                           ("--optimizer", config.OPTIMIZERS), ("--quantize", config.QUANTIZE)])
def test_cli_choices_are_the_config_lists(flag, choices):
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions
                 if flag in a.option_strings)
    assert tuple(train.choices) == choices
    for value in choices:
        cfg = config.make_config({train.dest: value})
        assert getattr(cfg, train.dest) == value or (train.dest, value) == ("quantize", "nf4")


def test_every_train_flag_named_for_a_recipe_key_reaches_it():
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    keyed = [a for a in train._actions if a.dest in config.FIELDS]
    assert len(keyed) >= 30
    for action in keyed:
        if action.nargs == 0:  # a switch: it sets the opposite of the default
            args = parser.parse_args(["train", "r", action.option_strings[0]])
            expected = action.const
        else:
            value = (action.choices[-1] if action.choices else "tensorboard,mlflow" if action.dest == "report_to" else
                     {int: "3", float: "0.5"}.get(action.type, "q_proj,v_proj"))
            args = parser.parse_args(["train", "r", action.option_strings[0], value])
            expected = config.coerce(action.dest, action.type(value) if action.type else value, "test")
        got = overrides(args)
        assert action.dest in got, action.option_strings
        if action.dest == "targets":
            expected = ["q_proj", "v_proj"]
        assert config.coerce(action.dest, got[action.dest], "test") == expected, action.option_strings
    assert overrides(parser.parse_args(["train", "r"])) == {}  # nothing given: the recipe's values stand


def test_every_public_name_resolves():
    import lorakit
    assert len(lorakit.__all__) > 25
    for name in lorakit.__all__:
        assert getattr(lorakit, name) is not None, name


def test_module_paths_are_modules_not_names_of_functions():
    """A package re-exporting a function must not shadow a module of the same name (`lorakit.inference.generate`
    is the function; the module is generation.py), or string patches and `import x.y as m` find the wrong thing."""
    import importlib
    for path in PACKAGE.rglob("*.py"):
        module = module_name(path)
        package, _, leaf = module.rpartition(".")
        if path.name != "__init__.py" and package.startswith("lorakit"):
            assert not callable(getattr(importlib.import_module(package), leaf, None)), module
