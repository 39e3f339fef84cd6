"""`turbovae tune`: the noise-scale estimator, the learning-rate and batch rules, the command end to end."""

import json
import math
import sys
import time

import pytest
import torch

from turbovae.cli import main
from turbovae.commands.tune.measure import adam_preconditioner, lr_range_test
from turbovae.commands.tune.rules import (
    candidate_batches,
    choose_batch,
    range_test_divisor,
    scale_lr,
    smooth,
    suggest_lr,
    warmup_steps_for,
)
from turbovae.config import resolve
from turbovae.engine.noise import NoiseScale
from turbovae.engine.optim import make_optimizer

# one thread: on a busy 2-core machine two torch threads collapse, and tune would measure that
SMALL = ["--data", "digits", "--hidden", "32", "--latent", "4", "--batch-size", "64", "train.threads=1"]
CHOICES = {"train.batch_size", "train.lr", "train.schedule", "train.warmup_steps", "train.epochs",
           "train.precision", "train.compile"}  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---- the gradient-noise scale --------------------------------------------------------------------------


def test_noise_scale_recovers_trace_over_squared_mean():
    """Per-example gradients g_i = G + noise with a known covariance Σ; batch gradients are their means.
    The estimator, fed squared norms at two batch sizes, recovers tr(Σ)/|G|² within 20%."""
    g = torch.Generator().manual_seed(0)
    dims, b_small, b_big = 100, 16, 256
    mean = 0.5 * torch.randn(dims, generator=g, dtype=torch.float64)
    sigma = 3 + 4 * torch.rand(dims, generator=g, dtype=torch.float64)  # per-coordinate std
    truth = (sigma**2).sum().item() / mean.pow(2).sum().item()
    assert b_small < truth < b_big  # the regime the estimator is used in
    scale = NoiseScale(decay=0.95)
    for _ in range(200):
        per_example = mean + sigma * torch.randn(b_big, dims, generator=g, dtype=torch.float64)
        small, big = per_example[:b_small].mean(0), per_example.mean(0)
        scale.update(small.pow(2).sum(), b_small, big.pow(2).sum(), b_big)  # 0-dim tensors
    assert scale.value == pytest.approx(truth, rel=0.2)
    assert scale.g2 == pytest.approx(mean.pow(2).sum().item(), rel=0.2)
    assert scale.trace == pytest.approx((sigma**2).sum().item(), rel=0.2)


def test_noise_scale_floats_tensors_edge_cases_and_state():
    as_floats, as_tensors = NoiseScale(0.5), NoiseScale(0.5)
    assert as_floats.value is None and as_floats.g2 is None
    for g2_small, g2_big in ((5.0, 2.0), (4.0, 1.5), (6.0, 2.5)):
        as_floats.update(g2_small, 8, g2_big, 64)
        as_tensors.update(torch.tensor(g2_small), 8, torch.tensor(g2_big), 64)
    assert isinstance(as_floats.value, float)
    assert as_tensors.value == pytest.approx(as_floats.value)
    # |g_big|² ≈ tr(Σ)/B_big + |G|², |g_small|² ≈ tr(Σ)/8 + |G|²: one exact update gives the ratio back
    exact = NoiseScale(0.0)
    exact.update(1.0 + 400 / 8, 8, 1.0 + 400 / 64, 64)
    assert exact.value == pytest.approx(400.0) and exact.g2 == pytest.approx(1.0)
    noisy = NoiseScale(0.0)
    noisy.update(10.0, 8, 1.0, 64)  # |G|² estimate below zero: the noise swamps the mean
    assert noisy.value == math.inf
    restored = NoiseScale()
    restored.load_state_dict(as_tensors.state_dict())
    assert restored.value == pytest.approx(as_floats.value) and restored.updates == 3
    with pytest.raises(ValueError):
        as_floats.update(1.0, 64, 1.0, 64)
    with pytest.raises(ValueError):
        NoiseScale(1.0)


@pytest.mark.parametrize("optimizer", ["adam", "schedulefree"])
def test_adam_metric_comes_from_the_second_moments_of_adam_and_schedule_free(optimizer):
    """The noise scale's Adam metric 1/(√v̂ + ε) for Adam (per-parameter step) and schedule-free AdamW
    (its step count k lives in the group), from the optimiser's own state; None before the first step."""
    torch.manual_seed(0)
    cfg = resolve(flags={"train.optimizer": optimizer, "train.lr": 1e-2})
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    params = list(net.parameters())
    opt = make_optimizer(cfg, net, torch.device("cpu"))
    assert adam_preconditioner(opt, params) is None
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    squares = [torch.zeros_like(p) for p in params]
    steps = 3
    for _ in range(steps):
        net(torch.randn(8, 6)).square().mean().backward()
        for acc, p in zip(squares, params, strict=True):
            acc.mul_(beta2).add_((1 - beta2) * p.grad.square())
        opt.step()
        opt.zero_grad()
    weights = adam_preconditioner(opt, params)
    assert weights is not None and len(weights) == len(params)
    for w, v in zip(weights, squares, strict=True):
        torch.testing.assert_close(w, 1 / ((v / (1 - beta2**steps)).sqrt() + eps))


# ---- rules ---------------------------------------------------------------------------------------------


def test_scaling_rules_and_warmup():
    assert scale_lr(1e-3, 128, 512, "sgd") == pytest.approx(4e-3)  # linear
    for name in ("adam", "adamw", "adamax"):
        assert scale_lr(1e-3, 128, 512, name) == pytest.approx(2e-3)  # square root
    assert scale_lr(2e-3, 512, 128, "adam") == pytest.approx(1e-3)
    assert warmup_steps_for(4680) == 234
    assert warmup_steps_for(5) == 1 and warmup_steps_for(30) == 2


def test_suggest_lr_is_a_quarter_of_the_minimum():
    lrs = [10 ** (-5 + 5 * i / 99) for i in range(100)]
    # a valley in log-lr with its bottom at 1e-2, rising steeply after it
    losses = [(math.log10(lr) + 2) ** 2 + (50 * (math.log10(lr) + 2) ** 2 if lr > 1e-2 else 0) for lr in lrs]
    pick = suggest_lr(lrs, losses)
    assert pick["lr_min"] == pytest.approx(1e-2, rel=0.15)
    assert pick["lr"] == pytest.approx(pick["lr_min"] / 4)
    assert pick["lr_steep"] < pick["lr_min"]
    assert smooth([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # bias-corrected from the start
    # schedule-free AdamW runs at its peak rate throughout: the minimum itself, the others a quarter of it
    assert range_test_divisor("schedulefree") == 1
    assert range_test_divisor("adam") == 4 == range_test_divisor("sgd")


def test_lr_range_test_stops_at_divergence_and_picks_a_stable_rate():
    """Noisy gradient descent on ½·h·w² is unstable for lr > 2/h: the test stops there and picks below."""
    h, state, noise = 10.0, {"w": 1.0}, torch.Generator().manual_seed(0)

    def step(lr: float) -> float:
        grad = h * state["w"] + 0.3 * torch.randn((), generator=noise).item()  # a stochastic gradient
        state["w"] -= lr * grad
        return 0.5 * h * state["w"] ** 2 + 1.0  # + 1: a floor, as a VAE's loss has

    result = lr_range_test(step, 1e-4, 10.0, 300)
    assert "4×" in result["stopped"] and result["steps"] < 300
    assert result["lr_min"] < 2 / h and result["lr"] == pytest.approx(result["lr_min"] / 4)
    nan = lr_range_test(lambda lr: float("nan") if lr > 1e-2 else 1.0, 1e-4, 1.0, 100)
    assert nan["stopped"].startswith("loss nan") and all(lr <= 1e-2 for lr in nan["lrs"])


def test_choose_batch_weighs_throughput_against_the_noise_scale():
    saturating = {32: 8e3, 64: 16e3, 128: 32e3, 256: 33e3, 512: 34e3}
    batch, why = choose_batch(saturating, 100.0)
    assert batch == 128 and "B_noise" in why and "512" in why  # 512 is faster per sample, needs more
    linear = {b: 100.0 * b for b in (32, 64, 128, 256, 512)}  # larger batches are free: take the largest
    assert choose_batch(linear, 100.0)[0] == 512
    assert choose_batch(saturating, 1e5)[0] == 512  # far below the noise scale: throughput decides
    assert choose_batch(saturating, None)[0] == 512 and choose_batch(saturating, math.inf)[0] == 512


def test_candidate_batches():
    assert candidate_batches(128, 60000) == [32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert candidate_batches(100, 1617) == [32, 64, 100, 128]
    assert candidate_batches(8, 40) == [5, 8]


# ---- the command ---------------------------------------------------------------------------------------


@pytest.mark.slow  # tune end to end, three times, and a training run
def test_tune_writes_a_config_train_accepts(tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    t0 = time.perf_counter()
    assert main(["tune", *SMALL, "--budget", "6", "--out", str(out), "--json"]) == 0
    elapsed = time.perf_counter() - t0
    result = json.loads(capsys.readouterr().out)
    assert set(result["choices"]) == CHOICES and set(result["reasons"]) == CHOICES
    assert all(reason and "\n" not in reason for reason in result["reasons"].values())
    assert result["seconds"] <= 6 + 3 and elapsed < 6 + 6  # the budget bounds tune's own time
    measured = result["measured"]
    assert measured["throughput"]["points"] and measured["noise_scale"]["value"] > 0
    text = out.read_text()
    assert text.startswith("# turbovae tune") and "train.batch_size" in text.splitlines()[1]
    cfg = resolve(str(out))
    for key, value in result["choices"].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
    assert cfg.train.schedule == "warmup-cosine" and cfg.model.hidden == [32]
    # the written config trains (one short epoch)
    run = tmp_path / "run"
    assert main(["train", "--config", str(out), "--epochs", "1", "--out", str(run), "--progress", "off",
                 "eval.iwae_k=0", "--compile", "off"]) == 0  # fmt: skip
    assert (run / "summary.json").is_file()
    capsys.readouterr()
    # never replaced without --overwrite, and refused before any time is spent
    before = out.read_bytes()
    assert main(["tune", *SMALL, "--budget", "6", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("turbovae: error: ") and "--overwrite" in err and err.count("\n") == 1
    assert out.read_bytes() == before
    # --train-budget: epochs from the measured throughput, so that the training process fits it
    assert main(["tune", *SMALL, "--budget", "3", "--train-budget", "8", "--out", str(out), "--overwrite",
                 "--json"]) == 0  # fmt: skip
    fitted = json.loads(capsys.readouterr().out)
    assert "--train-budget 8" in fitted["reasons"]["train.epochs"] and fitted["choices"]["train.epochs"] >= 1
    assert resolve(str(out)).train.epochs == fitted["choices"]["train.epochs"]


@pytest.mark.slow  # tune end to end
def test_tune_with_schedule_free_keeps_it_constant_at_the_range_tests_minimum(tmp_path, capsys):
    out = tmp_path / "tuned.yaml"
    argv = ["tune", *SMALL, "train.optimizer=schedulefree", "train.max_steps=50", "--budget", "5", "--out",
            str(out), "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    measured, choices = result["measured"], result["choices"]
    assert measured["noise_scale"]["metric"] == "adam"  # schedule-free's second moments, not the plain norm
    lr_min = measured["lr_range_test"]["lr_min"]
    assert choices["train.lr"] == pytest.approx(lr_min, rel=0.05)  # the minimum itself, not a quarter
    assert "schedule-free" in result["reasons"]["train.lr"]
    cfg = resolve(str(out))
    assert cfg.train.optimizer == "schedulefree" and cfg.train.schedule == "constant"
    assert cfg.train.warmup_steps >= 1
    # the base's step limit (fmnist-mlp-fast has one) would cut the recipe's epochs: cleared
    assert cfg.train.max_steps == 0 and "was 50" in result["reasons"]["train.max_steps"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "tuned.txt"], "must end in .yaml"),
        (["--budget", "0"], "--budget must be > 0"),
        (["--train-budget", "-1", "--budget", "1"], "--train-budget must be > 0"),
        (["--storage", "x.db"], "--storage goes with --search"),
        (["--search", "2", "--train-budget", "9"], "--search keeps the configured"),
        (["--search", "2", "--search-params", "width,depth,colour"], "unknown search parameter 'colour'"),
        (["--lr", "-1"], "train.lr must be > 0"),
    ],
)
def test_tune_user_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    if "--search" in argv:
        pytest.importorskip("optuna")
    assert main(["tune", *SMALL, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("turbovae: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "tuned.yaml").exists()


def test_search_without_optuna_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    assert main(["tune", *SMALL, "--search", "2", "--out", str(tmp_path / "best.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == "turbovae: error: --search needs Optuna: pip install 'turbovae[search]'\n"


@pytest.mark.slow  # an Optuna search of seven trials
def test_search_writes_the_best_config_and_resumes(tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    out = tmp_path / "best.yaml"
    argv = ["tune", *SMALL, "--trial-epochs", "2", "--search-params", "width,latent,lr", "--json",
            "--out", str(out)]  # fmt: skip
    assert main([*argv, "--search", "3"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert sum(first["trials"].values()) == 3 and (tmp_path / "search.db").is_file()
    assert set(first["params"]) == {"width", "latent", "lr"}
    cfg = resolve(str(out))
    assert cfg.model.hidden == [first["params"]["width"]] and cfg.model.latent == first["params"]["latent"]
    assert cfg.train.epochs == 10  # the full run's epochs (the defaults), not the trials'
    assert out.read_text().startswith("# turbovae tune --search: the best of 3 trials")
    # the same command with a larger N continues the stored study: one more trial, not four
    assert main([*argv, "--search", "4", "--overwrite"]) == 0
    captured = capsys.readouterr()
    second = json.loads(captured.out)
    assert sum(second["trials"].values()) == 4 and second["study"] == first["study"]
    assert "resuming study" in captured.err and "3 of 4 trials done" in captured.err
    # the stored study: four trials, the reported best is the lowest validation NELBO of the finished ones,
    # with its parameters in the written config, and the resumed search proposed a new point (a sampler
    # seeded as before would have repeated trial 0's)
    study = optuna.load_study(study_name=second["study"], storage=f"sqlite:///{tmp_path / 'search.db'}")
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == [0, 1, 2, 3]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value)
    assert second["best_validation_nelbo"] == best.value and second["trial"] == best.number
    assert second["params"] == best.params
    assert first["best_validation_nelbo"] == min(t.value for t in complete if t.number < 3)
    assert trials[3].params not in [t.params for t in trials[:3]]
    cfg = resolve(str(out))
    assert cfg.model.hidden == [best.params["width"]] and cfg.model.latent == best.params["latent"]
    assert cfg.train.lr == pytest.approx(best.params["lr"], rel=1e-2)  # written with 3 significant digits
