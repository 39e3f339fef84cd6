"""Model selection off the test set: the validation split held out of the training data, the per-epoch
evaluation and `best` on it, tune's search on it; the mutual information with its standard error; one
meaning per bits/dim key."""

import json
import math
from pathlib import Path

import pytest
import torch

from turbovae import evaluation
from turbovae.cli import main
from turbovae.config import resolve
from turbovae.distributions import DiagonalGaussian
from turbovae.engine import checkpoint
from turbovae.engine import loop as engine_loop
from turbovae.engine.setup import VALIDATION_MAX, setup, validation_split

FAST = ["--data", "digits", "--hidden", "32", "--latent", "4", "--batch-size", "64", "--progress", "off",
        "train.log_every=5", "eval.iwae_k=5"]  # fmt: skip
DIGITS_TRAIN = 1617  # scikit-learn's digits: 1,797 images, 10% test


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_split_is_seeded_disjoint_and_capped():
    fit, val = validation_split(1617, 0.1)
    assert len(val) == 162 and len(fit) == 1617 - 162
    assert set(fit.tolist()).isdisjoint(val.tolist()) and len(set(fit.tolist()) | set(val.tolist())) == 1617
    again, val_again = validation_split(1617, 0.1)
    assert torch.equal(val, val_again) and torch.equal(fit, again)  # the same for every run
    assert len(validation_split(60_000, 0.1)[1]) == VALIDATION_MAX == 5000
    assert len(validation_split(100, 0.0)[1]) == 0


def test_setup_holds_out_the_validation_split_from_the_training_examples():
    s = setup(resolve("digits-mlp", overrides=["train.batch_size=64"]))
    assert len(s.x_val) == 162 and len(s.x_train) == DIGITS_TRAIN - 162
    assert s.x_val.unique().tolist() == [0.0, 1.0]  # digits-mlp binarises: a fixed draw, like the test split
    x, _ = s.split("val")
    assert x is s.x_val and torch.equal(setup(s.cfg).x_val, x)  # the same draw every time
    # without binarisation: exactly the seeded rows, and the training examples are the others
    grey = setup(
        resolve("digits-mlp", overrides=["model.likelihood=continuous-bernoulli", "data.binarize=none"])
    )
    fit, val = validation_split(DIGITS_TRAIN, 0.1)
    assert torch.equal(grey.x_val, grey.data.x_train[val]) and torch.equal(
        grey.x_train, grey.data.x_train[fit]
    )


def test_per_epoch_evaluation_and_best_use_the_validation_split_only(tmp_path, monkeypatch):
    seen: list[int] = []
    real = evaluation.nelbo

    def recording(vae, x, *args, **kwargs):
        seen.append(len(x))
        return real(vae, x, *args, **kwargs)

    # the training loop's own reference: what the per-epoch evaluation calls
    monkeypatch.setattr(engine_loop.evaluation, "nelbo", recording)
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "3", "--out", str(out)]) == 0
    evals = [e for e in events(out) if e["event"] == "eval"]
    assert len(evals) == 3 and all(e["split"] == "val" for e in evals)
    assert all("val_nelbo" in e and not any(k.startswith("test_") for k in e) for e in evals)
    # during training (before the final evaluation) only the 162 validation examples were scored
    n_test = 1797 - DIGITS_TRAIN
    assert seen[:3] == [162, 162, 162] and n_test in seen[3:]
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["n_val"] == 162 and summary["n_train"] == DIGITS_TRAIN - 162 and summary["n_test"] == n_test
    )
    assert summary["steps"] == 3 * ((DIGITS_TRAIN - 162) // 64)
    assert math.isfinite(summary["val_nelbo"]) and summary["val_nelbo"] != summary["test_nelbo"]
    best = checkpoint.load(out / "checkpoints" / "best.json")[1]["loop"]
    assert best["best_val_nelbo"] == min(e["val_nelbo"] for e in evals)
    assert best["step"] == next(e["step"] for e in evals if e["val_nelbo"] == best["best_val_nelbo"])


def test_a_run_without_validation_trains_on_everything_and_keeps_no_best(tmp_path):
    out = tmp_path / "all"
    assert main(["train", *FAST, "--epochs", "2", "--out", str(out), "data.validation=0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == DIGITS_TRAIN and summary["n_val"] == 0 and summary["val_nelbo"] is None
    assert not list((out / "checkpoints").glob("best.*"))
    assert not [e for e in events(out) if e["event"] == "eval"]


def test_eval_scores_the_validation_split_on_request(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--split", "val", "--iwae-k", "2", "--json", "--out", "-"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and result["n"] == 162


def test_search_without_a_validation_split_is_refused(tmp_path, capsys):
    options = [a for a in FAST if a not in ("--progress", "off")]  # tune has no progress bar option
    argv = ["tune", *options, "--search", "2", "--out", str(tmp_path / "t.yaml"), "data.validation=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.validation" in err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mi") / "run"
    assert main(["train", *FAST, "--epochs", "8", "--out", str(out), "--latent", "8"]) == 0
    return out


def test_mutual_information_has_a_standard_error_and_the_identity_holds_within_it(trained, capsys):
    capsys.readouterr()
    assert main(["eval", str(trained), "--iwae-k", "2", "--json", "--out", "-"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mi_draws"] >= 2 and r["mutual_info_stderr"] > 0 and r["marginal_kl_stderr"] > 0
    assert r["kl_mc"] == pytest.approx(r["mutual_info"] + r["marginal_kl"], abs=1e-9)
    analytic = sum(r["kl_per_dim"])  # E_x KL(q(z|x) || p(z)) in closed form, on the same examples
    assert abs(r["kl_mc"] - analytic) <= 4 * r["kl_mc_stderr"] + 1e-6, (
        r["kl_mc"],
        analytic,
        r["kl_mc_stderr"],
    )
    assert 0 <= r["mutual_info"] <= math.log(r["n"]) + 4 * r["mutual_info_stderr"]


def test_the_standard_error_shrinks_with_more_draws():
    torch.manual_seed(0)
    q = DiagonalGaussian(torch.randn(300, 5), 0.3 * torch.randn(300, 5) - 1)
    few = evaluation.mutual_information(q, generator=torch.Generator().manual_seed(1), draws=4)
    many = evaluation.mutual_information(q, generator=torch.Generator().manual_seed(1), draws=64)
    assert many["kl_mc_stderr"] < few["kl_mc_stderr"]
    with pytest.raises(ValueError):
        evaluation.mutual_information(q, draws=1)


def test_bits_per_dim_keys_mean_one_thing_in_both_files(trained, capsys):
    summary = json.loads((trained / "summary.json").read_text())
    dims = 64  # digits: 8x8
    assert summary["test_bpd"] == pytest.approx(evaluation.bits_per_dim(summary["test_nelbo"], dims))
    assert summary["test_bpd_iwae"] == pytest.approx(evaluation.bits_per_dim(summary["test_nll_iwae"], dims))
    capsys.readouterr()
    assert main(["eval", str(trained), "--iwae-k", "4", "--json", "--out", "-"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bpd"] == pytest.approx(evaluation.bits_per_dim(r["nelbo"], dims))  # the NELBO's, as test_bpd
    assert r["bpd_iwae"] == pytest.approx(evaluation.bits_per_dim(r["nll_iwae"], dims))
    assert "bpd_nelbo" not in r
