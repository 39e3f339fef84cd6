"""``turbovae bench``: the training step's throughput, against the hardware's matmul ceiling and
against peer implementations run on the same data in the same process.

Timings are medians over several windows after warm-up; every ratio is between numbers measured in
one run, so a busy or different machine moves both sides together.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .. import runtime
from ..config import Config
from ..data.batches import gather, to_float
from ..data.text import bucketed
from ..engine import hardware
from ..engine.optim import make_optimizer
from ..engine.setup import Setup, setup
from ..engine.step import STATS, make_step
from ..errors import ConfigError
from ..models import MLPConfig
from ..objectives import noise_shape_of
from ..progress import Progress
from .options import config_from, config_options

PEERS = ("examples", "pythae")


def matmul_ceiling(device: torch.device, precision: str, n: int = 0, repeats: int = 5) -> float:
    """FLOP/s of a large square matmul in the step's compute dtype: what the hardware gives torch
    (n = 2048 on CPUs, 8192 on GPUs, whose matrix units a 2048 product does not fill)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    iters = 20 if device.type == "cuda" else 3
    times = []
    for _ in range(repeats + 1):
        runtime.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        runtime.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 * iters / min(times[1:])


def _windows(
    run: Callable[[int], None],
    device: torch.device,
    windows: int,
    steps: int,
    what: str = "turbovae",
    batch: int = 0,
) -> list[float]:
    """Wall seconds of ``windows`` windows of ``steps`` steps each, synchronised at the edges only; the
    progress (windows done, the last window's samples/s) is updated between windows, outside the timing."""
    seconds = []
    with Progress(windows, f"bench {what}", "windows") as bar:
        for _ in range(windows):
            runtime.synchronize(device)
            t0 = time.perf_counter()
            run(steps)
            runtime.synchronize(device)
            seconds.append(time.perf_counter() - t0)
            if batch:
                bar.set_postfix(samples_per_s=f"{batch * steps / seconds[-1]:,.0f}")
            bar.update()
    return seconds


def bench_turbovae(s: Setup, windows: int, steps: int) -> dict[str, Any]:
    """Time turbovae's own training step, as ``turbovae train`` would run it."""
    cfg, device, vae = s.cfg, s.device, s.vae
    opt = make_optimizer(cfg, vae, device)
    scaler = runtime.grad_scaler(device, s.precision)
    eager = make_step(vae, opt, scaler, cfg, device, s.precision)
    batch = cfg.train.batch_size
    total = cfg.train.epochs * (len(s.x_train) // batch)
    key = f"bench|{cfg.model}|{s.precision}|{batch}"
    kind = s.kind
    capturable = scaler is None and getattr(opt, "device_scalars", True)
    graphs = cfg.train.cuda_graph and kind.fixed_shapes and capturable
    mode = "off" if cfg.train.optimizer == "schedulefree" else cfg.train.compile  # as train runs it
    step = runtime.StepCompiler(eager, mode, device, key=key, remaining_steps=total, graphs=graphs)
    g = runtime.generator(device, cfg.train.seed)
    dynamic = s.binarize_mode == "dynamic"
    noise = noise_shape_of(cfg.train.objective, batch, vae.latent, cfg.train.iwae_k)
    perm = torch.randperm(len(s.x_train), generator=g, device=device)
    lengths = kind.lengths(s.x_train)
    if lengths is not None:  # text: length-bucketed batches cut to their longest line, as train runs them
        perm = bucketed(perm, lengths, batch, g)
        mean_tokens = lengths[perm[: len(perm) // batch * batch]].double().mean().item()
    prepare = kind.preparer(s.train_max, dynamic, g)
    position = {"i": 0}

    def batch_pair() -> tuple[torch.Tensor, torch.Tensor]:
        i = position["i"]
        if i + batch > len(perm):
            i = 0
        position["i"] = i + batch
        raw = gather(s.x_train, perm[i : i + batch], device) if s.mapped else s.x_train[perm[i : i + batch]]
        return prepare(raw), torch.randn(noise, generator=g, device=device)

    sums = torch.zeros(len(STATS), device=device)

    def run(n: int) -> None:
        nonlocal sums
        for _ in range(n):
            sums += step(*batch_pair())

    with FlopCounterMode(display=False) as counter:
        eager(*batch_pair())  # one eager step, counted: matmuls and convolutions, forward and backward
    flops = counter.get_total_flops()
    t0 = time.perf_counter()
    run(runtime.PROBE_STEPS + 10)  # warm-up: the compile decision (and compilation) happen here
    warmup_s = time.perf_counter() - t0
    runtime.reset_peak_memory(device)
    seconds = _windows(run, device, windows, steps, "turbovae", s.cfg.train.batch_size)
    if not torch.isfinite(sums).all() or sums[STATS.index("skipped")] > sums[STATS.index("applied")]:
        raise ConfigError("the loss became NaN or Inf during the benchmark; lower --lr")
    median = statistics.median(seconds)
    return {
        "samples_per_second": batch * steps / median,
        # text: tokens (end markers included, padding not) = samples/s × mean tokens of the full batches
        **({"tokens_per_second": batch * steps / median * mean_tokens} if lengths is not None else {}),
        "step_ms": 1e3 * median / steps,
        "window_seconds": seconds,
        "flops_per_step": flops,
        "flops_per_second": flops * steps / median,
        "peak_memory_bytes": runtime.peak_memory_bytes(device),
        "warmup_seconds": warmup_s,
        "compile": step.decision,
    }


def forever(loader: Iterable[Any]) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (a peer loop timed over windows, not epochs)."""
    while True:
        yield from loader


class ExamplesVAE(nn.Module):
    """The VAE of pytorch/examples (vae/main.py), sized like the config's MLP."""

    def __init__(self, dims: int, hidden: int, latent: int) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = (
            nn.Linear(dims, hidden),
            nn.Linear(hidden, latent),
            nn.Linear(hidden, latent),
        )
        self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, dims)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x.view(len(x), -1)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def bench_examples(s: Setup, windows: int, steps: int) -> float:
    """pytorch/examples' loop: a DataLoader over in-memory float tensors, BCE summed over the batch,
    ``loss.item()`` every step, batches copied to the device. Returns samples/s."""
    cfg, device = s.cfg, s.device
    if not isinstance(cfg.model, MLPConfig):  # the peers are MLP VAEs
        raise ConfigError("the 'examples' peer is pytorch/examples' MLP VAE; benchmark it with --model mlp")
    x_train = to_float(s.x_train.cpu(), s.train_max).flatten(1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train), batch_size=cfg.train.batch_size, shuffle=True
    )
    model = ExamplesVAE(x_train.shape[1], cfg.model.hidden[0], cfg.model.latent).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    dynamic = s.binarize_mode == "dynamic"
    batches = forever(loader)

    def run(n: int) -> None:
        for _ in range(n):
            (x,) = next(batches)
            x = x.to(device)
            if dynamic:
                x = torch.bernoulli(x)
            opt.zero_grad()
            r, mu, logvar = model(x)
            bce = F.binary_cross_entropy(r, x, reduction="sum")
            loss = bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss.backward()
            loss.item()
            opt.step()

    run(20)
    seconds = _windows(run, device, windows, steps, "pytorch/examples", cfg.train.batch_size)
    return cfg.train.batch_size * steps / statistics.median(seconds)


def bench_pythae(s: Setup) -> float:
    """pythae's own trainer (TrainingPipeline), same data and model shape, one epoch. Returns samples/s."""
    try:
        from pythae.models import VAE as PythaeVAE
        from pythae.models import VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
        from pythae.pipelines import TrainingPipeline
        from pythae.trainers import BaseTrainerConfig
    except ImportError:
        raise ConfigError("--vs pythae needs pythae installed: pip install pythae") from None
    import logging
    import tempfile

    cfg = s.cfg
    if not isinstance(cfg.model, MLPConfig):
        raise ConfigError("the 'pythae' peer runs the MLP VAE; benchmark it with --model mlp")
    x_train = to_float(s.x_train.cpu(), s.train_max)
    dims, hidden, latent = x_train[0].numel(), cfg.model.hidden[0], cfg.model.latent
    shape = tuple(x_train.shape[1:])

    class Enc(BaseEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.mu, self.lv = (
                nn.Linear(dims, hidden),
                nn.Linear(hidden, latent),
                nn.Linear(hidden, latent),
            )

        def forward(self, x: torch.Tensor) -> Any:
            h = torch.relu(self.fc1(x.reshape(len(x), -1)))
            return ModelOutput(embedding=self.mu(h), log_covariance=self.lv(h))

    class Dec(BaseDecoder):
        def __init__(self) -> None:
            super().__init__()
            self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, dims)

        def forward(self, z: torch.Tensor) -> Any:
            out = torch.sigmoid(self.fc4(torch.relu(self.fc3(z))))
            return ModelOutput(reconstruction=out.reshape(len(z), *shape))

    logging.disable(logging.WARNING)
    model = PythaeVAE(VAEConfig(input_dim=shape, latent_dim=latent, reconstruction_loss="bce"), Enc(), Dec())
    tcfg = BaseTrainerConfig(
        output_dir=tempfile.mkdtemp(prefix="turbovae-pythae-"), num_epochs=1, learning_rate=cfg.train.lr,
        per_device_train_batch_size=cfg.train.batch_size, per_device_eval_batch_size=1000, steps_saving=None,
        optimizer_cls="Adam", no_cuda=s.device.type != "cuda",
    )  # fmt: skip
    pipe = TrainingPipeline(training_config=tcfg, model=model)
    t0 = time.perf_counter()
    pipe(train_data=x_train.numpy(), eval_data=None)
    return len(x_train) / (time.perf_counter() - t0)


def bench(cfg: Config, *, vs: str | None = None, windows: int = 5, steps: int = 50) -> dict[str, Any]:
    """Benchmark the configured training step (and a peer with ``vs``); one JSON-ready dict."""
    if vs is not None and vs not in PEERS:
        raise ConfigError(f"--vs must be one of {', '.join(PEERS)}, got {vs!r}")
    if windows < 1 or steps < 1:
        raise ConfigError(f"--windows and --window-steps must be >= 1, got {windows} and {steps}")
    runtime.seed_everything(cfg.train.seed)
    s = setup(cfg)
    runtime.configure(s.device, cfg.train.threads)
    hardware.settle(cfg, s)  # the threads and precision train would choose here now (train.threads 0, auto)
    result: dict[str, Any] = {
        "device": runtime.describe(s.device),
        "threads": torch.get_num_threads(),
        "model": cfg.model.name,
        "batch_size": cfg.train.batch_size,
        "precision": s.precision,
        "likelihood": cfg.model.likelihood,
        "binarize": s.binarize_mode,
        "data": s.data.name,
    }
    result.update(bench_turbovae(s, windows, steps))
    ceiling = matmul_ceiling(s.device, s.precision)
    result["ceiling_flops_per_second"] = ceiling
    result["ceiling_fraction"] = result["flops_per_second"] / ceiling
    if vs == "examples":
        result["peer"] = "pytorch/examples"
        result["peer_samples_per_second"] = bench_examples(s, windows, steps)
    elif vs == "pythae":
        result["peer"] = "pythae"
        result["peer_samples_per_second"] = bench_pythae(s)
    if vs is not None:
        result["speedup"] = result["samples_per_second"] / result["peer_samples_per_second"]
    return result


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training throughput against the hardware and a peer",
        description="Time the training step that `turbovae train` with the same options would run: median "
        "samples/s over timed windows after warm-up, FLOP/s against the matmul ceiling measured in the same "
        "run, and with --vs the same model in a peer's training loop on the same data.",
    )
    config_options(p)
    p.add_argument("--vs", choices=("examples", "pythae"), help="also time a peer's loop and print the ratio")
    p.add_argument("--windows", type=int, default=5, help="timed windows (default 5)")
    p.add_argument("--window-steps", type=int, default=50, help="steps per window (default 50)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    result = bench(config_from(args), vs=args.vs, windows=args.windows, steps=args.window_steps)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['data']}, {result['model']}, batch {result['batch_size']}, {result['precision']}, "
          f"{result['device']}; {result['compile']}")  # fmt: skip
    print(f"  turbovae  {result['samples_per_second']:>10,.0f} samples/s  {result['step_ms']:.2f} ms/step  "
          f"{result['flops_per_second'] / 1e9:.1f} GFLOP/s = {100 * result['ceiling_fraction']:.0f}% of the "
          f"measured matmul ceiling ({result['ceiling_flops_per_second'] / 1e9:.0f} GFLOP/s)")  # fmt: skip
    if "tokens_per_second" in result:
        print(f"  turbovae  {result['tokens_per_second']:>10,.0f} tokens/s")
    if "peer" in result:
        print(f"  {result['peer']:<9} {result['peer_samples_per_second']:>10,.0f} samples/s  "
              f"→ speed-up {result['speedup']:.2f}×")  # fmt: skip
    return 0
