"""The project's modules import each other without cycles and without private names.

A cycle closed inside functions (a dispatcher importing the families that import it back) works
until someone moves an import to the top; a `_private` name imported from another module is a
contract nobody declared. Both are read from the source with `ast`, so nothing is imported here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("export", "services")
FIRST_PARTY = (*PACKAGES, "zoo")
# Packages whose modules may sit on no cycle: all of them (services/ had one until its runtime
# factory stopped reaching for the process-global metrics).
ACYCLIC = PACKAGES


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, name: str) -> list[tuple[str, str | None, int]]:
    """(imported module, imported name or None, line) for every import in the file, at any depth
    (function bodies included); relative imports resolved against the module's package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def first_party(module: str) -> bool:
    return module.split(".")[0] in FIRST_PARTY


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (`from package import module` counts as the module)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for module, imported, _ in imports(path, name):
            target = f"{module}.{imported}" if imported and f"{module}.{imported}" in known else module
            if target in known and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert [c for c in cycles(import_graph()) if any(m.split(".")[0] in ACYCLIC for m in c)] == []


def test_no_private_names_from_other_modules():
    known = modules()
    private = [f"{known[name].relative_to(ROOT)}:{line}: {imported} from {module}"
               for name in known for module, imported, line in imports(known[name], name)
               if first_party(module) and module != name and imported and imported.startswith("_")
               and not imported.startswith("__") and f"{module}.{imported}" not in known]
    assert private == []


def test_the_checks_see_imports_in_functions(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("def late():\n    from export.core import _hidden\n")
    assert imports(source, "export.probe") == [("export.core", "_hidden", 2)]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
