"""``turbovae export``: a trained run as portable files.

``--format onnx``: ``encoder.onnx`` (inputs → posterior mean and log-variance) and ``decoder.onnx``
(latents → the likelihood's parameters, and E[x | z]), each with a dynamic batch axis, through torch's
own exporter (``torch.export`` then ``torch.onnx.export``), checked against torch with onnxruntime
when it is installed. ``--format torch``: the same graphs as ``torch.export`` programs (``.pt2``).
``--format hub``: the Hugging Face Hub layout (``turbovae.hub``). Every format but diffusers also writes
``export.json``, which names each file's inputs and outputs with their shapes. ``--format diffusers``
(autoencoder-kl, autoencoder-vq): ``config.json`` and ``diffusion_pytorch_model.safetensors`` that
``diffusers.AutoencoderKL.from_pretrained`` (or ``VQModel``) loads, ``scaling_factor`` 1 / the standard
deviation of the run's held-out latents (summary.json's ``latent_std``).

What each model kind exports (docs/export.md says why):

- mlp, conv: the encoder is ``vae.encode``, the decoder ``vae.decode_params`` and the likelihood's mean.
- hvae: the encoder gives every group's posterior, top-down, each group's q(z_l | x, z_<l) taken at the
  upper groups' posterior means (the path ``vae.reconstruct`` follows); the decoder takes all groups'
  latents, flat (``latent_size`` values, the vector ``vae.decode`` takes), so decoder(encoder mean)
  is the reconstruction.
- sentence (text): the encoder reads token ids; ``decoder.onnx`` gives the logits of every position
  for latents and the tokens they score (teacher forcing: the likelihood's parameters), and
  ``decoder_step.onnx`` runs one step of generation (latents, the previous token, the RNN state →
  the next token's logits and the new state).

The output directory is written in a temporary folder next to it and renamed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..engine.rundir import load
from ..errors import ConfigError, unknown_name
from ..hub import save_pretrained
from ..structures import Graph
from ..vae import VAE
from .options import checkpoint_option

FORMATS = ("onnx", "torch", "hub", "diffusers")
MANIFEST = "export.json"
MANIFEST_FORMAT = "turbovae-export-1"
TOLERANCE = 1e-4  # the largest |onnxruntime − torch| an export may show in its check
EXPORT_BATCH, CHECK_BATCH = 2, 3  # the check runs at another batch size than the export: the axis is dynamic
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a .data file beside the graph (ONNX's 2 GB limit)


def add_parser(sub: Any) -> None:
    e = sub.add_parser(
        "export",
        help="write a trained run as ONNX, torch.export or Hugging Face Hub files",
        description="Write a trained run as portable files: --format onnx (encoder.onnx, decoder.onnx), "
        "torch (encoder.pt2, decoder.pt2: torch.export programs) or hub (config.json, "
        "model.safetensors, README.md: the Hugging Face Hub layout, loaded by turbovae.from_pretrained).",
    )
    e.add_argument("run_dir")
    checkpoint_option(e)
    e.add_argument("--format", default="onnx", help="onnx | torch | hub | diffusers (default onnx)")
    e.add_argument(
        "--out", required=True, help="the directory to write (created; must not exist or be empty)"
    )
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.add_argument(
        "--no-check",
        action="store_true",
        help="onnx, torch: skip running the exported graphs against the torch model",
    )


def run(args: argparse.Namespace) -> int:
    if args.format not in FORMATS:
        raise unknown_name("export format", args.format, FORMATS)
    if args.format == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                f"--format onnx needs the {' and '.join(missing)} package(s): pip install 'turbovae[onnx]'"
            )
    run_dir, out = Path(args.run_dir), Path(args.out)
    check_out_dir(out, run_dir, args.overwrite)
    vae = load(run_dir, "cpu", args.checkpoint)
    report: list[str] = []
    with staged_dir(out) as tmp:
        if args.format == "hub":
            save_pretrained(vae, tmp, run_dir=run_dir, repo_id=str(out))
        elif args.format == "diffusers":
            report = export_diffusers(vae, tmp, run_dir)
        else:
            report = export_graphs(vae, tmp, args.format, check=not args.no_check)
    for line in report:
        print(line)
    print(out)
    return 0


def export_diffusers(vae: VAE, out: Path, run_dir: Path | None = None) -> list[str]:
    """The run's autoencoder as a diffusers directory (config.json, diffusion_pytorch_model.safetensors);
    refused for networks that have no diffusers counterpart."""
    from safetensors.torch import save_file

    state = getattr(vae.net, "diffusers_state", None)
    if state is None:
        raise ConfigError(
            f"--format diffusers is for autoencoder runs (--model autoencoder-kl|autoencoder-vq), "
            f"not model '{vae.config.model.name if vae.config is not None else '?'}'"
        )
    std, note = None, ""
    summary = None if run_dir is None else run_dir / "summary.json"
    if summary is not None and summary.is_file():
        std = json.loads(summary.read_text()).get("latent_std")
    if not std:
        std, note = 1.0, " (no latent_std in the run's summary.json: scaling_factor 1)"
    config = vae.net.to_diffusers_config(1.0 / float(std))  # type: ignore[operator]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state(), str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return [f"diffusers {config['_class_name']}, scaling_factor {config['scaling_factor']:.5g}{note}"]


# ---- the output directory -------------------------------------------------------------------------


def check_out_dir(out: Path, run_dir: Path, overwrite: bool) -> None:
    """An export never replaces an existing directory without --overwrite, nor ever a run directory."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    target, run, here = out.resolve(), run_dir.resolve(), Path.cwd().resolve()
    if target == here or target in here.parents:
        raise ConfigError(
            f"--out {out} is the working directory or a folder above it, which an export cannot replace; "
            "name a new folder"
        )
    if target == run or target in run.parents:
        raise ConfigError(f"--out {out} would replace the run directory {run_dir}; choose another directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
        if (out / "config.yaml").is_file() and (out / "checkpoints").is_dir():
            raise ConfigError(f"--out {out} is a turbovae run directory; --overwrite never replaces a run")


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out``, renamed to ``out`` when the block ends without an error (an
    existing ``out`` is moved aside first and deleted last); deleted when it raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary one
        yield tmp
        for path in tmp.rglob("*"):  # the rename commits the export: its files are on disk first
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- the graphs -----------------------------------------------------------------------------------


def graphs(vae: VAE) -> list[Graph]:
    """The graphs an export writes for this model: its latent structure says (see the module docstring)."""
    return vae.structure.export_graphs(vae)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' warnings and log lines (missing torchvision, deprecations) are not the user's."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export")]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for log in loggers:
            log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)


def exported_program(graph: Graph) -> torch.export.ExportedProgram:
    """``torch.export`` of the graph with a dynamic batch axis; a model whose code fixes the batch size
    (or that torch.export cannot trace) is a ConfigError naming the graph."""
    batch = torch.export.Dim("batch", min=1)
    example = graph.inputs(EXPORT_BATCH, torch.Generator().manual_seed(0))
    shapes = tuple({axis: batch} for axis in graph.batch_axes)
    try:
        with _quiet(), torch.no_grad():
            return torch.export.export(graph.module.eval(), example, dynamic_shapes=shapes, strict=False)
    except Exception as e:  # torch.export's errors are many types; its first line says what failed
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"the {graph.name} of this model cannot be exported with torch.export: {first}"
        ) from e


def _save_onnx(graph: Graph, program: torch.export.ExportedProgram, path: Path, meta: dict[str, str]) -> None:
    example = graph.inputs(EXPORT_BATCH, torch.Generator().manual_seed(0))
    try:
        with _quiet():
            onnx_program = torch.onnx.export(
                program,
                example,
                None,
                input_names=list(graph.input_names),
                output_names=list(graph.output_names),
                verbose=False,
                external_data=False,
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"the {graph.name} of this model cannot be expressed in ONNX: {first}") from e
    assert onnx_program is not None
    onnx_program.model.metadata_props.update(meta)
    weights = sum(p.numel() * p.element_size() for p in graph.module.parameters())
    onnx_program.save(str(path), external_data=weights > EXTERNAL_DATA_BYTES)


def _run_onnx(path: Path, graph: Graph, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    import onnxruntime  # an optional package: imported only to check an export

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: t.numpy() for name, t in zip(graph.input_names, inputs, strict=True)}
    return [torch.from_numpy(a) for a in session.run(list(graph.output_names), feed)]


def _run_torch(path: Path, graph: Graph, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with _quiet(), torch.no_grad():
        out = torch.export.load(str(path)).module()(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def max_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest |got − want| over all outputs (integer outputs compared as floats)."""
    return max(
        float((g.double() - w.double()).abs().max()) if w.numel() else 0.0
        for g, w in zip(got, want, strict=True)
    )


def _shapes(
    graph: Graph, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor], names: tuple[str, ...]
) -> dict[str, Any]:
    """name → {"shape": [...], "dtype": ...} with the batch axis written "batch"."""
    out = {}
    for name, t in zip(names, tensors, strict=True):
        shape: list[int | str] = list(t.shape)
        axis = 1 if (graph.name == "decoder_step" and name.startswith("state")) else 0
        shape[axis] = "batch"
        out[name] = {"shape": shape, "dtype": str(t.dtype).removeprefix("torch.")}
    return out


def export_graphs(vae: VAE, out: Path, fmt: str, check: bool = True) -> list[str]:
    """Write every graph of ``vae`` into the folder ``out`` as ``fmt`` ("onnx": NAME.onnx, "torch":
    NAME.pt2) with ``export.json``; with ``check``, run each file on a batch of another size than the
    export's and compare with torch (onnx: where onnxruntime is installed). Returns one line per file."""
    vae = vae.cpu().eval()
    if vae.n_classes:  # its networks take the class, an input the exported graphs do not have
        raise ConfigError(
            f"a conditional run ({vae.n_classes} classes) cannot be exported as {fmt} graphs: its networks "
            "take the class as an input the graphs do not have; --format hub exports it "
            "(turbovae.from_pretrained loads it, and sample(..., condition=...) takes the class)"
        )
    meta = {
        "turbovae.model": vae.config.model.name if vae.config else "",
        "turbovae.likelihood": type(vae.likelihood).name,
        "turbovae.event_shape": json.dumps(list(vae.event_shape)),
        "turbovae.max_value": repr(vae.max_value),
    }
    can_check = check and (fmt == "torch" or importlib.util.find_spec("onnxruntime") is not None)
    files: dict[str, Any] = {}
    report = []
    for graph in graphs(vae):
        program = exported_program(graph)
        path = out / f"{graph.name}.{'onnx' if fmt == 'onnx' else 'pt2'}"
        if fmt == "onnx":
            _save_onnx(graph, program, path, meta)
        else:
            with _quiet():  # "No complete tensor found in the group!" per graph: torch's, not the user's
                torch.export.save(program, str(path))
        inputs = graph.inputs(CHECK_BATCH, torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = graph.module(*inputs)
        want = list(want) if isinstance(want, tuple) else [want]
        files[graph.name] = {
            "file": path.name,
            "inputs": _shapes(graph, inputs, graph.input_names),
            "outputs": _shapes(graph, want, graph.output_names),
        }
        line = f"{path.name}: {', '.join(graph.input_names)} -> {', '.join(graph.output_names)}"
        if can_check:
            got = (_run_onnx if fmt == "onnx" else _run_torch)(path, graph, inputs)
            diff = max_difference(got, want)
            if not diff <= TOLERANCE:
                raise ConfigError(
                    f"the exported {path.name} differs from the torch model by {diff:.3g} (more than "
                    f"{TOLERANCE:g}) on a batch of {CHECK_BATCH}; nothing was written"
                )
            runner = "onnxruntime" if fmt == "onnx" else "torch.export.load"
            line += f"; {runner} matches torch to {diff:.1e} at batch {CHECK_BATCH}"
        elif check:
            line += "; not checked (onnxruntime is not installed)"
        report.append(line)
    write_manifest(vae, out, fmt, files)
    return report


def write_manifest(vae: VAE, out: Path, fmt: str, files: dict[str, Any]) -> None:
    """``export.json``: what the files hold and what their inputs mean."""
    state = {k: v.tolist() for k, v in vae.likelihood.state_dict().items() if v.numel() <= 16}
    manifest = {
        "format": MANIFEST_FORMAT,
        "export_format": fmt,
        "model": vae.config.model.name if vae.config else None,
        "likelihood": type(vae.likelihood).name,
        "likelihood_state": state,  # the likelihood's own learned values (e.g. gaussian-learned's scale)
        "event_shape": list(vae.event_shape),
        "latent": vae.latent,
        "structure": vae.structure.name,
        "max_value": vae.max_value,
        **vae.structure.manifest(vae),  # "inputs" (what the graphs take), text's "special_tokens"
        "graphs": files,
        "data_meta": vae.data_meta,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


__all__ = ["FORMATS", "check_out_dir", "export_graphs", "graphs", "staged_dir"]
