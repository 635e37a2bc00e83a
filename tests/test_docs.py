"""The README and docs/ as a user meets them: every relative link resolves, every ``distpure``
command and flag they show exists, every Python block marked ``python runnable`` runs, and the
generated configuration reference is current."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from distpure.cli.main import COMMANDS, main
from distpure.docs.configuration import reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?:^|[\s/(])distpure ([a-z][\w-]*)([^\n]*)")


def page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block."""
    return [(info.strip(), body) for info, body in FENCE.findall(text)]


def shell_snippets(text: str) -> list[str]:
    """The code a reader may type: inline code spans and fenced blocks that are not Python or YAML."""
    prose = FENCE.sub("", text)
    blocks = [body for info, body in fenced_blocks(text) if not info.startswith(("python", "yaml"))]
    return [*SPAN.findall(prose), *blocks]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page: Path) -> None:
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page_id(page)} links to {target}, which does not exist"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_and_flag_shown_exists(page: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shown = [(match.group(1), re.findall(r"(?<![\w-])--[a-z][\w-]*", match.group(2)))
             for snippet in shell_snippets(page.read_text(encoding="utf-8"))
             for match in COMMAND.finditer(snippet)]
    for command, flags in shown:
        assert command in COMMANDS, f"{page_id(page)} shows `distpure {command}`, which does not exist"
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = capsys.readouterr().out
        for flag in flags:
            assert flag in help_text, f"{page_id(page)} shows `distpure {command} {flag}`, not in its --help"


def runnable_blocks() -> list[tuple[str, str]]:
    return [(f"{page_id(page)}#{number}", body) for page in PAGES
            for number, (info, body) in enumerate(fenced_blocks(page.read_text(encoding="utf-8")))
            if info == "python runnable"]


@pytest.mark.parametrize("name, code", runnable_blocks(), ids=[name for name, _ in runnable_blocks()])
def test_runnable_python_block_runs(name: str, code: str, require_shared, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks read CIFAR-10 at ``../shared/data/cifar10-jpeg`` from the repository root, as a
    user of a fresh clone does; they are written to run in seconds (two images, one step)."""
    require_shared("data/cifar10-jpeg")
    monkeypatch.chdir(ROOT)
    exec(compile(code, name, "exec"), {"__name__": "__docs__"})


def test_configuration_reference_is_current() -> None:
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text(encoding="utf-8") == reference(), (
        "docs/configuration.md is stale: python -m distpure.docs.configuration docs/configuration.md")
