"""Regenerate the command reference in docs/cli.md: the ``--help`` of ``turbovae`` and of every subcommand.

    python scripts/cli_doc.py            # rewrite the generated part of docs/cli.md
    python scripts/cli_doc.py --check    # exit 1 if docs/cli.md is out of date
    python scripts/cli_doc.py --print    # print the generated part instead

The help is formatted at a fixed width (COLUMNS=100) and without colour, so that the text does not
depend on the terminal; tests/test_docs.py checks that docs/cli.md holds exactly this text.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

COLUMNS = "100"
BEGIN = "<!-- BEGIN GENERATED HELP: python scripts/cli_doc.py -->"
END = "<!-- END GENERATED HELP -->"
CLI_MD = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


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


def updated(document: str, generated: str) -> str:
    """``document`` with the part between the markers replaced by ``generated``."""
    start, end = document.find(BEGIN), document.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{CLI_MD}: the markers {BEGIN!r} and {END!r} are missing")
    return document[:start] + generated + document[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the --help texts in docs/cli.md.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is out of date")
    mode.add_argument("--print", action="store_true", help="print the generated part, write nothing")
    args = parser.parse_args(argv)
    generated = render(help_texts())
    if args.print:
        print(generated)
        return 0
    document = CLI_MD.read_text(encoding="utf-8")
    new = updated(document, generated)
    if args.check:
        if new != document:
            print(f"{CLI_MD} is out of date: run python scripts/cli_doc.py", file=sys.stderr)
            return 1
        return 0
    if new != document:
        CLI_MD.write_text(new, encoding="utf-8")
        print(f"updated {CLI_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
