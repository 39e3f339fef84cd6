"""Conditional generation (issue 20): conditional mlp/conv/hvae networks, training with data.condition,
sample --label / --where, conditional evaluation, and unconditional paths unchanged."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest
import torch

from turbovae import conditioning
from turbovae.cli import main
from turbovae.config import resolve
from turbovae.engine.rundir import load
from turbovae.engine.setup import setup, validation_split
from turbovae.evaluation.likelihood import iwae_nll, nelbo
from turbovae.likelihoods import build_likelihood
from turbovae.models import ConvNet, HVAENet, MLPNet, build_network
from turbovae.objectives import elbo, iwae
from turbovae.vae import VAE

SHAPE = (1, 8, 8)
K = 3


def _nets(n_classes: int):
    torch.manual_seed(0)
    yield "mlp", MLPNet(SHAPE, 4, 1, [16], n_classes=n_classes)
    torch.manual_seed(0)
    yield "conv", ConvNet(SHAPE, 4, 1, [8, 8], n_classes=n_classes)
    torch.manual_seed(0)
    yield "hvae", HVAENet(SHAPE, 1, [8, 8], [1, 1], [2, 2], [1, 1], n_classes=n_classes)


def _vae(net) -> VAE:
    return VAE(net, build_likelihood("bernoulli", SHAPE, 0.1, {}, 1), getattr(net, "latent_size", 4))


def _digest(net) -> str:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# Computed with the code of the commit before conditioning existed (4d09747): parameter count, a digest
# of the seeded initial weights, the ELBO and IWAE-3 losses of fixed data and noise
BEFORE = {
    "mlp": (2344, "359b9dd0e6a2b37c", 44.81486129760742, 44.92365264892578),
    "conv": (8481, "4acaecece83c39cc", 44.488037109375, 44.58523178100586),
    "hvae": (2405, "ec81932e05182985", 44.37529754638672, 44.512962341308594),
}


def test_unconditional_networks_and_losses_are_those_of_before():
    for name, net in _nets(0):
        vae = _vae(net)
        g = torch.Generator().manual_seed(1)
        x = (torch.rand(5, *SHAPE, generator=g) > 0.5).float()
        eps = torch.randn(5, vae.latent, generator=g)
        eps_k = torch.randn(3, 5, vae.latent, generator=g)
        got = (
            sum(p.numel() for p in net.parameters()),
            _digest(net),
            elbo(vae, x, eps=eps)["loss"].item(),
            iwae(vae, x, eps=eps_k, k=3)["loss"].item(),
        )
        # parameters and initial weights exactly; the losses to float rounding (the IWAE's log-sum-exp
        # over convolution outputs moves in the last bits with oneDNN's kernel choice)
        assert got[:2] == BEFORE[name][:2], name
        assert got[2:] == pytest.approx(BEFORE[name][2:], rel=1e-6, abs=0), name
        assert vae.n_classes == 0 and vae.condition is None


@pytest.mark.parametrize("name", ["mlp", "conv", "hvae"])
def test_conditional_shapes_and_gradients(name):
    net = dict(_nets(K))[name]
    vae = _vae(net)
    x = (torch.rand(6, *SHAPE) > 0.5).float()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    q = vae.encode(x, y)
    assert q.loc.shape == (6, vae.prior().loc.shape[-1])
    terms = elbo(vae, x, eps=torch.randn(6, vae.latent), y=y)
    terms["loss"].backward()
    # the class reaches the loss: its parameters (the first layers, or hvae's projections) get gradients
    cond_params = (
        [p for n, p in net.named_parameters() if "cond_top" in n]
        if name == "hvae"
        else [next(net.encoder.parameters())]
    )
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cond_params)
    out = iwae(vae, x, eps=torch.randn(4, 6, vae.latent), k=4, y=y)
    assert torch.isfinite(out["loss"])
    z = torch.randn(3, 6, vae.latent)  # sample dims in front of the batch
    assert vae.decode_params(z, condition=y).shape == (3, 6, 1, *SHAPE)
    assert vae.sample(5, condition=1).shape == (5, *SHAPE)
    assert vae.reconstruct(x, y).shape == (6, *SHAPE)
    # a different class gives different parameters for the same z
    z1 = torch.randn(2, vae.latent)
    assert not torch.allclose(vae.decode_params(z1, condition=0), vae.decode_params(z1, condition=2))
    with pytest.raises(Exception, match="conditional"):
        vae.encode(x)  # a conditional network without its condition: a clear error


def test_conditional_evaluation_is_log_p_x_given_y():
    net = dict(_nets(K))["mlp"]
    vae = _vae(net)
    x = (torch.rand(20, *SHAPE) > 0.5).to(torch.uint8)
    y = torch.arange(20) % K
    ev = nelbo(vae, x, lambda r: r.float(), batch_size=7, generator=torch.Generator().manual_seed(0), y=y)
    iw = iwae_nll(
        vae, x, lambda r: r.float(), k=5, batch_size=3, generator=torch.Generator().manual_seed(0), y=y
    )
    assert np.isfinite(ev["nelbo"]) and np.isfinite(iw["nll"])
    assert iw["nll"] <= ev["nelbo"] + 1.0


def test_build_network_refuses_a_conditional_text_model():
    cfg = resolve("words-char", {}, [])
    with pytest.raises(Exception, match="cannot be conditional"):
        build_network("sentence", (16,), 8, 30, cfg.model, n_classes=3)


def test_resolve_names_and_indices():
    cond = {"kind": "label", "names": conditioning.FASHION_MNIST_CLASSES}
    assert conditioning.resolve(cond, "Dress") == 3 == conditioning.resolve(cond, "3")
    assert conditioning.resolve(cond, "ankle boot") == 9
    assert conditioning.resolve_many(cond, "3,7") == [3, 7]
    with pytest.raises(Exception, match=r"unknown label 'Hat'.*T-shirt/top"):
        conditioning.resolve(cond, "Hat")


def test_labels_follow_the_validation_split():
    cfg = resolve("digits-mlp", {"data.condition": "label"}, [])
    s = setup(cfg, torch.device("cpu"))
    fit_idx, val_idx = validation_split(len(s.data.x_train), cfg.data.validation)
    assert torch.equal(s.x_train, s.data.x_train[fit_idx]) and torch.equal(s.y_train, s.data.y_train[fit_idx])
    assert torch.equal(s.y_val, s.data.y_train[val_idx]) and torch.equal(s.y_test, s.data.y_test)
    assert s.vae.n_classes == 10 and s.data.meta["condition"]["names"][3] == "3"


RUN = ["--progress", "off", "train.threads=1", "eval.iwae_k=5"]
TABLE_RUN = [*RUN, "--batch-size", "64"]


def test_digits_conditional_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["train", "--data", "digits", "--condition", "label", "--epochs", "2", "--out", str(out), *RUN])
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["condition"] == "label" and summary["classes"] == 10
    vae = load(out)
    assert vae.n_classes == 10 and vae.condition["kind"] == "label"
    npy = tmp_path / "s.npy"
    assert main(["sample", str(out), "--label", "3,7", "--n", "4", "--out", str(npy)]) == 0
    assert np.load(npy).shape == (8, *SHAPE)
    assert main(["sample", str(out), "--label", "3", "--n", "4"]) == 0
    assert (out / "samples-4.png").is_file()
    capsys.readouterr()
    # an unknown label: one line naming the valid ones, exit 2
    assert main(["sample", str(out), "--label", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "12" in err and "0, 1, 2" in err
    assert main(["eval", str(out), "--iwae-k", "3", "--json", "--out", "-"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["conditional"] is True
    x = tmp_path / "x.npy"
    np.save(x, (np.random.default_rng(0).random((5, *SHAPE)) * 16).astype(np.uint8))
    assert (
        main(["encode", str(out), "--input", str(x), "--label", "3", "--out", str(tmp_path / "z.npy")]) == 0
    )
    assert np.load(tmp_path / "z.npy").shape == (5, 20)
    labels = tmp_path / "labels.txt"
    labels.write_text("0\n1\n2\n3\n4\n")
    assert (
        main(
            [
                "encode",
                str(out),
                "--input",
                str(x),
                "--labels",
                str(labels),
                "--out",
                str(tmp_path / "z2.npy"),
            ]
        )
        == 0
    )
    assert main(["encode", str(out), "--input", str(x), "--out", str(tmp_path / "z3.npy")]) == 2  # no label


def test_unconditional_run_refuses_a_label(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--epochs", "1", "--out", str(out), *RUN]) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--label", "3"]) == 2
    assert "conditional" in capsys.readouterr().err


def test_condition_label_needs_labels(tmp_path, capsys):
    path = tmp_path / "x.npz"
    np.savez(path, x_train=np.zeros((40, 4), np.uint8), x_test=np.zeros((5, 4), np.uint8))
    assert (
        main(["train", "--data", str(path), "--condition", "label", "--out", str(tmp_path / "r"), *RUN]) == 2
    )
    assert "no labels" in capsys.readouterr().err


def _table(path, n=300, seed=0):
    rng = np.random.default_rng(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["size", "colour", "kind"])
        for i in range(n):
            kind = "rare" if i % 10 == 0 else "common"
            size = rng.normal(10.0 if kind == "rare" else 0.0, 1.0)
            w.writerow([f"{size:.3f}", rng.choice(["red", "blue"]), kind])


def test_table_condition_and_where_round_trip(tmp_path, capsys):
    table = tmp_path / "t.csv"
    _table(table)
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        f"csv:{table}",
        "--condition",
        "kind",
        "--epochs",
        "3",
        "--out",
        str(out),
        *TABLE_RUN,
    ]
    assert main(args) == 0
    vae = load(out)
    assert vae.condition == {
        "kind": "column",
        "column": "kind",
        "names": ["common", "rare"],
        "counts": vae.condition["counts"],
    }
    # the model does not generate the condition column: it is not in the transformed vector
    assert "kind" not in [c["name"] for c in vae.data_meta["table"]["columns"]]
    rows = tmp_path / "rare.csv"
    assert main(["sample", str(out), "--where", "kind=rare", "--n", "50", "--out", str(rows)]) == 0
    with rows.open() as f:
        got = list(csv.DictReader(f))
    assert len(got) == 50 and list(got[0]) == ["size", "colour", "kind"]
    assert {r["kind"] for r in got} == {"rare"}
    capsys.readouterr()
    assert main(["sample", str(out), "--where", "kind=huge", "--n", "5", "--out", str(rows)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "common" in err and "rare" in err
    assert main(["sample", str(out), "--where", "colour=red", "--n", "5", "--out", str(rows)]) == 2
    # without --where: classes drawn from the training frequencies, the column written back
    assert main(["sample", str(out), "--n", "40", "--out", str(rows)]) == 0
    with rows.open() as f:
        assert {r["kind"] for r in csv.DictReader(f)} <= {"rare", "common"}


def test_table_condition_must_be_categorical(tmp_path, capsys):
    table = tmp_path / "t.csv"
    _table(table, n=60)
    args = [
        "train",
        "--data",
        f"csv:{table}",
        "--condition",
        "size",
        "--out",
        str(tmp_path / "r"),
        *TABLE_RUN,
    ]
    assert main(args) == 2
    assert "categorical" in capsys.readouterr().err
    args[4] = "nope"
    assert main(args) == 2
    assert "no column 'nope'" in capsys.readouterr().err


def test_image_folder_classes_from_sub_folders(tmp_path):
    from PIL import Image

    from turbovae.data import load_dataset

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(
                tmp_path / "imgs" / name / f"{i}.png"
            )
    ds = load_dataset(str(tmp_path / "imgs"), condition="label", test_fraction=0.2)
    assert ds.meta["class_names"] == ["cat", "dog"]
    assert len(ds.y_train) == len(ds.x_train) and set(ds.y_train.tolist()) <= {0, 1}
    assert "class_names" not in load_dataset(str(tmp_path / "imgs")).meta  # unconditional: as before


def test_hvae_conditional_training(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--model", "hvae", "--condition", "label", "--epochs", "1",
            "model.channels=[16,16]", "--out", str(out), *RUN]  # fmt: skip
    assert main(args) == 0
    assert main(["sample", str(out), "--label", "0,1", "--n", "3", "--out", str(tmp_path / "s.npy")]) == 0
    assert np.load(tmp_path / "s.npy").shape == (6, *SHAPE)


@pytest.mark.slow  # two ranks started by torchrun-style spawning
def test_two_ranks_shard_the_labels_with_the_batch(tmp_path):
    """Data-parallel (torchrun, 2 CPU ranks, gloo): each rank's class ids are the rows of its share of
    the batch, so 2 ranks of batch B train what 1 process of batch 2B trains."""
    import math
    import os
    import socket
    import subprocess
    import sys

    from turbovae.engine import checkpoint

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = ["train", "--data", "digits", "--condition", "label", "--hidden", "32", "--latent", "4",
            "--epochs", "1", "--progress", "off", "eval.iwae_k=2", "--compile", "off", "train.threads=1",
            "train.precision=fp32"]  # fmt: skip
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(port()), "-m", "turbovae", *args, "--batch-size", "16",
           "--out", str(tmp_path / "two")]  # fmt: skip
    one = [sys.executable, "-m", "turbovae", *args, "--batch-size", "32", "--lr", repr(1e-3 * math.sqrt(2)),
           "--out", str(tmp_path / "one")]  # fmt: skip
    for cmd in (two, one):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
    states = []
    for name in ("two", "one"):
        path = checkpoint.latest(tmp_path / name)
        assert path is not None
        states.append({k: v for k, v in checkpoint.load(path)[0].items() if k.startswith("model.")})
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_conditional_mlp_starts_each_class_at_its_mean_image():
    # issue 33: at the defaults a conditional MLP's samples were their class a third of the time (z carried
    # the class); the decoder's per-class output bias starts at the logit of each class's mean image
    cfg = resolve("digits-mlp", {"data.condition": "label"}, [])
    s = setup(cfg, torch.device("cpu"))
    net = s.vae.net
    x = s.x_train.double() / s.train_max
    means = torch.stack([x[s.y_train == c].mean(0) for c in range(10)]).flatten(1)
    want = torch.logit(means, eps=1e-3)
    if net.output_bias_from_data:
        want = want - net.decoder[-1].bias.double()
    assert torch.allclose(net.class_bias.double(), want, atol=1e-5)
    # with z = 0 the class alone already tells the classes apart: each decodes nearest its own mean
    logits = s.vae.decode_params(torch.zeros(10, s.vae.latent), condition=torch.arange(10)).flatten(1)
    nearest = torch.cdist(torch.sigmoid(logits).double(), means).argmin(1)
    assert torch.equal(nearest, torch.arange(10))


def test_conditional_mlp_saved_without_a_class_bias_loads_as_it_was():
    net = MLPNet(SHAPE, 4, 1, [16], n_classes=K)
    old = {k: v for k, v in net.state_dict().items() if k != "class_bias"}  # a run of before issue 33
    net.class_bias.data.fill_(1.0)
    net.load_state_dict(old)
    assert net.class_bias.abs().sum() == 0
