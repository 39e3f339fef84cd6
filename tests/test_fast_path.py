"""The fast path computes the same function: same seed, same steps → test NELBO within 0.5% of fp32 eager."""

import json

import pytest

from turbovae.cli import main

pytestmark = pytest.mark.slow  # two 8-epoch runs per case, one of them compiled

ARGS = ["--data", "digits", "--hidden", "128", "--latent", "8", "--batch-size", "64", "--epochs", "8",
        "--progress", "off", "eval.iwae_k=0", "eval.every_epoch=false", "train.threads=2"]  # fmt: skip


def nelbo(tmp_path, name, *extra):
    assert main(["train", *ARGS, "--out", str(tmp_path / name), *extra]) == 0
    return json.loads((tmp_path / name / "summary.json").read_text())


@pytest.mark.parametrize(
    "fast", [["--precision", "bf16", "--compile", "off"], ["--precision", "bf16", "--compile", "on"]]
)
def test_fast_path_matches_fp32_eager(tmp_path, fast):
    ref = nelbo(tmp_path, "ref", "--precision", "fp32", "--compile", "off")
    got = nelbo(tmp_path, "fast", *fast)
    assert ref["precision"] == "fp32" and got["precision"] == "bf16"
    assert abs(got["test_nelbo"] - ref["test_nelbo"]) <= 0.005 * abs(ref["test_nelbo"]), (got, ref)
