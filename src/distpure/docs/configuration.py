"""``docs/configuration.md``, generated from the experiment's configuration dataclasses: every
YAML key with its type, default and the class's own description. Regenerate with
``python -m distpure.docs.configuration docs/configuration.md``; ``tests/test_docs.py`` fails
when the committed page is stale."""
from __future__ import annotations

import dataclasses
import inspect
import sys
from pathlib import Path

from ..attacks.suite import AttackConfig
from ..defenses.purifier import PurifierConfig
from ..evaluation.config import DataConfig, DefenseConfig, EvaluationConfig, ExperimentConfig, ModelsConfig

# (YAML path of the section, its dataclass), in the order an experiment file reads.
SECTIONS = (("top level", ExperimentConfig), ("data", DataConfig), ("models", ModelsConfig),
            ("evaluation", EvaluationConfig), ("defenses[]", DefenseConfig),
            ("defenses[].purifier", PurifierConfig), ("attacks[]", AttackConfig))

HEADER = """# Configuration reference

What you will find here: every key of an experiment YAML (`distpure evaluate CONFIG`), its type,
its default and what it means, section by section. This page is generated from the dataclasses
that read the YAML (`python -m distpure.docs.configuration docs/configuration.md`); a test fails
when it is stale. Values are checked when the file is read, and an error names the value, its
defence or attack, and the valid choices. `--set` overrides any key, reaching list items by name:
`--set attacks.pgd-eot.eot=8`. Examples: [reproducing.md](reproducing.md) and `configs/`.
"""


def default_text(spec: dataclasses.Field) -> str:
    """The field's default as YAML would spell it, or *required*."""
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section below)"
    else:
        return "*required*"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return '`""`' if value == "" else f"`{value}`"


def type_text(spec: dataclasses.Field) -> str:
    """The field's annotation, its ``|`` escaped for a Markdown table."""
    return str(spec.type).replace("|", "\\|")


def section_lines(path: str, config: type) -> list[str]:
    """One section: its YAML path, the dataclass's docstring, and a table of its keys."""
    rows = [f"| `{spec.name}` | `{type_text(spec)}` | {default_text(spec)} |" for spec in dataclasses.fields(config)]
    doc = inspect.cleandoc(config.__doc__ or "")
    return [f"## `{path}` ({config.__name__})", "", doc, "", "| key | type | default |", "| --- | --- | --- |",
            *rows, ""]


def reference() -> str:
    """The whole page."""
    lines = [HEADER]
    for path, config in SECTIONS:
        lines += section_lines(path, config)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Write the page to the path given (docs/configuration.md), or print it."""
    if argv:
        Path(argv[0]).write_text(reference(), encoding="utf-8")
    else:
        print(reference(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
