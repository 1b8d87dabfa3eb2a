"""The package's import graph: no cycle, and no import from a lower layer of the data flow to a higher one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lacy_stream"

# What each part of the package must not import (directly, at any place in the module).
FORBIDDEN = {
    "lacy_stream.shards": ("annotate", "data", "loss", "model", "train", "parallelize", "checkpoint", "metrics",
                           "export", "inference", "eval", "cli", "gpu_check"),
    "lacy_stream.annotate": ("data", "train", "parallelize", "checkpoint", "metrics", "export", "inference", "eval",
                             "cli", "gpu_check"),
    "lacy_stream.data": ("train", "parallelize", "checkpoint", "metrics", "export", "inference", "eval", "cli",
                         "gpu_check"),
    "lacy_stream.loss": ("shards", "annotate", "data", "train", "parallelize", "checkpoint", "inference", "eval",
                         "cli"),
    "lacy_stream": ("cli",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The lacy_stream modules ``path`` imports (``top_level_only``: at import time, not inside functions)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # TYPE_CHECKING blocks import nothing at run time
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lacy_stream")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("lacy_stream"):
                found.add(target)
                found |= {f"{target}.{alias.name}" for alias in node.names if _is_module(f"{target}.{alias.name}")}
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def test_no_lower_layer_imports_a_higher_one():
    violations = []
    for module, path in all_modules().items():
        if module == "lacy_stream.__main__":
            continue
        for layer, forbidden in FORBIDDEN.items():
            if module != layer and not module.startswith(layer + "."):
                continue
            for target in imports(path):
                if any(target == f"lacy_stream.{name}" or target.startswith(f"lacy_stream.{name}.") for name in forbidden):
                    violations.append(f"{module} imports {target}")
    assert not violations, "\n".join(sorted(set(violations)))


def test_no_import_cycle_at_import_time():
    modules = all_modules()
    graph = {module: {target for target in imports(path, top_level_only=True) if target in modules and target != module}
             for module, path in modules.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(module: str, trail: list[str]) -> bool:
        state[module] = 1
        for target in graph[module]:
            # a package's __init__ importing its own submodules is how packages re-export, not a cycle
            if module.endswith(".__init__") or target.startswith(module + "."):
                continue
            if state.get(target) == 1:
                cycle.extend(trail[trail.index(target):] + [target] if target in trail else [module, target])
                return True
            if state.get(target) is None and visit(target, trail + [target]):
                return True
        state[module] = 2
        return False

    for module in graph:
        if state.get(module) is None and visit(module, [module]):
            break
    assert not cycle, " -> ".join(cycle)


def test_every_module_of_the_readme_data_flow_table_exists():
    readme = (PACKAGE.parent / "README.md").read_text()
    table = readme.split("## The data flow", 1)[1].split("\n\n| stage |", 1)[1].split("\n\n", 1)[0]
    checked = 0
    for row in table.splitlines()[2:]:
        cell = row.split("|")[2]
        first, *others = [name.strip("` ") for name in cell.split(",")]
        directory = Path(first).parent
        for name in [first, *(str(directory / other) for other in others if other)]:
            assert (PACKAGE.parent / name).exists(), f"README data-flow table: {name} does not exist"
            checked += 1
    assert checked > 25
