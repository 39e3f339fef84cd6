"""`turbovae bench`: the JSON it promises, with numbers that are measured, not made up."""

import json
from types import SimpleNamespace

import pytest

from turbovae.cli import main
from turbovae.commands.bench import matmul_ceiling

KEYS = {"samples_per_second", "peer_samples_per_second", "speedup", "step_ms", "peak_memory_bytes",
        "flops_per_second", "ceiling_fraction"}  # fmt: skip


@pytest.mark.slow
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
    # the rates follow from one measured step time: samples and FLOPs per step over it, and the fraction
    # of the ceiling measured in the same run
    assert result["samples_per_second"] == pytest.approx(64 / (result["step_ms"] / 1e3), rel=0.01)
    assert result["flops_per_second"] == pytest.approx(result["flops_per_step"] / (result["step_ms"] / 1e3))
    assert result["ceiling_fraction"] == result["flops_per_second"] / result["ceiling_flops_per_second"]
    assert 0 < result["ceiling_fraction"] < 1


@pytest.mark.slow
def test_bench_rejects_a_peer_for_the_wrong_model(capsys):
    argv = ["bench", "--data", "digits", "--model", "conv", "--vs", "examples", "--windows", "1",
            "--window-steps", "2", "--compile", "off"]  # fmt: skip
    assert main(argv) == 2
    assert "--model mlp" in capsys.readouterr().err


def test_matmul_ceiling_is_the_rate_of_the_fastest_timed_repeat(monkeypatch):
    """2·n³ FLOPs per product, 3 products per repeat on a CPU, over the fastest repeat after an untimed
    warm-up: a clock that reads 10 s for the warm-up, then 0.5, 0.25 and 0.6 s."""
    import torch

    import turbovae.commands.bench as bench

    ticks = iter([0.0, 10.0, 10.0, 10.5, 20.0, 20.25, 30.0, 30.6])
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert matmul_ceiling(torch.device("cpu"), "fp32", n=64, repeats=3) == 2 * 64**3 * 3 / 0.25
    assert next(ticks, None) is None  # every repeat was timed, the warm-up included
