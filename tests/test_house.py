"""The house: no source file over 450 lines, and no import circle between distpure's modules
(every import counts, also one inside a function or under ``TYPE_CHECKING``)."""
from __future__ import annotations

import ast
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"
MODULES = {".".join(path.relative_to(SOURCE).with_suffix("").parts).removesuffix(".__init__"): path
           for path in sorted((SOURCE / "distpure").rglob("*.py"))}


def imported(name: str, path: Path) -> set[str]:
    """The distpure modules ``name`` imports (``from .x import y`` counts ``.x.y`` when that is a
    module, else ``.x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return (found & set(MODULES)) - {name}


def test_no_source_file_is_over_450_lines() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 450}
    assert not long, f"split these by concept: {long}"


def test_no_import_circle() -> None:
    graph = {name: imported(name, path) for name, path in MODULES.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import circle: " + " -> ".join(trail[trail.index(name):] + [name]))
        if name not in done:
            for other in sorted(graph[name]):
                visit(other, trail + [name])
            done.add(name)

    for name in graph:
        visit(name, [])


def test_data_flows_one_way_into_the_report():
    """Models, samplers, defences, attacks, evaluation, certification and training never import
    the report or the command line: those sit on top and read what the floors below produce."""
    top = ("distpure.reporting", "distpure.cli")
    floors = ("distpure.models", "distpure.sampling", "distpure.defenses", "distpure.attacks",
              "distpure.evaluation", "distpure.certification", "distpure.training", "distpure.data")
    upward = {name: sorted(m for m in imported(name, path) if m.startswith(top))
              for name, path in MODULES.items() if name.startswith(floors)}
    assert not {name: found for name, found in upward.items() if found}, "imports running back up"
