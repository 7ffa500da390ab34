"""The architecture stays readable: no import cycles and no imports of another module's private names inside
vlkit (its core, demos and the bundled plugins), core never names a plugin, and `vlkit --help` stays light."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# import name of each source root
ROOTS = {"vlkit": REPO / "vlkit", "vlkit.demos": REPO / "demos",
         **{p.name: p for p in sorted((REPO / "plugins").iterdir()) if (p / "__init__.py").is_file()}}
PLUGIN_PACKAGES = sorted(name for name in ROOTS if name.startswith("vlkit_"))


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, root in ROOTS.items():
        for f in sorted(root.rglob("*.py")):
            parts = [pkg, *f.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import of the file, at any depth
    (function-level imports included: a lazy import is still a dependency), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, str | None, int]] = []

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((m, None, child.lineno) for a in child.names if (m := owner(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    if full in mods:
                        found.append((full, None, child.lineno))
                    elif m := owner(base):
                        found.append((m, alias.name, child.lineno))
            visit(child)

    visit(tree)
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    mods = _modules()
    edges: dict[str, set[str]] = {}
    private = []
    for name, path in mods.items():
        edges[name] = set()
        for target, attr, line in _imports(name, path, mods):
            if target != name:
                edges[name].add(target)
            if attr and attr.startswith("_") and not attr.startswith("__") and target != name:
                private.append(f"{path.relative_to(REPO)}:{line} imports {target}.{attr}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_checker_sees_a_cycle_and_a_private_import():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    mods = {"p": REPO / "x.py", "p.m": REPO / "x.py", "p.n": REPO / "x.py"}
    src = "from p.m import _hidden, shown\nif TYPE_CHECKING:\n    from p.n import Thing\ndef f():\n    import p.n\n"
    tmp = REPO / "tests" / "_layout_probe.py"
    try:
        tmp.write_text(src)
        found = _imports("p.k", tmp, mods)
    finally:
        tmp.unlink()
    assert ("p.m", "_hidden", 1) in found and ("p.n", None, 5) in found
    assert not any(line == 3 for *_, line in found)  # TYPE_CHECKING imports are not dependencies


def test_no_import_cycles():
    cycles = _cycles(_graph()[0])
    assert not cycles, "import cycles (break them by moving the shared part into its own module):\n" + \
        "\n".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_names():
    private = _graph()[1]
    assert not private, "private names imported across modules (make them public or move them):\n" + \
        "\n".join(private)


def test_core_never_names_a_plugin():
    """vlkit's core and demos reach plugins only through the registry and the plugin contract."""
    mods = _modules()
    pattern = re.compile(r"\b(?:" + "|".join(PLUGIN_PACKAGES) + r")\b|get_plugin\(\s*[\"']")
    offenders = []
    for name, path in mods.items():
        if name.split(".")[0] != "vlkit":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code):
                offenders.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "core code naming a plugin:\n" + "\n".join(offenders)


@pytest.mark.parametrize("argv", [["--help"], ["plugins"]])
def test_cli_help_and_plugin_listing_do_not_import_torch_or_plugins(argv, tmp_path):
    heavy = ("torch", "open_clip", "transformers", *PLUGIN_PACKAGES)
    code = (f"import sys; from vlkit.cli import main; rc = main({argv!r}); "
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}); print('HEAVY', heavy); "
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]
