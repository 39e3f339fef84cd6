"""`turbovae bench`: the JSON it promises, with numbers that are measured, not made up."""

import json

import pytest

from turbovae.cli import main
from turbovae.commands.bench import matmul_ceiling

KEYS = {"samples_per_second", "peer_samples_per_second", "speedup", "step_ms", "peak_memory_bytes",
        "flops_per_second", "ceiling_fraction"}  # fmt: skip


def test_bench_json_against_the_examples_peer(capsys):
    argv = ["bench", "--data", "digits", "--hidden", "64", "--latent", "8", "--batch-size", "64", "--vs",
            "examples", "--windows", "2", "--window-steps", "5", "--compile", "off", "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= KEYS
    assert result["samples_per_second"] > 0 and result["peer_samples_per_second"] > 0
    assert result["speedup"] == pytest.approx(
        result["samples_per_second"] / result["peer_samples_per_second"]
    )
    # 64-64-16 encoder and 8-64-64 decoder: 2·(64·64 + 64·16 + 8·64 + 64·64) multiply-adds per example
    # forward, twice that backward, less the input gradient of the first layer (64·64)
    macs = 64 * 64 + 64 * 16 + 8 * 64 + 64 * 64
    assert result["flops_per_step"] == 64 * 2 * (3 * macs - 64 * 64)
    assert 0 < result["ceiling_fraction"] < 1
    assert result["step_ms"] == pytest.approx(1e3 * 64 / result["samples_per_second"])


def test_bench_rejects_a_peer_for_the_wrong_model(capsys):
    argv = ["bench", "--data", "digits", "--model", "conv", "--vs", "examples", "--windows", "1",
            "--window-steps", "2", "--compile", "off"]  # fmt: skip
    assert main(argv) == 2
    assert "--model mlp" in capsys.readouterr().err


def test_matmul_ceiling_is_a_plausible_rate():
    import torch

    rate = matmul_ceiling(torch.device("cpu"), "fp32", n=256, repeats=2)
    assert 1e8 < rate < 1e14
