"""The README and the docs: the README's Python examples run as written, use only the public API and do what their
comments say; the docs build with `mkdocs build --strict` (a broken link or a page missing from the navigation
fails it); the README stays a front page."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_is_a_front_page_that_links_every_docs_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    pages = {p.name for p in (REPO / "docs").glob("*.md")} - {"index.md"}
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", text))
    assert pages <= linked, pages - linked


def test_readme_python_uses_only_the_public_api():
    import lorakit
    for block in python_blocks(README.read_text()):
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorakit"):
                assert node.module == "lorakit", f"the README imports from {node.module}: use `from lorakit import`"
                assert all(hasattr(lorakit, a.name) for a in node.names), [a.name for a in node.names]


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch):
    """Each block runs in order in one namespace, in a fresh directory: the first trains a step and saves, the
    second loads what it saved and generates."""
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "readme"}
    # the openai client's block needs a running server: tests/test_api.py makes the same calls against one
    train, load = [block for block in python_blocks(README.read_text()) if "from openai" not in block]
    exec(compile(train, "README.md python block 1", "exec"), ns)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert ns["loss"].item() > 0 and not hasattr(ns["model"], "lorakit_adapters")  # merged: a plain model
    exec(compile(load, "README.md python block 2", "exec"), ns)
    assert str(ns["parameter_report"](ns["model"])).startswith("trainable 2,442,240 / 136,957,248")  # as commented


def test_docs_build_strict(tmp_path):
    if subprocess.run([sys.executable, "-c", "import mkdocs, material"], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("CI must install mkdocs and mkdocs-material (the test extra)")
        pytest.skip("mkdocs / mkdocs-material not installed (pip install -e '.[test]')")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "engine" / "index.html").is_file()


@pytest.mark.parametrize("problem", ["broken link", "page missing from the navigation"])
def test_docs_strict_build_fails_on(tmp_path, problem):
    """The checks the docs test relies on: a link to a page that does not exist, or a page the navigation leaves
    out, fails the build."""
    if subprocess.run([sys.executable, "-c", "import mkdocs, material"], capture_output=True).returncode:
        pytest.skip("mkdocs not installed")
    import yaml
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# x\n\n" + ("[missing](nowhere.md)\n" if problem == "broken link" else ""))
    if problem != "broken link":
        (docs / "nowhere.md").write_text("# an orphan\n")
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text()) | {"nav": [{"Home": "index.md"}]}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=tmp_path, capture_output=True,
                          text=True, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode != 0 and "nowhere.md" in proc.stderr, proc.stderr[-2000:]
