"""The package's layers, checked on its source: no import cycles (lazy imports included), only
the composition root reads command-line options, and no private name crosses a module."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "beam_curator"
# Modules that may read CuratorOptions: the command line and its composition root, and the
# two modules that record the options a run was made with.
OPTION_READERS = {"beam_curator.cli", "beam_curator.pipelines", "beam_curator.options",
                  "beam_curator.outputs", "beam_curator.ownership", "beam_curator.__main__"}


def modules() -> dict:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, known: dict):
    """(module imported, names imported from it) for every import in the file, lazy too."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield (sub, None) if sub in known else (base, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None


def graph() -> dict:
    known = modules()
    return {name: {(target, item) for target, item in imports(name, path, known)
                   if target in known and target != name}
            for name, path in known.items()}


def test_no_import_cycles():
    edges = {m: {t for t, _ in targets} for m, targets in graph().items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


def test_only_the_composition_root_reads_options():
    readers = sorted(m for m, targets in graph().items()
                     if any(t in ("beam_curator.options", "beam_curator.pipelines",
                                  "beam_curator.cli") for t, _ in targets))
    assert set(readers) <= OPTION_READERS, set(readers) - OPTION_READERS
    # transforms and the pure algorithms in particular
    assert not [m for m in readers if m.startswith(("beam_curator.transforms",
                                                    "beam_curator.dedup"))]


def test_no_private_name_is_imported_across_modules():
    crossing = sorted((m, t, item) for m, targets in graph().items() for t, item in targets
                      if item and item.startswith("_") and not item.startswith("__"))
    assert crossing == []
