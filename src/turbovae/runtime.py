"""Everything hardware-aware: device choice, threads, seeds, precision. Model code never mentions
devices or dtypes; the loop asks this module."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import resource
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from . import _clock
from .errors import ConfigError

M = TypeVar("M", bound=torch.nn.Module)


def select_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU if there is one, else the CPU. Asking for an absent GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"train.device is '{name}' but no CUDA GPU is available; use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device is '{name}' but only {torch.cuda.device_count()} GPU(s) exist")
    return device


def configure(device: torch.device, threads: int = 0) -> None:
    """Per-process settings: CPU threads, TF32 matmuls and cuDNN autotuning on GPUs."""
    if threads > 0:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # shapes are fixed: batches are equal-sized slices


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: the loop owns its randomness explicitly."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Reduced-precision matmuls inside the network; likelihood sums and the KL stay fp32 (they cast)."""
    if precision == "fp32":
        yield
        return
    if precision not in ("bf16", "fp16"):
        raise ConfigError(f"train.precision must be fp32, bf16 or fp16 here, got {precision!r}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def with_precision(fn: Callable[..., Any], device: torch.device, precision: str) -> Callable[..., Any]:
    """``fn`` run under :func:`autocast` at ``precision`` (fp32: ``fn`` itself). The training step calls
    the objective through this, so that the step itself makes no hardware decision."""
    if precision == "fp32":
        return fn

    def run(*args: Any, **kwargs: Any) -> Any:
        with autocast(device, precision):
            return fn(*args, **kwargs)

    return run


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (it also skips steps with inf/NaN gradients); None for bf16 and fp32."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def place(module: M, device: torch.device, channels_last: bool = False) -> M:
    """``module`` on ``device``, NHWC where asked and on CUDA (cuDNN's preferred convolution layout)."""
    if channels_last and device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return module.to(device)


def adam_options(device: torch.device) -> tuple[bool, bool]:
    """Adam's (fused, capturable): fused, one kernel for the whole update (CUDA and CPU: about 15% of a
    small MLP's step on a CPU; it honours found_inf); on CUDA capturable, step counters on the device (for
    CUDA graphs)."""
    return True, device.type == "cuda"


def free_cached_memory(device: torch.device) -> None:
    """Return the caching allocator's free blocks (CUDA), e.g. after an out-of-memory probe."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """The device's peak allocated memory on CUDA (since :func:`reset_peak_memory`); the process's peak
    resident set size on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware here (CUDA with bf16, or a CPU with AMX or AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (for timings); nothing to do on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads, {os.cpu_count()} logical cores)"


def process_seconds() -> float:
    """Wall seconds since this process began running turbovae (the package's import, ``_clock``): its own
    time, imports included (the interpreter's own start, some 20 ms, is not counted), and not that of a
    shell that ran before and ``exec``-ed it, which the kernel's start time of the process counts."""
    return time.perf_counter() - _clock.STARTED


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 where bf16 matmuls run natively (measured faster and within 0.5% of the fp32
    NELBO, see benchmarks/RESULTS.md), else fp32. Explicit choices are checked against the device."""
    if precision == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision fp16 is for CUDA GPUs; use bf16 or fp32 on the CPU")
    return precision


# ---- torch.compile of the training step ------------------------------------------------------------

# Without a measurement of our own: what compiling costs (seconds, cold cache) and what it saves.
COMPILE_DEFAULTS = {"cpu": (30.0, 1.3), "cuda": (40.0, 2.0)}


def compile_estimate(device_type: str) -> tuple[float, float]:
    """(compile seconds, speed-up) assumed without a measurement of our own on this kind of device."""
    return COMPILE_DEFAULTS.get(device_type, (60.0, 1.0))


PROBE_STEPS = 20


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "turbovae"


# torch.compile traces the optimiser's step, which opens a profiler record_function
# ("Optimizer.step#Adam.step"); dynamo logs once that it ignores it, a warning that means nothing to a
# user. It is a logging record (torch._logging's warning_once), not a Python warning, so
# warnings.filterwarnings cannot stop it: a filter on the two loggers that emit it drops exactly it.
_PROFILER_NOISE = re.compile(r"Profiler (record )?function .* will be ignored")
_PROFILER_LOGGERS = ("torch._dynamo.variables.ctx_manager", "torch._dynamo.variables.torch")


class _DropProfilerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _PROFILER_NOISE.search(record.getMessage())


def quiet_compile_logs() -> None:
    """Drop dynamo's "Profiler record function ... will be ignored" warning (idempotent)."""
    for name in _PROFILER_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropProfilerNoise) for f in log.filters):
            log.addFilter(_DropProfilerNoise())


def compile_fn(fn: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """torch.compile with artefacts cached across runs. On GPUs the whole step is then captured as one
    CUDA graph by ``CudaGraphStep`` (inductor's own CUDA graphs cover the forward and backward graphs
    but leave the optimiser and the autograd engine between them on the host: 1.3 ms a step on an
    H100, see benchmarks/RESULTS.md)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_cache_dir() / "inductor"))
    quiet_compile_logs()
    return torch.compile(fn, dynamic=False)


class CudaGraphStep:
    """The whole training step (forward, backward, guard, optimiser, weight average) replayed as one
    CUDA graph: one launch a step instead of hundreds, the pattern of PyTorch's "whole-network capture".

    The first ``WARMUP`` calls run normally on a side stream (optimiser state and compiled kernels come
    into being there), the next one is captured and replayed; later calls copy their tensors into the
    captured inputs and replay. A call whose tensors differ in shape or dtype from the captured ones
    runs without the graph. The returned tensor is overwritten by the next replay: use it before
    calling again. If capture fails, the step says so once and runs without graphs.
    """

    WARMUP = 3

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn, self.calls = fn, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: tuple[torch.Tensor, ...] = ()
        self.static_out: torch.Tensor | None = None
        self.failed = False

    def _signature(self, args: tuple[torch.Tensor, ...]) -> list[tuple[Any, ...]]:
        return [(a.shape, a.dtype, a.device) for a in args]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.failed:
            return self.fn(*args)
        if self.graph is not None:
            if self._signature(args) != self._signature(self.static_in):
                return self.fn(*args)
            for dst, src in zip(self.static_in, args, strict=True):
                dst.copy_(src, non_blocking=True)
            self.graph.replay()
            assert self.static_out is not None
            return self.static_out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        if self.calls <= self.WARMUP:
            with torch.cuda.stream(side):
                out = self.fn(*args)
            torch.cuda.current_stream().wait_stream(side)
            return out
        try:
            self.static_in = tuple(a.clone() for a in args)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static_out = self.fn(*self.static_in)
            self.graph = graph
        except Exception as e:  # capture is best effort: the step itself is correct without it
            self.failed, self.graph = True, None
            print(f"turbovae: warning: CUDA graph capture failed ({str(e).splitlines()[0][:160]}); "
                  "the step runs without graphs", file=sys.stderr)  # fmt: skip
            torch.cuda.synchronize()
            return self.fn(*args)
        self.graph.replay()
        return self.static_out


class StepCompiler:
    """Runs the training step eagerly or compiled, as ``train.compile`` says.

    ``auto`` runs the first ``PROBE_STEPS`` steps eagerly to time them, then compiles only if the
    remaining steps would save more than the compile costs. The cost and the speed-up come from the
    last compiled run with the same key (``~/.cache/turbovae/compile.json``), else from defaults
    measured on the development machines. Compiled runs record what they measured for the next one.
    """

    def __init__(self, step: Callable[..., torch.Tensor], mode: str, device: torch.device, key: str,
                 remaining_steps: int, graphs: bool = True) -> None:  # fmt: skip
        self.eager, self.mode, self.device, self.key = step, mode, device, key
        self.remaining = remaining_steps
        self.calls, self.t_probe = 0, 0.0
        # on CUDA (fixed shapes), every variant of the step runs as one CUDA graph
        self.graphs = graphs and device.type == "cuda"
        self.fn = self._graphed(compile_fn(step, device) if mode == "on" else step)
        self.compiled = mode == "on"
        self.first_compiled_call_s: float | None = None
        self.t_compiled, self.n_compiled = 0.0, 0
        self.decision = ("compile on" if mode == "on" else "eager") + (" + CUDA graph" if self.graphs else "")

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.mode == "auto" and self.calls <= PROBE_STEPS:
            if self.calls == 2:  # the first call includes one-off start-up work
                synchronize(self.device)
                self.t_probe = time.perf_counter()
            out = self.fn(*args)
            if self.calls == PROBE_STEPS:
                synchronize(self.device)
                self._decide((time.perf_counter() - self.t_probe) / (PROBE_STEPS - 1))
            return out
        if self.compiled and self.first_compiled_call_s is None:
            t0 = time.perf_counter()
            out = self.fn(*args)
            synchronize(self.device)
            self.t_compiled, self.n_compiled = time.perf_counter(), 0
            self.first_compiled_call_s = self.t_compiled - t0
            return out
        self.n_compiled += self.compiled
        return self.fn(*args)

    def _graphed(self, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        return CudaGraphStep(fn) if self.graphs else fn

    def _records(self) -> dict[str, Any]:
        try:
            return json.loads((_cache_dir() / "compile.json").read_text())
        except (OSError, ValueError):
            return {}

    def _decide(self, eager_step_s: float) -> None:
        self.eager_step_s = eager_step_s
        cost, speedup = self._records().get(self.key) or compile_estimate(self.device.type)
        remaining = self.remaining - PROBE_STEPS
        saving = remaining * eager_step_s * (1.0 - 1.0 / max(speedup, 1.0))
        if saving > 1.2 * cost:
            self.fn, self.compiled = self._graphed(compile_fn(self.eager, self.device)), True
        verdict = ("compile" if self.compiled else "eager") + (" + CUDA graph" if self.graphs else "")
        self.decision = (
            f"{verdict}: {remaining} steps at {eager_step_s * 1e3:.2f} ms would save {saving:.1f} s "
            f"against a compile cost of {cost:.1f} s"
        )

    def record(self) -> None:
        """Remember this run's compile cost and speed-up for the ``auto`` decision of later runs."""
        if not self.compiled or self.first_compiled_call_s is None or self.n_compiled < PROBE_STEPS:
            return
        synchronize(self.device)
        compiled_step_s = (time.perf_counter() - self.t_compiled) / self.n_compiled
        eager = getattr(self, "eager_step_s", None)
        speedup = eager / compiled_step_s if eager else compile_estimate(self.device.type)[1]
        records = self._records()
        # bounded: a probe timed on a busy machine must not talk later runs into anything extreme
        records[self.key] = [self.first_compiled_call_s, min(max(speedup, 0.5), 4.0)]
        with contextlib.suppress(OSError):
            _cache_dir().mkdir(parents=True, exist_ok=True)
            (_cache_dir() / "compile.json").write_text(json.dumps(records, indent=1))
