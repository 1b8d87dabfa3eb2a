"""The package's import graph: every module in a declared layer, no import from a lower layer to a higher one, no
cycle, counting every import (inside functions and under ``TYPE_CHECKING`` too); and what a dataloader worker
loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lacy_stream"

LAYERS: list[tuple[str, ...]] = [
    ("labels", "atomic", "stop_signals", "logs", "distributed", "markdown", "html_page"),
    ("config", "tokenizer", "checkpoint"),
    ("shards",),
    ("annotate",),
    ("data",),
    ("loss", "models"),
    ("inference",),
    ("trainer",),
    ("eval",),
    ("bench",),
    ("cli",),
    ("__main__",),
]
"""The data flow from the bottom up: a part imports parts of lower layers, and within its own layer only itself."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every lacy_stream module ``path`` imports, wherever the import statement stands."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lacy_stream")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lacy_stream"):
                continue
            submodules = {f"{target}.{alias.name}" for alias in node.names if _is_module(f"{target}.{alias.name}")}
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in ``target`` itself
                found.add(target)
    return found - {module}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def part_of(module: str) -> str:
    """``lacy_stream.shards.specs`` -> ``shards``; the package itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def layer_of(part: str) -> int | None:
    return next((number for number, layer in enumerate(LAYERS) if part in layer), None)


def test_every_module_has_a_layer():
    unplaced = sorted({part_of(module) for module in all_modules()} - {""} - {part for layer in LAYERS for part in layer})
    assert not unplaced, f"add {unplaced} to LAYERS where they stand in the data flow"


def test_no_part_imports_a_higher_layer_or_a_neighbour():
    violations = []
    for module, path in all_modules().items():
        part = part_of(module)
        if not part:
            continue
        for target in imports(path):
            other = part_of(target)
            if other == part or not other:
                continue
            if layer_of(other) >= layer_of(part):
                violations.append(f"{module} imports {target} ({other} is not below {part})")
    assert not violations, "\n".join(sorted(violations))


def test_no_import_cycle_anywhere():
    """Strongly connected components of the whole graph; a package importing its own submodules in its
    ``__init__`` (re-exporting them) is no cycle."""
    modules = all_modules()
    graph = {
        module: {target for target in imports(path) if target in modules and not target.startswith(module + ".")}
        for module, path in modules.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for module in graph:
        if module not in index:
            connect(module)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


@pytest.mark.slow
def test_a_dataloader_worker_loads_no_loss_model_or_trainer():
    program = ("import sys, lacy_stream.data.loader\n"
               "print(' '.join(sorted(name for name in sys.modules if name.startswith('lacy_stream'))))")
    loaded = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout.split()
    assert "lacy_stream.data.loader" in loaded
    assert not [name for name in loaded if part_of(name) in ("loss", "models", "trainer", "inference", "eval", "cli")]


def test_every_module_of_the_architecture_table_exists():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    table = page.split("\n\n| stage |", 1)[1].split("\n\n", 1)[0]
    checked = 0
    for row in table.splitlines()[2:]:
        cell = row.split("|")[2]
        first, *others = [name.strip("` ") for name in cell.split(",")]
        directory = Path(first).parent
        for name in [first, *(str(directory / other) for other in others if other)]:
            assert (PACKAGE.parent / name).exists(), f"docs/architecture.md: {name} does not exist"
            checked += 1
    assert checked > 25
