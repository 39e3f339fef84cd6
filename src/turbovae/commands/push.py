"""``turbovae push``: upload a trained run to the Hugging Face Hub (the layout of ``export --format hub``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..hub import push


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "push",
        help="upload a trained run to the Hugging Face Hub",
        description="Upload the trained model of RUN_DIR to the Hub repository REPO_ID (created if needed) "
        "in the layout of `turbovae export --format hub`; load it with turbovae.from_pretrained(REPO_ID). "
        "Needs huggingface_hub: pip install 'turbovae[hub]'.",
    )
    p.add_argument("run_dir")
    p.add_argument("repo_id", help="user/name or organisation/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument(
        "--token",
        help="a Hub access token with write access (default: HF_TOKEN or the token `hf auth login` saved; "
        "prefer those: a token on the command line is visible to other users of the machine)",
    )
    p.add_argument(
        "--endpoint", help="a Hub-compatible server (default: HF_ENDPOINT or the Hugging Face Hub)"
    )
    p.add_argument("--message", help="the commit message")


def run(args: argparse.Namespace) -> int:
    url = push(
        args.run_dir,
        args.repo_id,
        private=args.private,
        token=args.token,
        endpoint=args.endpoint,
        commit_message=args.message,
    )
    print(url)
    return 0
