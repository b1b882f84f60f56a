"""The package's shape, enforced: layers import only downwards, no cycles, no module too large.

The rules are the ones docs/architecture.md draws; this test reads every module's imports (top
level and inside functions alike) from its source, so a violation fails here rather than in a
review. Importing the library layers in a fresh interpreter must not load trio or pyfuse3.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from vhdfs import errors

PACKAGE = Path(__file__).resolve().parents[1] / "vhdfs"
MAX_LINES = 450

# layer -> the layers it may import (besides itself and vhdfs.errors / vhdfs.__init__)
ALLOWED = {
    "block": {"formats"},          # only block.driver.drivers(), lazily: see LAZY below
    "formats": {"block"},
    "tools": {"block", "formats"},
    "aio": {"block"},
    "service": {"block", "formats", "tools"},
    "fs": {"aio", "service", "block"},
    "nbd": {"aio", "block", "formats", "service", "tools"},
    "cli": {"block", "formats", "tools", "aio", "service", "fs", "nbd"},
}
LAZY = {("vhdfs.block.driver", "vhdfs.formats")}   # the registry's one upward reach
NO_TRIO = {"block", "formats", "tools"}
NO_PYFUSE3 = NO_TRIO | {"aio", "service", "nbd"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(absolute module, at top level?) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for node in tree.body:   # `if TYPE_CHECKING:` blocks count as not top level
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top_level.discard(id(node))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            is_top = top and (id(child) in top_level or not isinstance(node, ast.Module))
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, False)
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, False)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, is_top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.append((mod, is_top))
                for a in child.names:   # `from . import spec` names a module
                    found.append((f"{mod}.{a.name}", is_top))
            visit(child, is_top)

    visit(tree, True)
    return found


MODULES = _modules()
IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "vhdfs" and parts[1] in ALLOWED else None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_go_downwards(name: str) -> None:
    layer = _layer(name)
    if layer is None:
        return
    for mod, _top in IMPORTS[name]:
        target = _layer(mod)
        if target is None or target == layer:
            continue
        if (name, mod) in LAZY:
            continue
        assert target in ALLOWED[layer], f"{name} ({layer}) imports {mod} ({target})"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_library_layers_import_neither_trio_nor_pyfuse3(name: str) -> None:
    layer = _layer(name)
    for mod, _top in IMPORTS[name]:
        root = mod.split(".")[0]
        if root == "trio":
            assert layer not in NO_TRIO, f"{name} imports trio"
        if root == "pyfuse3":
            assert layer not in NO_PYFUSE3, f"{name} imports pyfuse3"


def test_formats_do_not_import_each_other() -> None:
    for name, imports in IMPORTS.items():
        if not name.startswith("vhdfs.formats.") or name == "vhdfs.formats":
            continue
        own = name.split(".")[2]
        for mod, _top in imports:
            parts = mod.split(".")
            if parts[:2] == ["vhdfs", "formats"] and len(parts) > 2:
                assert parts[2] == own, f"{name} imports another format: {mod}"


def test_no_import_cycles_at_top_level() -> None:
    graph = {name: {m for m, top in IMPORTS[name] if top and m in MODULES and m != name}
             for name in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if nxt.startswith(node + "."):
                continue   # a package importing its own submodules
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                if not all(c.startswith(cycle[0].rsplit(".", 1)[0]) and c == cycle[0] for c in cycle):
                    raise AssertionError("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name: str) -> None:
    lines = MODULES[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines (split it: one module, one job)"


def test_every_format_package_exports_a_driver() -> None:
    from vhdfs.formats import DRIVERS

    names = [d.name for d in DRIVERS]
    assert len(names) == len(set(names))
    packages = {p.name for p in (PACKAGE / "formats").iterdir() if (p / "__init__.py").exists()}
    assert packages <= set(names), f"format packages without a registry entry: {packages - set(names)}"


def test_block_layer_imports_neither_trio_nor_pyfuse3() -> None:
    """In a fresh interpreter, the library layers load without trio or pyfuse3."""
    mods = [m for m in MODULES if _layer(m) in NO_TRIO]
    code = (
        "import sys, importlib\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'pyfuse3'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("cls", [errors.VhdfsError, errors.FormatError, errors.NotAnImageError,
                                 errors.UnsupportedError, errors.ChainError, errors.ReadOnlyError,
                                 errors.BusyError, errors.UsageError])
def test_every_error_has_one_errno_and_one_exit_code(cls: type[errors.VhdfsError]) -> None:
    exc = cls("something is wrong", "/tmp/x.vhd")
    assert isinstance(exc.errno, int) and exc.errno > 0
    assert isinstance(exc.exit_code, int) and exc.exit_code > 0
    assert str(exc) == "/tmp/x.vhd: something is wrong"
