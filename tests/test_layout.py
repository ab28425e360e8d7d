"""The package's shape: importing the backend loads nothing of the lab (benchmarks, figures, quality, zoo),
and the library's import graph has no cycle and no arrow from a lower layer to a higher one.

Layers, lowest first: ``ops`` (torch and triton only) < ``passes``, ``policies`` < the runtime
(``config``, ``block_cache``, ``state``, ``schedule``, ``taylor``, ``report``, ``runtime``, ``backend``,
the package root) < ``cli`` < the lab (``bench``, ``zoo``), which nothing below it imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")
#: package prefix -> folder in the repository (pyproject.toml's package-dir mapping)
FOLDERS = {"omni_compile.ops": "ops", "omni_compile.passes": "passes", "omni_compile": "omni_compile"}
LAB = ("omni_compile.bench", "omni_compile.zoo")


def _modules() -> dict:
    """``module name -> path`` of every module of the package."""
    out = {}
    for pkg, folder in FOLDERS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, base)
            parts = [] if rel == "." else rel.split(os.sep)
            if pkg == "omni_compile" and parts[:1] in (["ops"], ["passes"]):
                continue
            for f in files:
                if f.endswith(".py"):
                    name = ".".join([pkg] + parts + ([] if f == "__init__.py" else [f[:-3]]))
                    out[name] = os.path.join(dirpath, f)
    return out


def _imports(name: str, path: str, known: set) -> set:
    """Package modules ``name`` imports anywhere in its file (function-local imports included)."""
    is_pkg = path.endswith("__init__.py")
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            # ``from pkg import module`` loads the module; ``from pkg import name`` the package itself
            targets = subs + ([mod] if len(subs) < len(node.names) else [])
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _layer(name: str) -> int:
    if name.startswith(LAB):
        return 4
    if name == "omni_compile.cli":
        return 3
    if name.startswith("omni_compile.ops"):
        return 0
    if name.startswith(("omni_compile.passes", "omni_compile.policies")):
        return 1
    return 2


def test_importing_the_backend_loads_nothing_of_the_lab():
    code = ("import sys, omni_compile, omni_compile.backend; "
            "print(sorted(m for m in sys.modules if m.startswith(('omni_compile.bench', 'omni_compile.zoo', "
            "'omni_compile.cli', 'PIL', 'diffusers'))))")
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_library_import_graph_has_no_cycle_and_no_upward_arrow():
    mods = _modules()
    assert {"omni_compile.ops.attention", "omni_compile.passes.walk", "omni_compile.runtime",
            "omni_compile.bench.e2e", "omni_compile.zoo.demo"} <= set(mods)
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    upward = sorted((a, b) for a, deps in graph.items() for b in deps
                    if _layer(b) > _layer(a) and not (a == "omni_compile" and b.startswith("omni_compile.ops")))
    assert not upward, f"imports from a lower layer to a higher one: {upward}"
    # a package's __init__ importing its own modules is how it re-exports them; any other way back is a cycle
    library = {m: {d for d in deps if not d.startswith(LAB)} for m, deps in graph.items() if not m.startswith(LAB)}

    def edges(m):
        return [d for d in library.get(m, ()) if not (m.endswith(("omni_compile", ".ops", ".passes", ".policies"))
                                                      and d.startswith(m + "."))]

    state = {}

    def visit(m, path):
        state[m] = 1
        for d in edges(m):
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [m, d])}")
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(library):
        if m not in state:
            visit(m, [])
    # nothing in the library imports its own package root (the root re-exports; a module importing it sees
    # a half-initialised package)
    assert not [m for m, deps in library.items() if "omni_compile" in deps and m != "omni_compile"]
