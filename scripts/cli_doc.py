"""Regenerate the parts of the docs made from the code: the command reference in docs/cli.md (the
``--help`` of ``turbovae`` and of every subcommand) and the tables of models, likelihoods and objectives
in docs/training.md (from the registries MODELS, LIKELIHOODS and OBJECTIVES).

    python scripts/cli_doc.py            # rewrite the generated parts of docs/cli.md and docs/training.md
    python scripts/cli_doc.py --check    # exit 1 if either is out of date
    python scripts/cli_doc.py --print    # print the generated parts instead

The help is formatted at a fixed width (COLUMNS=100) and without colour, so that the text does not
depend on the terminal; tests/test_docs.py checks that the docs hold exactly this text.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

COLUMNS = "100"
BEGIN = "<!-- BEGIN GENERATED HELP: python scripts/cli_doc.py -->"
END = "<!-- END GENERATED HELP -->"
DOCS = Path(__file__).resolve().parent.parent / "docs"
CLI_MD = DOCS / "cli.md"
TRAINING_MD = DOCS / "training.md"


def help_texts() -> dict[str, str]:
    """``{prog: help text}`` for ``turbovae`` and every subcommand, nested ones included, in the order
    ``turbovae --help`` lists them."""
    os.environ["COLUMNS"] = COLUMNS  # argparse reads the width from the environment
    os.environ["NO_COLOR"] = "1"  # Python 3.14's argparse colours its help otherwise
    from turbovae.cli import build_parser

    texts: dict[str, str] = {}

    def walk(parser: argparse.ArgumentParser) -> None:
        texts[parser.prog] = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in dict.fromkeys(action.choices.values()):  # aliases once
                    walk(sub)

    walk(build_parser())
    return texts


def render(texts: dict[str, str]) -> str:
    """The generated part of docs/cli.md, markers included."""
    parts = [BEGIN, ""]
    for prog, text in texts.items():
        parts += [f"### `{prog}`", "", "```text", text.rstrip("\n"), "```", ""]
    parts.append(END)
    return "\n".join(parts)


def updated(document: str, generated: str, begin: str = BEGIN, end: str = END) -> str:
    """``document`` with the part between the markers ``begin`` and ``end`` replaced by ``generated``."""
    start, stop = document.find(begin), document.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"the markers {begin!r} and {end!r} are missing")
    return document[:start] + generated + document[stop + len(end) :]


def markers(table: str) -> tuple[str, str]:
    begin = f"<!-- BEGIN GENERATED {table.upper()}: python scripts/cli_doc.py -->"
    return begin, f"<!-- END GENERATED {table.upper()} -->"


def registry_tables() -> dict[str, str]:
    """``{name: Markdown table}`` of the models, likelihoods and objectives, from their registries: a
    row per entry, its one-line summary (and a model's own options)."""
    from turbovae.commands.options import summary_of
    from turbovae.config import Config
    from turbovae.likelihoods import LIKELIHOODS
    from turbovae.models import MODELS
    from turbovae.objectives import OBJECTIVES

    defaults = Config()

    def table(registry: dict, default: str, options: bool = False) -> str:
        rows = [
            "| name | what |" + (" its own options |" if options else ""),
            "|---|---|" + ("---|" if options else ""),
        ]
        for key, entry in registry.items():
            own = " | " + ", ".join(f"`model.{o}`" for o in entry.config.options()) if options else ""
            rows.append(f"| `{key}`{' (default)' if key == default else ''} | {summary_of(entry)}{own} |")
        return "\n".join(rows)

    return {
        "models": table(MODELS, defaults.model.name, options=True),
        "likelihoods": table(LIKELIHOODS, defaults.model.likelihood),
        "objectives": table(OBJECTIVES, defaults.train.objective),
    }


def render_tables(document: str) -> str:
    """``document`` (docs/training.md) with its generated tables made afresh."""
    for table, text in registry_tables().items():
        begin, end = markers(table)
        document = updated(document, f"{begin}\n\n{text}\n\n{end}", begin, end)
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the parts of docs/ made from the code.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if the docs are out of date")
    mode.add_argument("--print", action="store_true", help="print the generated parts, write nothing")
    args = parser.parse_args(argv)
    generated = render(help_texts())
    if args.print:
        print(generated)
        print("\n\n".join(registry_tables().values()))
        return 0
    stale = []
    for path, make in ((CLI_MD, lambda doc: updated(doc, generated)), (TRAINING_MD, render_tables)):
        document = path.read_text(encoding="utf-8")
        new = make(document)
        if new != document:
            stale.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
                print(f"updated {path}")
    if args.check and stale:
        print(f"{', '.join(map(str, stale))} out of date: run python scripts/cli_doc.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
