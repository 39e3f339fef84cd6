"""Data kinds (``kinds/``): every source records its kind, ``kind_of`` recognises the runs of the previous
release (no recorded kind) by what their meta holds, and a new kind is its class and one registry line."""

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import turbovae
from turbovae.cli import main
from turbovae.data import load_dataset
from turbovae.data.text import synthetic_grammar
from turbovae.engine.rundir import load
from turbovae.errors import DataError
from turbovae.hub import model_card
from turbovae.kinds import DEFAULT, KINDS, DataKind, kind_for_source, kind_of
from turbovae.kinds.image import ImageKind
from turbovae.kinds.table import TableKind
from turbovae.kinds.text import TextKind

TOKENS = {"tokenizer": "char", "vocab": ["<pad>", "<unk>", "<s>", "</s>", "a"], "max_length": 8,
          "min_freq": 1}  # fmt: skip
TRANSFORM = {"columns": [{"name": "x", "type": "continuous"}], "layout": [["x", 1]], "source": "t.csv"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    rng = np.random.default_rng(0)
    with open(root / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["height", "weight", "colour"])
        for _ in range(120):
            height, weight = rng.normal(170, 10), rng.normal(70, 8)
            w.writerow([f"{height:.1f}", f"{weight:.1f}", rng.choice(["red", "blue"])])
    (root / "c.txt").write_text("\n".join(synthetic_grammar(200, seed=0)) + "\n")
    np.save(root / "v.npy", rng.random((100, 6), dtype=np.float32))
    return {"table": root / "t.csv", "text": root / "c.txt", "vectors": root / "v.npy"}


def test_every_source_records_its_kind(files: dict[str, Path]) -> None:
    for spec, name in (("digits", "image"), (str(files["vectors"]), "image"),
                       (f"csv:{files['table']}", "table"), (f"text:{files['text']}", "text")):  # fmt: skip
        ds = load_dataset(spec)
        assert ds.meta["kind"] == name and kind_of(ds) is KINDS[name], spec
    assert isinstance(KINDS["image"], ImageKind) and isinstance(KINDS["table"], TableKind)
    assert isinstance(KINDS["text"], TextKind)


def test_a_data_spec_names_its_kind_and_the_preset_to_start_from() -> None:
    cases = {"digits": ("image", None), "x.npy": ("image", None), "csv:t.csv": ("table", "tabular"),
             "t.parquet": ("table", "tabular"), "words": ("text", "words-char"),
             "text:a.txt": ("text", "text"), "text:a.csv": ("text", "text")}  # fmt: skip
    for spec, (name, preset) in cases.items():
        kind = kind_for_source(spec)
        assert kind is KINDS[name] and kind.preset(spec) == preset, spec


@pytest.mark.parametrize(
    ("meta", "name"),
    [
        ({}, "image"),
        ({"levels": 17}, "image"),
        ({"class_names": ["a", "b"], "condition": {"kind": "label", "names": ["a", "b"]}}, "image"),
        ({"text": TOKENS}, "text"),
        ({"table": TRANSFORM}, "table"),
        ({"table": TRANSFORM, "condition": {"kind": "column", "column": "x", "names": ["a", "b"]}}, "table"),
        ({"table": {}}, "image"),  # no fitted transform: not a table run's
        ({"kind": "text", "text": TOKENS}, "text"),
    ],
)
def test_a_meta_without_a_recorded_kind_is_recognised_by_what_it_holds(meta: dict, name: str) -> None:
    assert kind_of(meta) is KINDS[name]
    assert kind_of(None) is kind_of({}) is KINDS[DEFAULT]


def test_an_unknown_recorded_kind_is_one_clear_error() -> None:
    with pytest.raises(DataError, match=r"kind 'audio'.*it knows image, text, table"):
        kind_of({"kind": "audio"})


def _strip_kind(run: Path) -> None:
    """Make ``run`` look written by turbovae 0.1: no ``kind`` in its checkpoints' data meta (signed
    again, as docs/faults.md says)."""
    for path in (run / "checkpoints").glob("*.json"):
        meta = json.loads(path.read_text())
        if "data_meta" not in meta:
            continue
        del meta["data_meta"]["kind"]
        body = {k: v for k, v in meta.items() if k != "meta_sha256"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        meta["meta_sha256"] = hashlib.sha256(canonical).hexdigest()
        path.write_text(json.dumps(meta))


def test_a_table_run_of_the_previous_release_is_still_a_table_run(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "old"
    args = ["--data", f"csv:{files['table']}", "--epochs", "2", "--batch-size", "32", "eval.iwae_k=2"]
    assert main(["train", *args, "--progress", "off", "--out", str(run)]) == 0
    _strip_kind(run)
    vae = load(run)
    assert "kind" not in vae.data_meta and kind_of(vae) is KINDS["table"]
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "7", "--out", str(tmp_path / "rows.csv")]) == 0
    with open(tmp_path / "rows.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["height", "weight", "colour"] and len(rows) == 8
    assert main(["encode", str(run), "--input", str(files["table"]), "--out", str(tmp_path / "z.npy")]) == 0
    assert np.load(tmp_path / "z.npy").shape == (120, vae.latent)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--progress", "off"]) == 0
    assert kind_of(load(run)) is KINDS["table"]  # resumed: the kind is recorded from now on
    assert load(run).data_meta["kind"] == "table"


class ToyKind(DataKind):
    """A kind of data in a test: vectors of numbers (the base kind's barcodes and .npy samples), its own
    figure in summary.json, and its batches counted."""

    name = "toy"

    def __init__(self) -> None:
        self.prepared = 0

    def preparer(self, max_value: float, dynamic: bool, generator: Any) -> Any:
        prepare = super().preparer(max_value, dynamic, generator)

        def counted(raw: torch.Tensor) -> torch.Tensor:
            self.prepared += 1
            return prepare(raw)

        return counted

    def final_metrics(self, s: Any, ev: dict[str, float], iw: Any, loop: Any) -> dict[str, Any]:
        return {"toy_nelbo_per_value": ev["nelbo"] / s.x_test[0].numel()}


def test_a_new_kind_is_its_class_and_one_registry_line(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toy = ToyKind()
    monkeypatch.setitem(KINDS, "toy", toy)  # the registry line
    from turbovae.engine import setup as engine_setup

    def toy_source(spec: str, **options: Any) -> Any:  # its source records the kind's name
        ds = load_dataset(spec, **options)
        ds.meta["kind"] = "toy"
        return ds

    monkeypatch.setattr(engine_setup, "load_dataset", toy_source)
    cfg = turbovae.resolve(overrides=[f"data.name={files['vectors']}", "model.likelihood=gaussian",
                                      "train.epochs=2", "train.batch_size=30", "eval.iwae_k=2"])  # fmt: skip
    summary = turbovae.fit(cfg, tmp_path / "toy", progress=False)
    assert toy.prepared > 0 and summary["toy_nelbo_per_value"] == pytest.approx(summary["test_nelbo"] / 6)
    assert json.loads((tmp_path / "toy" / "summary.json").read_text())["toy_nelbo_per_value"] > -1e9
    with Image.open(tmp_path / "toy" / "samples.png") as picture:  # the base kind's barcode: 32 rows
        assert picture.height >= 32 * 14
    vae = load(tmp_path / "toy")
    assert vae.data_meta["kind"] == "toy" and kind_of(vae) is toy
    assert main(["sample", str(tmp_path / "toy"), "--n", "5", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (5, 6)
    assert "- toy\n" in model_card(vae, tmp_path / "toy", "me/toy")  # the card's tag
