"""The package's structure: every import points down, no import cycles, a torch-free bottom.

Floors, bottom to top (issue 11, design.md "Layers"): ``errors`` -> ``contracts`` (torch-free on-disk
contracts) -> ``runtime`` / ``kernels`` -> ``calib`` / ``model`` -> ``export`` -> ``backends`` (the one
backend factory) -> ``eval`` / ``bench`` / ``serve`` / ``segmenter`` -> ``cli``. A module may import
its own package and anything on a lower floor; a package on the same floor only where
``SIBLINGS`` lists it. Every import counts, lazy ones inside functions included (a lazy import
is still a dependency); only ``if TYPE_CHECKING:`` blocks are left out.

The imports are read with ``ast`` from the source, so the test needs none of the heavy packages.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gsnet_deploy"
ROOT = "gsnet_deploy"

# first component under gsnet_deploy -> floor (higher imports lower)
FLOORS: dict[str, int] = {
    "errors": 0,
    "contracts": 1,
    "runtime": 2,
    "kernels": 2,
    "encoded_cache": 2,  # numpy-only LRU of encoded images, used by segmenter
    "calib": 3,
    "model": 3,
    "export": 4,
    "backends": 5,
    "eval": 6,
    "bench": 6,
    "serve": 6,
    "segmenter": 6,
    "cli": 7,
}
# imports allowed between different packages of one floor: (importer, imported)
SIBLINGS: frozenset[tuple[str, str]] = frozenset()

# lazy imports left out of the cycle check, each with its reason
LAZY_DISPATCH: frozenset[tuple[str, str]] = frozenset(
    {
        # FIXME(structure): the public wrapper picks the Triton kernel at call time, and the kernel
        # module imports the wrapper's constants and input checks back; those could move to a small
        # module both import (kernels/* belongs to the TensorRT helper).
        (f"{ROOT}.kernels.cost_volume", f"{ROOT}.kernels.triton_cost_volume"),
    }
)

HEAVY = ("torch", "onnx", "onnxruntime", "modelopt", "tensorrt", "triton", "rasterio")
TORCH_FREE = ("contracts", "runtime")  # never import a HEAVY package at module level
RASTERIO_ONLY_IN = {f"{ROOT}.runtime.raster"}


@dataclass(frozen=True)
class Import:
    """One import statement of a module."""

    importer: str  # dotted module name
    imported: str  # dotted module name (a submodule where ``from package import submodule``)
    line: int
    module_level: bool  # False inside a function or class body


def module_name(path: Path) -> str:
    """Dotted name of a source file of the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, depth: int) -> Iterator[tuple[ast.AST, int]]:
    """Every node under ``node`` with its function/class depth, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            for other in child.orelse:
                yield other, depth
                yield from _walk(other, depth)
            continue
        inner = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        yield child, inner
        yield from _walk(child, inner)


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    """Absolute module of a ``from ... import`` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def module_imports(path: Path, source: str | None = None) -> list[Import]:
    """Every import of one module (``from pkg import submodule`` names the submodule)."""
    importer = module_name(path)
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    found: list[Import] = []
    for node, depth in _walk(tree, 0):
        if isinstance(node, ast.Import):
            found += [Import(importer, alias.name, node.lineno, depth == 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, path.name == "__init__.py", node)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = base.startswith(ROOT) and _source_of(candidate) is not None
                found.append(Import(importer, candidate if is_module else base, node.lineno, depth == 0))
    return found


def _source_of(module: str) -> Path | None:
    parts = module.split(".")
    file, package = REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")
    return file if file.is_file() else package if package.is_file() else None


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def unit(module: str) -> str:
    """The floor unit of a package module: its first component under ``gsnet_deploy``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def floor_problems(imports: list[Import]) -> list[str]:
    """Imports that point up, sideways without a ``SIBLINGS`` entry, or from a module with no floor."""
    problems = []
    for imp in imports:
        if not imp.imported.startswith(ROOT + "."):
            continue  # third-party, or the package root (``import gsnet_deploy`` for ``__version__``)
        src, dst = unit(imp.importer), unit(imp.imported)
        if src == "":  # gsnet_deploy/__init__.py: the lazy public API on top of everything
            continue
        if src not in FLOORS or dst not in FLOORS:
            problems.append(f"{imp.importer}:{imp.line} -> {imp.imported}: add {src or dst!r} to FLOORS")
        elif src != dst and (FLOORS[dst] > FLOORS[src] or (FLOORS[dst] == FLOORS[src] and (src, dst) not in SIBLINGS)):
            problems.append(f"{imp.importer}:{imp.line} imports {imp.imported} (floor {FLOORS[src]} -> {FLOORS[dst]})")
    return problems


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the module graph, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def import_graph(imports: list[Import]) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``LAZY_DISPATCH`` edges left out when lazy)."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.imported.startswith(ROOT + ".") or imp.imported == imp.importer:
            continue
        if not imp.module_level and (imp.importer, imp.imported) in LAZY_DISPATCH:
            continue
        edges.setdefault(imp.importer, set()).add(imp.imported)
    return edges


def heavy_problems(imports: list[Import]) -> list[str]:
    problems = []
    for imp in imports:
        top = imp.imported.split(".")[0]
        if top == "rasterio" and imp.importer not in RASTERIO_ONLY_IN:
            problems.append(f"{imp.importer}:{imp.line} imports rasterio; only runtime/raster.py may")
        if unit(imp.importer) in TORCH_FREE and imp.module_level and top in HEAVY and top != "rasterio":
            problems.append(f"{imp.importer}:{imp.line} imports {top} at module level; import it inside the function")
    return problems


@pytest.fixture(scope="module")
def all_imports() -> list[Import]:
    return [imp for path in package_modules() for imp in module_imports(path)]


def test_structure_imports_point_down(all_imports: list[Import]) -> None:
    assert floor_problems(all_imports) == []


def test_structure_has_no_import_cycles(all_imports: list[Import]) -> None:
    assert find_cycle(import_graph(all_imports)) is None


def test_structure_torch_free_bottom_and_one_rasterio_module(all_imports: list[Import]) -> None:
    assert heavy_problems(all_imports) == []


def test_structure_every_package_module_has_a_floor() -> None:
    units = {unit(module_name(p)) for p in package_modules()} - {""}
    assert sorted(units - set(FLOORS)) == []


# ---- the checks themselves fail on bad imports (each one: a line added to a real module) ----


def _with_extra_line(relative: str, line: str) -> list[Import]:
    path = PACKAGE / relative
    return module_imports(path, path.read_text(encoding="utf-8") + "\n" + line + "\n")


@pytest.mark.parametrize(
    ("relative", "line", "needle"),
    [
        ("runtime/tensorrt_backend.py", "from gsnet_deploy.export import trt", "floor 2 -> 4"),  # runtime -> export
        ("calib/quantize.py", "from gsnet_deploy.export.fp16 import make_fp16_onnx", "floor 3 -> 4"),  # calib -> export
        ("contracts/derived.py", "def f():\n    from gsnet_deploy.runtime import tiling", "floor 1 -> 2"),  # lazy, still up
        ("model/gsnet.py", "from gsnet_deploy.calib import views", "floor 3 -> 3"),  # sideways, not listed
    ],
)
def test_structure_floor_check_catches_an_upward_import(relative: str, line: str, needle: str) -> None:
    problems = floor_problems(_with_extra_line(relative, line))
    assert any(needle in p for p in problems), problems


def test_structure_floor_check_ignores_type_checking_imports() -> None:
    line = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gsnet_deploy.export import trt"
    assert floor_problems(_with_extra_line("runtime/tensorrt_backend.py", line)) == []


def test_structure_cycle_check_catches_a_cycle(all_imports: list[Import]) -> None:
    extra = _with_extra_line("runtime/stretch.py", "def f():\n    from gsnet_deploy.runtime import images")
    graph = import_graph([*all_imports, *extra])  # images -> stretch -> images
    cycle = find_cycle(graph)
    assert cycle is not None and {f"{ROOT}.runtime.images", f"{ROOT}.runtime.stretch"} <= set(cycle)


@pytest.mark.parametrize(
    ("relative", "line"),
    [
        ("runtime/tiling.py", "import torch"),
        ("contracts/atomic.py", "import onnx"),
        ("runtime/images.py", "def f():\n    import rasterio"),  # rasterio, even lazily, outside raster.py
    ],
)
def test_structure_heavy_check_catches_a_heavy_import(relative: str, line: str) -> None:
    assert heavy_problems(_with_extra_line(relative, line)) != []


def test_structure_heavy_check_allows_lazy_imports() -> None:
    assert heavy_problems(_with_extra_line("runtime/tiling.py", "def f():\n    import onnxruntime")) == []


# ---- and at run time: every runtime and contracts module imports with torch blocked ----


def test_structure_runtime_and_contracts_import_with_torch_blocked() -> None:
    modules = sorted(module_name(p) for p in package_modules() if unit(module_name(p)) in TORCH_FREE)
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx", "modelopt", "tensorrt", "triton"):
                    raise ImportError(name + " is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        for name in {modules!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "modelopt", "tensorrt"))
        assert not loaded, loaded
        print("ok", len({modules!r}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"ok {len(modules)}"
