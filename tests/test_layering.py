"""The import direction stays true: store <- actors <- app, and the product stands alone.

Read from the source with `ast`, so a violation fails here before it can hide behind a
lazy import at run time.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("store", "actors", "app")
ALLOWED = {
    "store": ("kaya.store",),
    "actors": ("kaya.store", "kaya.actors"),
    "app": ("kaya.store", "kaya.actors", "kaya.app"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend(
                (node.lineno, f"{node.module}.{alias.name}")
                if node.module == "kaya"
                else (node.lineno, node.module)
                for alias in node.names
            )
    return found


def python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def test_nothing_imports_the_bare_folders() -> None:
    """`app`, `actors` and `store` exist only as `kaya.*`: a bare import is a second copy."""
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in python_files(*PRODUCT, "tests", "bench", "examples", "kaya")
        for line, name in imports(path)
        if name.split(".")[0] in PRODUCT
    ]
    assert bad == []


@pytest.mark.parametrize("layer", PRODUCT)
def test_each_layer_imports_only_what_lies_below_it(layer: str) -> None:
    allowed = ALLOWED[layer]
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in python_files(layer)
        for line, name in imports(path)
        if name.startswith("kaya") and not name.startswith(allowed)
    ]
    assert bad == []


def test_the_product_imports_no_example_bench_or_test() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in python_files(*PRODUCT, "kaya")
        for line, name in imports(path)
        if name.split(".")[0] in ("examples", "bench", "tests")
    ]
    assert bad == []


@pytest.mark.slow
def test_the_wheel_installs_only_the_kaya_package(tmp_path: Path) -> None:
    source = tmp_path / "source"  # setuptools builds in the source tree: not in ours
    for folder in ("kaya", *PRODUCT):
        shutil.copytree(ROOT / folder, source / folder, symlinks=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("kaya-*.whl")
    tops = {
        name.split("/")[0]
        for name in zipfile.ZipFile(wheel).namelist()
        if not name.split("/")[0].endswith((".dist-info", ".data"))
    }
    assert tops == {"kaya"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "kaya/app/cli/__init__.py" in names
    assert "kaya/app/events/relay.py" in names  # subpackages too
    assert "kaya/store/__init__.py" in names


def module_name(path: Path) -> str:
    parts = ["kaya", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_in_the_product() -> None:
    """Every import counts, lazy and TYPE_CHECKING ones too: a cycle is a tangle either way."""
    modules = {module_name(p): p for p in python_files(*PRODUCT)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for _, imported in imports(path):
            # `from kaya.app.events import relay` names a module; `from x import Y` a symbol
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    assert {"kaya.app.ingress", "kaya.actors"} <= graph["kaya.app.node"]  # the graph is real
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_every_public_name_says_what_it_is() -> None:
    import inspect

    import kaya

    undocumented = [
        name
        for name in kaya.__all__
        if (
            (inspect.isclass(getattr(kaya, name)) or inspect.isfunction(getattr(kaya, name)))
            # a class's own docstring: inspect.getdoc would fall back to its base's
            and len(getattr(kaya, name).__doc__ or "") < 20
        )
        or (name not in vars(kaya))
    ]
    assert undocumented == []
