"""``turbovae data``: data helpers."""

from __future__ import annotations

import argparse
from typing import Any

from ..data.tables import export_tables


def add_parser(sub: Any) -> None:
    d = sub.add_parser("data", help="data helpers")
    data_sub = d.add_subparsers(dest="data_command", required=True)
    x = data_sub.add_parser(
        "export-tables",
        help="write scikit-learn's wine, breast-cancer and iris tables as CSV (the class as a string column)",
    )
    x.add_argument("folder")


def run(args: argparse.Namespace) -> int:
    for path in export_tables(args.folder):
        print(path)
    return 0
