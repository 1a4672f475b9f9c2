"""The layout's arrows run one way: no import circle inside curvature/ or the ONNX adapter package, core imports
only torch (and the standard library) at module level and never an adapter, and every module imports on its own
in a fresh interpreter.  Static checks read the source with ``ast`` (function-level imports included)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# installed package name -> source folder ([tool.setuptools.package-dir] in pyproject.toml)
ROOTS = {"obs_plugins": REPO / "obs_plugins", "obs_plugins.integrations": REPO / "integrations"}


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the installed tree: name -> (file, is a package)."""
    mods = {}
    for pkg, root in ROOTS.items():
        for f in sorted(root.rglob("*.py")):
            parts = [p for p in f.relative_to(root).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = (f, f.name == "__init__.py")
    return mods


MODULES = _modules()


def _walk(node, into_functions: bool):
    """``ast.walk``, optionally not into function bodies (what runs at import time only)."""
    for child in ast.iter_child_nodes(node):
        yield child
        if into_functions or not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(child, into_functions)


def _imports(name: str, top_level_only: bool = False) -> set[str]:
    """Absolute names ``name`` imports (relative imports resolved; ``from pkg import sub`` -> ``pkg.sub`` when
    ``sub`` is a module)."""
    f, is_pkg = MODULES[name]
    tree = ast.parse(f.read_text())
    here = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in _walk(tree, into_functions=not top_level_only):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES}
            out |= subs or {mod}
            if subs and len(subs) < len(node.names):
                out.add(mod)
    return out


def _cycle(nodes: set[str], edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle among ``nodes`` (a list of modules, first repeated at the end), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if m not in nodes:
                continue
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(nodes):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def _package_graph(pkg: str) -> tuple[set[str], dict[str, set[str]]]:
    """The submodules of ``pkg`` (its ``__init__`` left out: it only re-exports) and their imports of each other."""
    nodes = {m for m in MODULES if m.startswith(pkg + ".")}
    return nodes, {m: _imports(m) & nodes for m in nodes}


def test_cycle_finder_finds_a_known_circle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle({"a", "b", "c", "d"}, edges) == ["a", "b", "c", "a"]
    assert _cycle({"a", "b", "d"}, edges) is None          # c left out: the circle is broken


def test_import_resolution_known_answers():
    assert "obs_plugins.curvature.batching" in _imports("obs_plugins.curvature.core")
    assert "obs_plugins.curvature.fisher" in _imports("obs_plugins.curvature.core")            # function-level
    assert "obs_plugins.curvature.fisher" not in _imports("obs_plugins.curvature.core", top_level_only=True)
    assert "obs_plugins.integrations.onnx.rewrite" in _imports("obs_plugins.integrations.onnx.export")
    assert "obs_plugins.methods.magnitude" in _imports("obs_plugins.methods")     # `from . import magnitude`


@pytest.mark.parametrize("pkg", ["obs_plugins.curvature", "obs_plugins.integrations.onnx"])
def test_no_import_circle_inside_package(pkg):
    nodes, edges = _package_graph(pkg)
    assert len(nodes) >= 5
    assert _cycle(nodes, edges) is None, f"import circle: {' -> '.join(_cycle(nodes, edges))}"


def test_no_import_circle_between_core_modules_at_module_level():
    nodes = {m for m in MODULES if not m.startswith("obs_plugins.integrations")}
    edges = {m: _imports(m, top_level_only=True) & nodes for m in nodes}
    assert _cycle(nodes, edges) is None, f"import circle: {' -> '.join(_cycle(nodes, edges))}"


def test_core_imports_only_torch_and_never_an_adapter_at_module_level():
    allowed = set(sys.stdlib_module_names) | {"torch", "obs_plugins"}
    for m in MODULES:
        if m.startswith("obs_plugins.integrations"):
            continue
        for i in _imports(m, top_level_only=True):
            assert i.split(".")[0] in allowed, f"{m} imports {i} at module level (core imports only torch)"
            assert not i.startswith("obs_plugins.integrations"), f"core module {m} imports the adapter {i}"


def test_every_module_imports_on_its_own():
    """Each module imported first, into a package not yet loaded (torch stays loaded: that is what keeps this
    fast), in one fresh interpreter: an import circle that depends on import order fails here."""
    code = (
        "import importlib, sys, traceback\n"
        "bad = []\n"
        f"for m in {sorted(MODULES)!r}:\n"
        "    for k in [k for k in sys.modules if k == 'obs_plugins' or k.startswith('obs_plugins.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception:\n"
        "        bad.append(m + ': ' + traceback.format_exc(limit=3))\n"
        "print('\\n'.join(bad) or 'ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO.parent)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
