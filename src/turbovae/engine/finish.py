"""Evaluation during and at the end of training: the per-epoch collapse check, the final NELBO and IWAE,
the pictures (or text outputs) and summary.json."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import evaluation, runtime
from ..progress import Progress, note
from . import privacy
from .optim import Average
from .rundir import MetricsLog, write_json
from .setup import Setup


def averaged(ema: Average | None) -> contextlib.AbstractContextManager[None]:
    """The weight average in the model while evaluating and drawing pictures (train.ema > 0, or a
    schedule-free optimiser's x)."""
    return ema.swapped() if ema is not None else contextlib.nullcontext()


COLLAPSE_EXAMPLES = 2000  # validation examples the per-epoch active-unit count looks at
COLLAPSE_EPOCHS = 10  # collapsed epochs in a row (and a quarter of the run) before the end that are warned of


def collapse_check(s: Setup, log: MetricsLog, loop: dict[str, Any]) -> dict[str, Any]:
    """Active units (Burda et al.'s criterion) and KL per latent dimension on the first validation
    examples, for metrics.jsonl; a warning, once, when most units are inactive (posterior collapse)."""
    y = None if s.y_val is None else s.y_val[:COLLAPSE_EXAMPLES]
    q = evaluation.encode_all(
        s.vae, s.x_val[:COLLAPSE_EXAMPLES], s.prepare_val, batch_size=s.cfg.eval.batch_size, y=y
    )
    active, _ = evaluation.active_units(q)
    kl = evaluation.kl_per_dim(q)
    # early epochs often look collapsed and recover (the decoder learns first: the demo has 0 of 16
    # units active at epoch 7 and 12-16 from epoch 12): warn only when the collapse persists, i.e. in
    # the run's last evaluation, or after COLLAPSE_EPOCHS collapsed epochs in a row that are also a
    # quarter of the run (a long run is told before its end)
    collapsed = active < len(kl) / 2
    loop["collapsed_epochs"] = loop.get("collapsed_epochs", 0) + 1 if collapsed else 0
    cfg = s.cfg.train
    last = (loop["epoch"] >= cfg.epochs or 0 < cfg.max_steps <= loop["step"]
            or 0 < cfg.time_limit <= loop["train_seconds"])  # fmt: skip
    lasting = loop["collapsed_epochs"] >= max(COLLAPSE_EPOCHS, cfg.epochs // 4)
    if collapsed and (last or lasting) and not loop.get("collapse_warned"):
        loop["collapse_warned"] = True
        group = s.vae.structure.posterior_group
        which = f" of {group}" if group else ""
        msg = (f"posterior collapse: {active} of {len(kl)} latent units{which} are active after epoch "
               f"{loop['epoch']}; "
               "remedies: train.kl_warmup_steps or train.kl_cycles (anneal β), train.free_bits, a lower "
               "train.beta, model.word_dropout for text")  # fmt: skip
        log.write("warning", step=loop["step"], message=msg)
        log.echo(msg)
    return {"active_units": active, "kl_per_dim": [round(v, 5) for v in kl]}


def finish(
    s: Setup,
    out: Path,
    loop: dict[str, Any],
    ema: Average | None = None,
    write: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Final evaluation, pictures and summary.json (with the weight average, where there is one).

    Data-parallel runs: every rank evaluates its share; only rank 0 (``write``) writes files. With
    ``progress``, the IWAE pass says what it will cost and shows its progress on stderr."""
    with averaged(ema):
        return _finish(s, out, loop, write, progress)


def announce_iwae(k: int, n: int) -> str:
    """What the final IWAE evaluation will cost, and how to skip it."""
    cheaper = f", eval.iwae_k={k // 10} is about 10x faster" if k >= 20 else ""
    return (f"final evaluation: IWAE log-likelihood with k={k:,} samples on {n:,} test examples "
            f"({k * n:,} decoder passes); eval.iwae_k=0 skips it{cheaper}")  # fmt: skip


def _iwae(s: Setup, gen: torch.Generator, progress: bool) -> dict[str, Any]:
    """The final IWAE estimate on the test split (eval.iwae_k; 0: skipped)."""
    k = s.cfg.eval.iwae_k
    if not k:
        return {"nll": None, "stderr": None, "k": 0}
    if progress:
        note(announce_iwae(k, len(s.x_test)))
    with Progress(len(s.x_test), f"IWAE k={k:,}", "examples", enabled=progress) as bar:
        return evaluation.iwae_nll(s.vae, s.x_test, s.prepare_test, k=k,
                                   batch_size=max(1, s.cfg.eval.batch_size // 10), generator=gen,
                                   y=s.y_test, progress=bar.update)  # fmt: skip


def _finish(s: Setup, out: Path, loop: dict[str, Any], write: bool, progress: bool) -> dict[str, Any]:
    cfg, vae = s.cfg, s.vae
    t0 = time.perf_counter()
    eval_gen = runtime.generator(s.device, 54321)
    ev = evaluation.nelbo(vae, s.x_test, s.prepare_test, batch_size=cfg.eval.batch_size, generator=eval_gen,
                          y=s.y_test)  # fmt: skip
    iw = _iwae(s, eval_gen, progress and write)
    # the validation NELBO with the per-epoch evaluation's noise: the last epoch's figure, for the final model
    val = (
        evaluation.nelbo(vae, s.x_val, s.prepare_val, batch_size=cfg.eval.batch_size,
                         generator=runtime.generator(s.device, 12345), y=s.y_val)["nelbo"]
        if s.has_validation
        else None
    )  # fmt: skip
    if write:
        write_pictures(s, out)
    dims = math.prod(s.data.event_shape)
    discrete = vae.likelihood.discrete
    summary = {
        "test_nelbo": ev["nelbo"],
        "test_rec": ev["rec"],
        "test_kl": ev["kl"],
        "val_nelbo": val,
        "test_nll_iwae": iw["nll"],
        "test_nll_iwae_stderr": iw["stderr"],
        "iwae_k": iw["k"],
        "test_bpd": evaluation.bits_per_dim(ev["nelbo"], dims) if discrete else None,
        "test_bpd_iwae": evaluation.bits_per_dim(iw["nll"], dims)
        if discrete and iw["nll"] is not None
        else None,
        "train_seconds": loop["train_seconds"],
        "eval_seconds": time.perf_counter() - t0,
        "total_seconds": runtime.process_seconds(),
        "samples_per_second": loop["examples"] / max(loop["train_seconds"], 1e-9),
        "epochs": loop["epoch"],
        # train.time_limit stopped the run after this many epochs (a fraction: mid-epoch); absent otherwise
        **({"time_limited_epochs": loop["time_limited"]} if "time_limited" in loop else {}),
        # train.max_steps stopped it after this many epochs (a fraction: mid-epoch); absent otherwise
        **({"step_limited_epochs": loop["step_limited"]} if "step_limited" in loop else {}),
        "steps": loop["step"],
        "params": sum(p.numel() for p in vae.parameters()),
        "device": runtime.describe(s.device),
        "precision": s.precision,
        "compile": loop.get("compile", "eager"),
        "data": s.data.name,
        "n_train": len(s.x_train),
        "n_val": len(s.x_val),
        "n_test": len(s.x_test),
        "binarize": s.binarize_mode,
        "model": cfg.model.name,
        "likelihood": cfg.model.likelihood,
        "objective": cfg.train.objective,
        "skipped_steps": loop.get("skipped", 0),
        "rollbacks": loop.get("rollbacks", 0),
        "ema": cfg.train.ema,
    }
    if vae.condition is not None:  # a conditional run: the figures above are −log p(x | y)
        summary["condition"] = cfg.data.condition
        summary["classes"] = len(vae.condition["names"])
    if "privacy" in loop:  # DP-SGD: the (ε, δ) the steps run spent
        not_covered = s.data.meta.get("table", {}).get("privacy", {}).get("not_covered", [])
        summary["privacy"] = privacy.report(cfg, loop["privacy"], loop["step"], not_covered)
    if loop.get("global_batch", cfg.train.batch_size) != cfg.train.batch_size:  # data-parallel
        summary["global_batch"] = loop["global_batch"]
    if not write:
        return summary
    summary.update(s.kind.final_metrics(s, ev, iw, loop))  # text: nats per token, perplexity, ...
    # autoencoders: PSNR, SSIM, MS-SSIM of the held-out images, the latents' std
    summary.update(vae.structure.final_metrics(vae, s.x_test, s.prepare_test))
    write_json(out / "summary.json", summary)  # atomically; NaN as null
    return summary


@torch.no_grad()
def write_pictures(s: Setup, out: Path) -> None:
    """samples.png and reconstructions.png, in the form of the run's data (``DataKind.write_pictures``:
    image grids with labelled rows; barcodes, one row per example, for tables and text; text runs
    also write samples.txt, reconstructions.txt and interpolations.txt)."""
    s.vae.eval()
    s.kind.write_pictures(s, out)
    s.vae.train()


@torch.no_grad()
def tracked_pictures(s: Setup) -> dict[str, np.ndarray]:
    """The pictures live tracking shows at each evaluation (image data only: prior samples and
    validation reconstructions), as uint8 arrays."""
    return s.kind.tracked_pictures(s)
