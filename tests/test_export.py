"""turbovae export (ONNX, torch.export, the Hub layout), turbovae.from_pretrained and turbovae push.

The exported graphs are compared with the VAE's own methods (not with the export's wrappers), at batch
sizes other than the export's (the batch axis is dynamic). The upload runs against a local HTTP server
that answers the few Hub endpoints huggingface_hub calls; nothing here touches the internet."""

from __future__ import annotations

import base64
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from turbovae import LIKELIHOODS, from_pretrained, load
from turbovae.cli import main
from turbovae.config import from_dict, resolve, to_yaml
from turbovae.data import load_dataset
from turbovae.data.text import BOS, EOS, PAD, Tokenizer
from turbovae.engine import checkpoint
from turbovae.engine.setup import build_vae
from turbovae.errors import CheckpointError, ConfigError
from turbovae.hub import FORMAT, push, save_pretrained

TOL = 1e-4
HAS_ONNX = all(
    __import__("importlib").util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime")
)
needs_onnx = pytest.mark.skipif(
    not HAS_ONNX, reason="onnx, onnxscript and onnxruntime: pip install '.[onnx]'"
)
VOCAB = ["<pad>", "<unk>", "<bos>", "<eos>", *"abcdefgh"]
MODELS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "mlp": ({"model": {"name": "mlp", "hidden": [32], "latent": 4, "likelihood": "bernoulli"}}, (1, 8, 8)),
    "conv": (
        {"model": {"name": "conv", "channels": [8, 16], "latent": 4, "likelihood": "gaussian-pixel"}},
        (1, 8, 8),
    ),
    "hvae": (
        {
            "model": {
                "name": "hvae",
                "channels": [8, 16],
                "latent": 2,
                "groups": [1, 2],
                "likelihood": "discretized-logistic",
            }
        },
        (3, 8, 8),
    ),
}


def text_config(cell: str) -> dict[str, Any]:
    return {
        "data": {"name": "words", "max_length": 12},
        "model": {
            "name": "sentence",
            "hidden": [16, 16],
            "latent": 4,
            "likelihood": "categorical",
            "cell": cell,
            "embedding": 8,
        },
    }


def make_run(
    run: Path,
    cfg_dict: dict[str, Any],
    shape: tuple[int, ...],
    data_meta: dict[str, Any] | None = None,
    ema: bool = False,
) -> Path:
    """A run directory holding an untrained model whose weights are perturbed (zero-initialised heads
    would make trivial graphs); with ``ema`` the checkpoint's EMA weights differ from its raw ones."""
    cfg = from_dict({**cfg_dict, "train": {"ema": 0.99 if ema else 0.0}})
    vae = build_vae(cfg, shape, data_meta)
    gen = torch.Generator().manual_seed(0)

    def perturbed(v: torch.Tensor) -> torch.Tensor:
        return v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v

    tensors = {f"model.{k}": perturbed(v) for k, v in vae.state_dict().items()}
    if ema:
        tensors.update({f"ema.{k}": perturbed(v) for k, v in vae.state_dict().items()})
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    meta = {"event_shape": list(shape), "max_value": 16.0, "data_meta": data_meta or {}}
    checkpoint.save(run, 1, tensors, meta)
    return run


def text_run(run: Path, cell: str) -> Path:
    meta = {"text": Tokenizer("char", VOCAB, 12, 1).to_meta()}
    return make_run(run, text_config(cell), (12,), meta)


def tokens(batch: int, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Token ids as the data hold them: words of random length, the end marker, then padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(VOCAB), (batch, length), generator=gen)
    ends = torch.randint(0, length, (batch,), generator=gen)
    position = torch.arange(length).expand(batch, -1)
    ids = torch.where(position == ends[:, None], EOS, ids)
    return torch.where(position > ends[:, None], PAD, ids)


def export(run: Path, out: Path, fmt: str, *extra: str) -> None:
    assert main(["export", str(run), "--format", fmt, "--out", str(out), *extra]) == 0


def onnx_session(path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path: Path, **inputs: torch.Tensor) -> list[torch.Tensor]:
    outputs = onnx_session(path).run(None, {k: v.numpy() for k, v in inputs.items()})
    return [torch.from_numpy(a) for a in outputs]


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.double() - b.double()).abs().max())


# ---- ONNX ------------------------------------------------------------------------------------------


def table_run(run: Path) -> tuple[Path, tuple[int, ...]]:
    """A run of the MLP with the mixed likelihood on a small table (numbers and a category)."""
    gen = np.random.default_rng(0)
    rows = [["height", "count", "colour"]]
    rows += [
        [f"{gen.normal():.3f}", int(gen.integers(0, 50)), str(gen.choice(["red", "blue"]))] for _ in range(60)
    ]
    path = run.parent / "table.csv"
    path.write_text("".join(",".join(map(str, r)) + "\n" for r in rows))
    data = load_dataset(f"csv:{path}")
    cfg = {
        "data": {"name": f"csv:{path}"},
        "model": {"name": "mlp", "hidden": [16], "latent": 3, "likelihood": "mixed"},
    }
    return make_run(run, cfg, data.event_shape, data.meta), data.event_shape


@needs_onnx
@pytest.mark.parametrize(
    "kind",  # the fast subset keeps mlp (it was at its 3-minute limit); the full suite runs all four
    ["mlp", *(pytest.param(k, marks=pytest.mark.slow) for k in ("conv", "hvae", "table"))],
)
def test_onnx_encoder_and_decoder_match_torch_at_other_batch_sizes(tmp_path: Path, kind: str) -> None:
    if kind == "table":
        run, shape = table_run(tmp_path / "run")
    else:
        cfg, shape = MODELS[kind]
        run = make_run(tmp_path / "run", cfg, shape)
    out = tmp_path / "onnx"
    export(run, out, "onnx")
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "export.json"]
    vae = load(run)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["graphs"]["encoder"]["inputs"]["x"]["shape"] == ["batch", *shape]
    assert manifest["graphs"]["decoder"]["inputs"]["z"]["shape"] == ["batch", vae.latent]
    worst = 0.0
    for batch in (1, 5):  # the export traced batch 2
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
        z = torch.randn(batch, vae.latent, generator=torch.Generator().manual_seed(batch))
        mean, log_var = run_onnx(out / "encoder.onnx", x=x)
        params, x_mean = run_onnx(out / "decoder.onnx", z=z)
        with torch.no_grad():
            q = vae.encode(x)
            want_params = vae.decode_params(z)
            if vae.structure.groups(vae):  # every group, top-down, at the upper groups' posterior means
                top = q.mean.shape[-1]
                diffs = [diff(mean[:, :top], q.mean), diff(log_var[:, :top], 2 * q.log_scale)]
                recon = run_onnx(out / "decoder.onnx", z=mean)[0]
                diffs.append(diff(recon, vae.net.reconstruct_params(x)))
                assert mean.shape == (batch, vae.latent)
            else:
                diffs = [diff(mean, q.mean), diff(log_var, 2 * q.log_scale)]
            diffs += [diff(params, want_params), diff(x_mean, vae.likelihood.mean(want_params))]
        worst = max(worst, *diffs)
    print(f"{kind}: max |onnxruntime - torch| = {worst:.2e}")
    assert worst <= TOL


@needs_onnx
@pytest.mark.slow  # an ONNX export of three text graphs per cell (about 18 s)
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_onnx_text_encoder_teacher_forced_decoder_and_step(tmp_path: Path, cell: str) -> None:
    run = text_run(tmp_path / "run", cell)
    out = tmp_path / "onnx"
    export(run, out, "onnx")
    vae = load(run)
    x = tokens(5, seed=1)
    z = torch.randn(5, vae.latent, generator=torch.Generator().manual_seed(1))
    mean, log_var = run_onnx(out / "encoder.onnx", tokens=x)
    (logits,) = run_onnx(out / "decoder.onnx", z=z, tokens=x)
    with torch.no_grad():
        q = vae.encode(x)
        diffs = [diff(mean, q.mean), diff(log_var, 2 * q.log_scale), diff(logits, vae.decode_params(z, x))]
        want_ids = vae.decode(z)  # greedy generation
    print(f"sentence-{cell}: max |onnxruntime - torch| = {max(diffs):.2e}")
    assert max(diffs) <= TOL
    # greedy generation with the one-step graph gives the tokens vae.decode gives
    step = onnx_session(out / "decoder_step.onnx")
    rows = vae.net.layers * (2 if cell == "lstm" else 1)
    token = np.full(5, BOS, dtype=np.int64)
    state = np.zeros((rows, 5, vae.net.hidden), dtype=np.float32)
    ids = np.zeros((5, 12), dtype=np.int64)
    done = np.zeros(5, dtype=bool)
    for t in range(12):
        step_logits, state = step.run(None, {"z": z.numpy(), "token": token, "state": state})
        step_logits[:, [PAD, BOS]] = -np.inf  # never targets of the likelihood, as generate masks them
        token = np.where(done, PAD, step_logits.argmax(-1))
        ids[:, t] = token
        done |= token == EOS
    np.testing.assert_array_equal(ids[:, : want_ids.shape[1]], want_ids.numpy())
    assert (ids[:, want_ids.shape[1] :] == PAD).all()


@needs_onnx
@pytest.mark.slow
def test_onnx_export_of_every_likelihood(tmp_path: Path) -> None:
    """Each registered likelihood's parameters and mean through ONNX (the command's own check: the
    files against vae.encode, vae.decode_params and likelihood.mean at batch 3)."""
    from turbovae.commands.export import export_graphs

    for name in LIKELIHOODS:
        if name in ("mixed", "categorical"):  # need a table or text: the tests above
            continue
        shape = (3, 4, 4) if name in ("discretized-logistic", "categorical-256") else (1, 4, 4)
        cfg = from_dict({"model": {"name": "mlp", "hidden": [8], "latent": 2, "likelihood": name}})
        vae = build_vae(cfg, shape).eval()
        vae.config = cfg
        (tmp_path / name).mkdir()
        report = export_graphs(vae, tmp_path / name, "onnx")
        print(name, report)
        assert all("onnxruntime matches torch" in line for line in report)


@needs_onnx
def test_onnx_export_without_onnxruntime_skips_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "run", *MODELS["mlp"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    real = __import__("importlib").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    export(run, tmp_path / "out", "onnx")
    assert "not checked (onnxruntime is not installed)" in capsys.readouterr().out
    assert (tmp_path / "out" / "decoder.onnx").is_file()


# ---- torch.export ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:No complete tensor found")
@pytest.mark.parametrize("kind", ["mlp", pytest.param("hvae", marks=pytest.mark.slow)])
def test_torch_export_programs_match_at_another_batch_size(tmp_path: Path, kind: str) -> None:
    cfg, shape = MODELS[kind]
    run = make_run(tmp_path / "run", cfg, shape)
    out = tmp_path / "pt2"
    export(run, out, "torch")
    assert sorted(p.name for p in out.iterdir()) == ["decoder.pt2", "encoder.pt2", "export.json"]
    vae = load(run)
    x, z = torch.rand(7, *shape), torch.randn(7, vae.latent)
    encoder = torch.export.load(str(out / "encoder.pt2")).module()
    decoder = torch.export.load(str(out / "decoder.pt2")).module()
    with torch.no_grad():
        mean, log_var = encoder(x)
        params, _ = decoder(z)
        q = vae.encode(x)
        top = q.mean.shape[-1]
        assert diff(mean[:, :top], q.mean) <= 1e-5 and diff(log_var[:, :top], 2 * q.log_scale) <= 1e-5
        assert diff(params, vae.decode_params(z)) <= 1e-5


# ---- the Hub layout --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) training run with EMA, and an eval.json."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert (
        main(
            [
                "train",
                "--data",
                "digits",
                "--epochs",
                "1",
                "--hidden",
                "32",
                "--latent",
                "4",
                "--out",
                str(run),
                "--progress",
                "off",
                "--compile",
                "off",
                "--precision",
                "fp32",
                "train.ema=0.9",
                "eval.iwae_k=5",
            ]
        )
        == 0
    )
    (run / "eval.json").write_text(
        json.dumps({"nelbo": 42.5, "nll_iwae": 42.25, "k": 5, "iwae_seconds": 1.0})
    )
    return run


def same_model(a: Any, b: Any) -> None:
    """Bit-identical weights and outputs."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config == b.config and a.max_value == b.max_value and a.data_meta == b.data_meta
    x = torch.rand(6, *a.event_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a.encode(x).mean, b.encode(x).mean)
        assert torch.equal(a.reconstruct(x), b.reconstruct(x))
        samples = [m.sample(4, generator=torch.Generator().manual_seed(3)) for m in (a, b)]
    assert torch.equal(*samples)


def test_hub_export_and_from_pretrained_reproduce_the_run(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "hub"
    export(trained, out, "hub")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "config.yaml",
        "model.safetensors",
    ]
    vae = load(trained)
    same_model(from_pretrained(out), vae)
    same_model(from_pretrained(str(out)), vae)
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == FORMAT and config["event_shape"] == [1, 8, 8] and config["max_value"] == 16.0
    assert config["config"] == vae.config.to_dict()
    # the weights are the EMA average, as load gives them, not the raw weights
    tensors, _ = checkpoint.load(checkpoint.latest(trained))
    raw = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    assert any(not torch.equal(raw[k], v) for k, v in vae.state_dict().items())
    # the card: front matter, data, metrics, the training command, usage
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "turbovae" and {"turbovae", "vae", "mlp"} <= set(front["tags"])
    summary = json.loads((trained / "summary.json").read_text())
    assert f"| test_nelbo | {summary['test_nelbo']:.4f} |" in card and "| nll_iwae | 42.2500 |" in card
    assert "iwae_seconds" not in card and "`digits`" in card
    assert "turbovae train --config config.yaml" in card and f'turbovae.from_pretrained("{out}")' in card
    # config.yaml trains the same config again
    assert resolve(str(out / "config.yaml")) == vae.config


def test_hub_layout_of_a_text_and_a_hierarchical_model(tmp_path: Path) -> None:
    for name, run in (
        ("text", text_run(tmp_path / "text", "lstm")),
        ("hvae", make_run(tmp_path / "hvae", *MODELS["hvae"], ema=True)),
    ):
        vae = load(run)
        folder = save_pretrained(vae, tmp_path / f"{name}-hub", run_dir=run, repo_id="someone/model")
        back = from_pretrained(folder)
        sa, sb = vae.state_dict(), back.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa) and back.data_meta == vae.data_meta
        assert 'from_pretrained("someone/model")' in (folder / "README.md").read_text()


def test_from_pretrained_downloads_a_repo_id(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hf = pytest.importorskip("huggingface_hub")
    folder = save_pretrained(load(trained), tmp_path / "snapshot", run_dir=trained)
    calls: list[tuple[str, dict[str, Any]]] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    same_model(
        from_pretrained("someone/digits-vae", revision="v1", cache_dir=tmp_path / "cache"), load(trained)
    )
    assert calls[0][0] == "someone/digits-vae" and calls[0][1]["revision"] == "v1"
    assert set(calls[0][1]["allow_patterns"]) >= {"config.json", "model.safetensors"}


def test_from_pretrained_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match="not a turbovae model folder"):
        from_pretrained(tmp_path)
    run = make_run(tmp_path / "run", *MODELS["mlp"])
    with pytest.raises(CheckpointError, match=r"it is a run directory: turbovae\.load reads it"):
        from_pretrained(run)
    (tmp_path / "config.json").write_text(json.dumps({"format": FORMAT}))
    with pytest.raises(CheckpointError, match="unreadable"):
        from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="neither a folder nor a Hub repository id"):
        from_pretrained(str(tmp_path / "no" / "such" / "folder"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(
        ConfigError, match=r"needs the huggingface_hub package: pip install 'turbovae\[hub\]'"
    ):
        from_pretrained("someone/model")


# ---- push, against a local server that answers like the Hub ----------------------------------------


class FakeHub(BaseHTTPRequestHandler):
    """The endpoints HfApi.create_repo and HfApi.upload_folder call; every file is committed inline
    ("regular" upload mode, base64 in the commit), so no LFS storage is needed."""

    requests: list[dict[str, Any]]
    files: dict[str, bytes]

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        base = f"http://{self.headers['Host']}"
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            self._reply(200, {"url": f"{base}/{json.loads(body)['organization']}/{json.loads(body)['name']}"})
        elif path == "/api/validate-yaml":
            self._reply(200, {"errors": [], "warnings": []})
        elif "/preupload/" in path:
            files = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                for f in json.loads(body)["files"]
            ]
            self._reply(200, {"files": files})
        elif "/commit/" in path:
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            self._reply(200, {"commitUrl": f"{base}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        else:
            self._reply(404, {"error": f"not mimicked: {self.path}"})

    def do_GET(self) -> None:
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": b""})
        self._reply(404, {"error": f"not mimicked: {self.path}"})


@pytest.fixture
def fake_hub() -> Iterator[tuple[str, type[FakeHub]]]:
    handler = type("Hub", (FakeHub,), {"requests": [], "files": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_push_uploads_the_hub_layout(trained: Path, tmp_path: Path, fake_hub: tuple[str, Any]) -> None:
    pytest.importorskip("huggingface_hub")
    endpoint, hub = fake_hub
    url = push(trained, "someone/digits-vae", private=True, token="hf_test", endpoint=endpoint)
    assert url == f"{endpoint}/someone/digits-vae/commit/{'a' * 40}"
    paths = [r["path"].split("?")[0] for r in hub.requests]
    assert paths[0] == "/api/repos/create" and paths[-1] == "/api/models/someone/digits-vae/commit/main"
    create = json.loads(hub.requests[0]["body"])
    assert (
        create["name"] == "digits-vae"
        and create["organization"] == "someone"
        and create["visibility"] == "private"
    )
    assert all(r["auth"] == "Bearer hf_test" for r in hub.requests)
    assert set(hub.files) == {"README.md", "config.json", "config.yaml", "model.safetensors"}
    # what arrived loads as the run's model
    received = tmp_path / "received"
    received.mkdir()
    for name, data in hub.files.items():
        (received / name).write_bytes(data)
    same_model(from_pretrained(received), load(trained))
    local = save_pretrained(load(trained), tmp_path / "local", run_dir=trained, repo_id="someone/digits-vae")
    for name in ("config.json", "config.yaml", "model.safetensors", "README.md"):
        assert hub.files[name] == (local / name).read_bytes(), name
    assert 'from_pretrained("someone/digits-vae")' in hub.files["README.md"].decode()


def test_push_command_and_its_errors(
    trained: Path,
    fake_hub: tuple[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("huggingface_hub")
    endpoint, hub = fake_hub
    assert main(["push", str(trained), "someone/cli-vae", "--token", "hf_cli", "--endpoint", endpoint]) == 0
    assert capsys.readouterr().out.strip().endswith("/someone/cli-vae/commit/" + "a" * 40)
    assert json.loads(hub.requests[0]["body"]).get("visibility") != "private"
    # a server that refuses: one line, exit 2
    assert main(["push", str(trained), "someone/cli-vae", "--endpoint", endpoint + "/nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("turbovae: error: could not upload to 'someone/cli-vae'") and "\n" not in err
    assert main(["push", str(trained), "not/a/repo/id", "--endpoint", endpoint]) == 2
    assert "is not a Hub repository id" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert main(["push", str(trained), "someone/cli-vae"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "turbovae: error: this needs the huggingface_hub package: pip install 'turbovae[hub]'"


# ---- the command's rules ----------------------------------------------------------------------------


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("turbovae: error: ") and "\n" not in err, err
    return err


def test_export_user_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "run", *MODELS["mlp"])
    out = tmp_path / "out"
    assert main(["export", str(tmp_path), "--format", "hub", "--out", str(out)]) == 2
    assert "is not a turbovae run directory" in one_error_line(capsys)
    assert main(["export", str(run), "--format", "onx", "--out", str(out)]) == 2
    assert "unknown export format 'onx'" in one_error_line(capsys) and not out.exists()
    assert main(["export", str(run), "--format", "hub", "--out", str(run)]) == 2
    assert "would replace the run directory" in one_error_line(capsys)
    assert main(["export", str(run / "checkpoints"), "--format", "hub", "--out", str(tmp_path)]) == 2
    one_error_line(capsys)
    out.mkdir()
    (out / "old.txt").write_text("x")
    assert main(["export", str(run), "--format", "hub", "--out", str(out)]) == 2
    assert "pass --overwrite" in one_error_line(capsys) and (out / "old.txt").is_file()
    assert main(["export", str(run), "--format", "hub", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    other = make_run(tmp_path / "other", *MODELS["mlp"])
    assert main(["export", str(run), "--format", "hub", "--out", str(other), "--overwrite"]) == 2
    assert "is a turbovae run directory" in one_error_line(capsys) and (other / "config.yaml").is_file()
    real = __import__("importlib").util.find_spec
    monkeypatch.setattr(
        "importlib.util.find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a)
    )
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    assert "needs the onnxscript package(s): pip install 'turbovae[onnx]'" in one_error_line(capsys)


def test_a_failed_export_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = make_run(tmp_path / "run", *MODELS["mlp"])
    out = tmp_path / "exports" / "hub"

    def broken(vae: Any, folder: Path, **kwargs: Any) -> None:
        (Path(folder) / "config.json").write_text("{}")
        raise ConfigError("disk full")

    monkeypatch.setattr("turbovae.commands.export.save_pretrained", broken)
    assert main(["export", str(run), "--format", "hub", "--out", str(out)]) == 2
    assert list((tmp_path / "exports").iterdir()) == []  # neither the folder nor its temporary copy
