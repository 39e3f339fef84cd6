"""The README and docs/ stay true: docs/cli.md holds the --help the code prints, the README stays a
front door, links resolve, no path outside the repository, and the Python shown imports what exists."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_LIMIT = 12 * 1024  # bytes
# the commands docs/cli.md documents, at least
COMMANDS = ("train", "bench", "tune", "eval", "report", "data", "sample", "encode", "data export-tables")
# CI parses the set-up commands from the README
SETUP_COMMANDS = (
    "pip install torch==2.13.0 && pip install -e . && turbovae train",
    "pip install torch==2.13.0 && pip install -e '.[dev]' && bash scripts/test.sh",
)

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _help_texts(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """{prog: format_help()} of ``turbovae`` and every subcommand, nested ones included, at 100 columns."""
    monkeypatch.setenv("COLUMNS", "100")  # argparse takes its width from here
    monkeypatch.setenv("NO_COLOR", "1")  # Python 3.14's argparse colours its help otherwise
    from turbovae.cli import build_parser

    texts: dict[str, str] = {}

    def walk(parser: argparse.ArgumentParser) -> None:
        texts[parser.prog] = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in dict.fromkeys(action.choices.values()):
                    walk(sub)

    walk(build_parser())
    return texts


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.MULTILINE)}


def _python_blocks(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8")
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, re.MULTILINE | re.DOTALL)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) for indent, body in blocks]


def test_cli_md_holds_every_commands_help(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = _help_texts(monkeypatch)
    assert {f"turbovae {c}" for c in COMMANDS} | {"turbovae"} <= set(texts)
    cli_md = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    stale = [prog for prog, text in texts.items() if f"```text\n{text.rstrip()}\n```" not in cli_md]
    assert not stale, f"docs/cli.md is out of date for {stale}: run python scripts/cli_doc.py"


def _cli_doc():
    """scripts/cli_doc.py, the generator of docs/cli.md's help and docs/training.md's registry tables."""
    spec = importlib.util.spec_from_file_location("cli_doc", ROOT / "scripts" / "cli_doc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_md_tables_come_from_the_registries() -> None:
    training_md = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert _cli_doc().render_tables(training_md) == training_md, (
        "docs/training.md's tables of models, likelihoods or objectives are out of date: run python "
        "scripts/cli_doc.py"
    )


def _unwrapped(text: str) -> str:
    """Help text as one line: argparse's line breaks undone, words it broke at a hyphen joined again."""
    return " ".join(re.sub(r"-\n\s+", "-", text).split())


def test_every_registry_name_is_in_the_help_and_the_docs(monkeypatch: pytest.MonkeyPatch) -> None:
    from turbovae.likelihoods import LIKELIHOODS
    from turbovae.models import MODELS
    from turbovae.objectives import OBJECTIVES

    train_help = _unwrapped(_help_texts(monkeypatch)["turbovae train"])
    cli_md = _unwrapped((ROOT / "docs" / "cli.md").read_text(encoding="utf-8"))
    training_md = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    for registry in (MODELS, LIKELIHOODS, OBJECTIVES):
        for name in registry:
            entry = re.compile(rf"(?<![\w-]){re.escape(name)}( \(default\))?: ")  # "name: summary"
            assert entry.search(train_help), f"turbovae train --help does not describe {name}"
            assert entry.search(cli_md), f"docs/cli.md does not describe {name}"
            assert f"| `{name}`" in training_md, f"docs/training.md's tables do not list {name}"


def test_cli_md_names_every_preset() -> None:
    from turbovae.config import preset_names

    cli_md = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = [name for name in preset_names() if f"`{name}`" not in cli_md]
    assert not missing, f"docs/cli.md does not list the presets {missing}"


def test_readme_is_a_front_door() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes, more than {README_LIMIT}: move text to docs/"
    text = README.read_text(encoding="utf-8")
    for command in SETUP_COMMANDS:
        assert f"\n{command}\n" in text, f"README.md lost the set-up command {command!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_paths_outside_the_repository(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for bad in ("../shared", "/work/"):
        assert bad not in text, f"{page.relative_to(ROOT)} mentions {bad!r}, a path outside the repository"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_parse_and_import_what_exists(page: Path) -> None:
    for block in _python_blocks(page):
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "turbovae":
                module = importlib.import_module(node.module or "")
                missing = [a.name for a in node.names if not hasattr(module, a.name)]
                assert not missing, f"{page.relative_to(ROOT)}: {node.module} has no {missing}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "turbovae":
                        importlib.import_module(alias.name)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "turbovae"
            ):
                assert hasattr(importlib.import_module("turbovae"), node.attr), (
                    f"{page.relative_to(ROOT)}: turbovae has no {node.attr}"
                )
