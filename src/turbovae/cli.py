"""The ``turbovae`` command: a thin dispatcher over turbovae.commands (one module per command, each with
``add_parser(sub)`` and ``run(args) -> exit code``).

User errors (TurboVAEError) end with one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import re
import sys

from .commands import bench, compress, data, encode, export, push, report, sample, train, tune
from .commands import eval as eval_command
from .commands.compress import DECOMPRESS
from .config import KEY_ALIASES
from .engine.distributed import launch, report_error
from .errors import TurboVAEError, clip

OVERRIDE = re.compile(r"^[A-Za-z_]+\.[A-Za-z_]+=")

# in the order `turbovae --help` lists them
COMMANDS = {
    "train": train,
    "bench": bench,
    "tune": tune,
    "eval": eval_command,
    "report": report,
    "data": data,
    "sample": sample,
    "encode": encode,
    "compress": compress,
    "decompress": DECOMPRESS,
    "export": export,
    "push": push,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbovae", description="Train variational autoencoders fast and correctly."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def unrecognized(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """``turbovae train: error: unrecognized option '--epcohs'; did you mean '--epochs'?``"""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    options = [s for action in sub._actions for s in action.option_strings if s.startswith("--")]
    flags = [u for u in unknown if u.startswith("-")]
    if not flags:
        return f"turbovae {command}: error: unrecognized arguments: {' '.join(unknown)}"
    flag = flags[0].split("=", 1)[0]
    alias = KEY_ALIASES.get(flag.lstrip("-").replace("-", "_").lower(), "")
    close = [f"--{alias.replace('_', '-')}"] if f"--{alias.replace('_', '-')}" in options else []
    close = close or difflib.get_close_matches(flag, options, n=1, cutoff=0.7)
    hint = f"; did you mean '{close[0]}'?" if close else f" (turbovae {command} --help lists the options)"
    return f"turbovae {command}: error: unrecognized option '{flag}'{hint}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # section.key=value overrides may stand anywhere, also between flags (argparse wants them last)
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args, unknown = parser.parse_known_args([a for a in argv if not OVERRIDE.match(a)])
    if unknown:  # one line with the closest option of that command, not the top-level usage
        print(unrecognized(parser, args.command, unknown), file=sys.stderr)
        return 2
    if hasattr(args, "overrides"):
        args.overrides = overrides
    elif overrides:
        parser.error(f"{args.command} takes no section.key=value overrides (got {overrides[0]})")
    try:
        if getattr(args, "nproc", None) not in (None, 1):  # train --nproc N: the same command under torchrun
            return launch(argv, args.nproc)
        return COMMANDS[args.command].run(args)
    except TurboVAEError as e:
        if args.debug:
            raise
        report_error(f"turbovae: error: {e}")
        return 2
    except OSError as e:
        message = file_error(e)
        if message is None or args.debug:
            raise
        report_error(f"turbovae: error: {message}")
        return 2
    except KeyboardInterrupt:
        print("turbovae: interrupted", file=sys.stderr)
        return 130


# file-system errors the user can fix (permissions, a read-only or full disk, a missing folder), with a hint
_FILE_ERRORS = {
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EROFS: "the file system is read-only; write elsewhere (--out)",
    errno.ENOSPC: "the disk is full; free space or write elsewhere (--out)",
    errno.EDQUOT: "the disk quota is used up; free space or write elsewhere (--out)",
    errno.ENOENT: "a folder on the path does not exist",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
}


def file_error(e: OSError) -> str | None:
    """One line for a file-system error the user can fix, naming the path; None for other OSErrors
    (and for the path-less kinds without a path), which keep their traceback."""
    hint = _FILE_ERRORS.get(e.errno) if e.errno is not None else None
    path = e.filename if e.filename is not None else None
    if hint is None or (path is None and e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)):
        return None
    where = f"{clip(str(path))}: " if path is not None else ""
    return f"{where}{e.strerror or e} ({hint})"


if __name__ == "__main__":
    sys.exit(main())
