"""Live tracking while training: TensorBoard events and MLflow metrics written as the run goes, read back."""

import json
import sys
from pathlib import Path

import pytest

from turbovae.cli import main

FAST = ["--data", "digits", "--hidden", "32", "--latent", "4", "--batch-size", "64", "--epochs", "2",
        "--progress", "off", "train.log_every=5", "eval.iwae_k=0"]  # fmt: skip
STEPS_PER_EPOCH = (1617 - 162) // 64  # digits' training images less the validation split


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_are_written_while_training(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir, out = tmp_path / "tb", tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out), f"train.tensorboard={logdir}"]) == 0
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    loss = acc.Scalars("train/loss")
    logged = [e for e in events(out) if e["event"] == "train"]
    assert [s.step for s in loss] == [e["step"] for e in logged]  # every log interval, no other
    assert [s.value for s in loss] == pytest.approx([e["loss"] for e in logged], rel=1e-6)
    val = acc.Scalars("val/nelbo")
    evals = [e for e in events(out) if e["event"] == "eval"]
    assert [s.step for s in val] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH] == [e["step"] for e in evals]
    assert [s.value for s in val] == pytest.approx([e["val_nelbo"] for e in evals], rel=1e-6)
    assert {"train/lr", "train/kl", "train/samples_per_second", "val/active_units"} <= set(tags["scalars"])
    assert {"samples", "reconstructions"} <= set(tags["images"])
    assert len(acc.Images("samples")) == 2  # a picture at each evaluation


@pytest.mark.slow  # MLflow start-up and a training run
def test_mlflow_logs_metrics_params_and_pictures(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) goes here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    assert main(["train", *FAST, "--out", str(out), f"train.mlflow={uri}", "train.mlflow_experiment=t"]) == 0
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("t")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["model.latent"] == "4" and run.data.params["train.batch_size"] == "64"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    logged = [e for e in events(out) if e["event"] == "train"]
    assert sorted(m.step for m in loss) == [e["step"] for e in logged]
    val = client.get_metric_history(run.info.run_id, "val/nelbo")
    assert sorted(m.step for m in val) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "images" in artifacts  # log_image's pictures


def test_tracking_without_its_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    assert main(["train", *FAST, "--out", str(tmp_path / "r"), "train.mlflow=sqlite:///x.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "turbovae[mlflow]" in err[0]
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_a_conditional_run_is_tracked_with_its_classes(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir, out = tmp_path / "tb", tmp_path / "run"
    argv = ["train", *FAST, "--out", str(out), "--condition", "label", f"train.tensorboard={logdir}"]
    assert main(argv) == 0
    acc = EventAccumulator(str(logdir), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("reconstructions")) == 2  # one picture per evaluation, with the inputs' classes
