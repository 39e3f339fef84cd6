"""``turbovae data``: data helpers."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import parse_resize
from ..data.tables import export_tables


def add_parser(sub: Any) -> None:
    d = sub.add_parser("data", help="data helpers")
    data_sub = d.add_subparsers(dest="data_command", required=True)
    x = data_sub.add_parser(
        "export-tables",
        help="write scikit-learn's wine, breast-cancer and iris tables as CSV (the class as a string column)",
    )
    x.add_argument("folder")
    p = data_sub.add_parser(
        "pack",
        help="a folder of PNG/JPEG images as one uint8 .npy (rows shuffled), memory-mapped when trained on",
        description="Pack every image under FOLDER into one (N, C, H, W) uint8 array, its rows in a fixed "
        "shuffled order, decoded one image at a time into the file. Class sub-folders give OUT.labels.npy "
        "and OUT.classes.json beside it; a folder's train/ and test/ are kept (OUT.split.json). "
        "`turbovae train --data OUT` memory-maps the array (docs/data.md).",
    )
    p.add_argument("folder", help="the image folder (searched recursively)")
    p.add_argument("--out", required=True, help="the .npy file to write")
    p.add_argument("--resize", default=None, help="HxW every image is resized to (mixed sizes need it)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its labels) if it exists")


def run(args: argparse.Namespace) -> int:
    if args.data_command == "pack":
        from ..data.pack import pack_images

        done = pack_images(args.folder, args.out, resize=parse_resize(args.resize), overwrite=args.overwrite)
        n, c, h, w = done.shape
        labels = f", labels of {len(done.classes)} classes in {done.labels}" if done.classes else ""
        split = (f"; train/ and test/ kept: the first {done.n_train:,} rows train, the last "
                 f"{n - done.n_train:,} test" if done.n_train else "")  # fmt: skip
        print(f"{done.path}: {n:,} images of {c}x{h}x{w} (uint8){labels}{split}")
        return 0
    for path in export_tables(args.folder):
        print(path)
    return 0
