"""Evaluation during and at the end of training: the per-epoch collapse check, the final NELBO and IWAE,
the pictures (or text outputs) and summary.json."""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from .. import evaluation, runtime
from ..evaluation.text import text_summary
from ..viz.grids import as_images, save_grid
from ..viz.text import write_text_outputs
from .optim import EMA
from .rundir import MetricsLog, write_json
from .setup import Setup


def averaged(ema: EMA | None) -> contextlib.AbstractContextManager[None]:
    """The weight average in the model while evaluating and drawing pictures (train.ema > 0)."""
    return ema.swapped() if ema is not None else contextlib.nullcontext()


COLLAPSE_EXAMPLES = 2000  # test examples the per-epoch active-unit count looks at


def collapse_check(s: Setup, log: MetricsLog, loop: dict[str, Any]) -> dict[str, Any]:
    """Active units (Burda et al.'s criterion) and KL per latent dimension on the first test examples,
    for metrics.jsonl; a warning, once, when most units are inactive (posterior collapse)."""
    q = evaluation.encode_all(
        s.vae, s.x_test[:COLLAPSE_EXAMPLES], s.prepare_test, batch_size=s.cfg.eval.batch_size
    )
    active, _ = evaluation.active_units(q)
    kl = evaluation.kl_per_dim(q)
    # early epochs often look collapsed and recover (the decoder learns first): warn from a quarter on
    late = loop["epoch"] >= max(1, s.cfg.train.epochs // 4)
    if active < len(kl) / 2 and late and not loop.get("collapse_warned"):
        loop["collapse_warned"] = True
        which = " of the top group" if getattr(s.vae.net, "hierarchical", False) else ""
        msg = (f"posterior collapse: {active} of {len(kl)} latent units{which} are active after epoch "
               f"{loop['epoch']}; "
               "remedies: train.kl_warmup_steps or train.kl_cycles (anneal β), train.free_bits, a lower "
               "train.beta, model.word_dropout for text")  # fmt: skip
        log.write("warning", step=loop["step"], message=msg)
        log.echo(msg)
    return {"active_units": active, "kl_per_dim": [round(v, 5) for v in kl]}


def finish(
    s: Setup, out: Path, loop: dict[str, Any], ema: EMA | None = None, write: bool = True
) -> dict[str, Any]:
    """Final evaluation, pictures and summary.json (with the weight average, where there is one).

    Data-parallel runs: every rank evaluates its share; only rank 0 (``write``) writes files."""
    with averaged(ema):
        return _finish(s, out, loop, write)


def _finish(s: Setup, out: Path, loop: dict[str, Any], write: bool = True) -> dict[str, Any]:
    cfg, vae = s.cfg, s.vae
    t0 = time.perf_counter()
    eval_gen = runtime.generator(s.device, 54321)
    ev = evaluation.nelbo(vae, s.x_test, s.prepare_test, batch_size=cfg.eval.batch_size, generator=eval_gen)
    no_iwae = {"nll": None, "stderr": None, "k": 0}  # eval.iwae_k = 0: skipped
    iw = (
        no_iwae
        if not cfg.eval.iwae_k
        else evaluation.iwae_nll(
            vae,
            s.x_test,
            s.prepare_test,
            k=cfg.eval.iwae_k,
            batch_size=max(1, cfg.eval.batch_size // 10),
            generator=eval_gen,
        )
    )
    if write:
        write_pictures(s, out)
    dims = math.prod(s.data.event_shape)
    discrete = vae.likelihood.discrete
    summary = {
        "test_nelbo": ev["nelbo"],
        "test_rec": ev["rec"],
        "test_kl": ev["kl"],
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
        "steps": loop["step"],
        "params": sum(p.numel() for p in vae.parameters()),
        "device": runtime.describe(s.device),
        "precision": s.precision,
        "compile": loop.get("compile", "eager"),
        "data": s.data.name,
        "n_train": len(s.x_train),
        "n_test": len(s.x_test),
        "binarize": s.binarize_mode,
        "model": cfg.model.name,
        "likelihood": cfg.model.likelihood,
        "objective": cfg.train.objective,
        "skipped_steps": loop.get("skipped", 0),
        "rollbacks": loop.get("rollbacks", 0),
        "ema": cfg.train.ema,
    }
    if loop.get("global_batch", cfg.train.batch_size) != cfg.train.batch_size:  # data-parallel
        summary["global_batch"] = loop["global_batch"]
    if not write:
        return summary
    if s.data.is_tokens:  # text: nats per token, perplexity, active units, reconstruction accuracy
        summary.update(text_summary(s, ev, iw, loop))
    write_json(out / "summary.json", summary)  # atomically; NaN as null
    return summary


@torch.no_grad()
def write_pictures(s: Setup, out: Path, n_samples: int = 64, n_recon: int = 16) -> None:
    """samples.png (prior samples, E[x|z]) and reconstructions.png (inputs above, outputs below).

    Text runs write samples.txt, reconstructions.txt and interpolations.txt instead."""
    if s.data.is_tokens:
        return write_text_outputs(s, out)
    vae = s.vae
    vae.eval()
    shape = s.data.event_shape
    samples = vae.sample(n_samples, generator=runtime.generator(s.device, 7))
    save_grid(as_images(samples, shape), out / "samples.png", nrow=8)
    x = s.prepare_test(s.x_test[:n_recon])
    recon = vae.reconstruct(x)
    both = torch.cat([as_images(x, shape), as_images(recon, shape)])
    save_grid(both, out / "reconstructions.png", nrow=min(n_recon, len(x)))
    vae.train()
