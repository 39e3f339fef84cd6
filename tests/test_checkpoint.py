import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from turbovae.engine import checkpoint
from turbovae.errors import CheckpointError


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.w": torch.randn(3, 4, generator=g), "model.b": torch.randn(4, generator=g)}


def test_round_trip_and_latest(tmp_path):
    checkpoint.save(tmp_path, 10, tensors(0), {"loop": {"step": 10}})
    path = checkpoint.save(tmp_path, 20, tensors(1), {"loop": {"step": 20}})
    assert checkpoint.latest(tmp_path) == path
    loaded, meta = checkpoint.load(path)
    assert meta["loop"] == {"step": 20} and meta["step"] == 20
    for k, v in tensors(1).items():
        assert torch.equal(loaded[k], v)


def test_only_the_newest_are_kept(tmp_path):
    for step in range(1, 6):
        checkpoint.save(tmp_path, step, tensors(step), {}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [
        "step-000000004.json",
        "step-000000004.safetensors",
        "step-000000005.json",
        "step-000000005.safetensors",
    ]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    first = checkpoint.save(tmp_path, 1, tensors(0), {})
    second = checkpoint.save(tmp_path, 2, tensors(1), {})
    blob = second.with_suffix(".safetensors")
    blob.write_bytes(blob.read_bytes()[:-7])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(second)
    assert checkpoint.latest(tmp_path) == first


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    first = checkpoint.save(tmp_path, 1, tensors(0), {})
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint is intact"):
        checkpoint.save(tmp_path, 2, tensors(1), {})
    monkeypatch.undo()
    assert checkpoint.latest(tmp_path) == first
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


class Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_is_refused_and_nothing_in_it_runs(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "step-000000001.safetensors").write_bytes(pickle.dumps(Exploit(marker)))
    meta = {"format": checkpoint.FORMAT, "tensors": "step-000000001.safetensors", "tensors_sha256": "x"}
    (folder / "step-000000001.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load(folder / "step-000000001.json")
    torch.save({"w": torch.zeros(1)}, folder / "step-000000002.json")  # torch.save's zip container
    with pytest.raises(CheckpointError, match="pickle"):
        checkpoint.load(folder / "step-000000002.json")
    assert not marker.exists()


def test_optimizer_state_round_trip():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    t, meta = checkpoint.optimizer_state(opt)
    meta = json.loads(json.dumps(meta))  # survives JSON
    other = torch.optim.Adam(model.parameters(), lr=1e-2)
    checkpoint.load_optimizer_state(other, t, meta)
    a, b = opt.state_dict(), other.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(torch.as_tensor(a["state"][i][k]), torch.as_tensor(b["state"][i][k]))
