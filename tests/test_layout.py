"""The layout tells the architecture: the library never imports the application around it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "qtta_plugins"
APPLICATION = ("app", "bench")  # the qtta command, the demo and tour; the benchmark harness


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Every module ``path`` imports, resolved to a dotted name under ``qtta_plugins``."""
    package = ".".join(("qtta_plugins", *path.relative_to(ROOT).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_the_library_imports_no_application_module():
    library = [
        p
        for p in ROOT.rglob("*.py")
        if p.relative_to(ROOT).parts[0] not in APPLICATION and p.name != "__main__.py"
    ]
    assert len(library) > 30
    offenders = {
        str(p.relative_to(ROOT)): sorted(
            m for m in imported_modules(p) if m.split(".")[1:2] and m.split(".")[1] in APPLICATION
        )
        for p in library
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_import_resolver_sees_an_application_import():
    # the check above can fail: a method's relative import of the harness resolves to it
    method = ROOT / "methods" / "tent.py"
    assert "qtta_plugins.bench.measure" in imported_modules(method, "from ..bench import measure")
    assert "qtta_plugins.app.tour" in imported_modules(method, "from ..app import tour")
