"""Optimisers, schedules, the gradient guard (NaN/Inf and adaptive skipping, roll-back), the weight
average, and what the training loop logs about them (issue 4)."""

import copy
import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE
from torch.optim.optimizer import register_optimizer_step_pre_hook

from turbovae import load
from turbovae.config import resolve
from turbovae.engine.finish import COLLAPSE_EXAMPLES
from turbovae.engine.loop import fit
from turbovae.engine.optim import (
    EMA,
    SGD,
    Adamax,
    GradGuard,
    kl_weight_at,
    lr_at,
    lr_tensor,
    make_optimizer,
    total_norm,
    weight_average,
)
from turbovae.engine.setup import build_vae, setup
from turbovae.engine.step import STATS, backward_into, make_step
from turbovae.errors import ConfigError
from turbovae.evaluation import active_units, encode_all


def cfg_with(**train):
    return resolve("digits-mlp", overrides=[f"train.{k}={v}" for k, v in train.items()])


# ---- schedules ----------------------------------------------------------------------------------------


def test_warmup_cosine_gives_the_documented_values():
    cfg = cfg_with(lr=0.01, schedule="warmup-cosine", warmup_steps=10, final_lr=0.1)
    lr = [lr_at(cfg, s, 110) for s in range(110)]
    assert lr[0] == pytest.approx(0.001) and lr[9] == pytest.approx(0.01)  # linear warm-up, (s+1)/10
    assert lr[10] == pytest.approx(0.01)  # the cosine starts at the peak
    assert lr[60] == pytest.approx(0.01 * (0.1 + 0.9 * 0.5))  # halfway down: the mean of peak and floor
    assert lr_at(cfg, 110, 110) == pytest.approx(0.001)  # the floor: final_lr of lr
    assert all(a >= b for a, b in itertools.pairwise(lr[10:]))  # never rises after warm-up


def test_one_cycle_and_constant_schedules():
    cfg = cfg_with(lr=0.01, schedule="one-cycle")
    assert lr_at(cfg, 0, 100) == pytest.approx(0.01 / 25)
    assert lr_at(cfg, 30, 100) == pytest.approx(0.01)  # the peak at 30% of the run
    assert lr_at(cfg, 100, 100) == pytest.approx(0.01 / 25 / 1e4)
    flat = cfg_with(lr=0.01, warmup_steps=4)
    assert [lr_at(flat, s, 100) for s in (0, 3, 4, 99)] == pytest.approx([0.0025, 0.01, 0.01, 0.01])


def test_kl_warmup_and_cyclical_annealing():
    warm = cfg_with(beta=2.0, kl_warmup_steps=100)
    assert [kl_weight_at(warm, s, 1000) for s in (0, 50, 100, 900)] == [0.0, 1.0, 2.0, 2.0]
    cyc = cfg_with(kl_cycles=4)  # period 250: rises over the first 125 steps of each cycle
    assert [kl_weight_at(cyc, s, 1000) for s in (0, 62, 125, 249, 250, 375, 999)] == pytest.approx(
        [0.0, 62 / 125, 1.0, 1.0, 0.0, 1.0, 1.0]
    )
    with pytest.raises(ConfigError, match="two KL schedules"):
        cfg_with(kl_cycles=2, kl_warmup_steps=10)


# ---- optimisers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda p: Adamax(p, lr=0.01), lambda p: torch.optim.Adamax(p, lr=0.01)),
        (
            lambda p: SGD(p, lr=0.01, momentum=0.9),
            lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, nesterov=True),
        ),
    ],
)
def test_own_optimisers_match_torch(ours, theirs):
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    oa, ob = ours([a]), theirs([b])
    for _ in range(5):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_adamax_updates_every_tensor_at_once_like_torch_and_a_skipped_first_step_is_no_step():
    """Adamax's multi-tensor step against torch's Adamax on a model of several tensors with weight
    decay; a flagged first step (NaN gradients) changes nothing, so the runs stay step for step equal."""
    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ref_model = copy.deepcopy(ours_model)
    ours = Adamax(ours_model.parameters(), lr=torch.tensor(0.01), weight_decay=0.01)
    ref = torch.optim.Adamax(ref_model.parameters(), lr=0.01, weight_decay=0.01)
    ours.found_inf = torch.ones(())
    for p in ours_model.parameters():
        p.grad = torch.full_like(p, math.nan)
    before = [p.detach().clone() for p in ours_model.parameters()]
    ours.step()
    assert all(torch.equal(a, b) for a, b in zip(before, ours_model.parameters(), strict=True))
    assert all(torch.equal(v, torch.zeros_like(v)) for st in ours.state.values() for v in st.values())
    ours.found_inf = torch.zeros(())
    for _ in range(20):
        x = torch.randn(16, 6)
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.state[p]["exp_inf"], ref.state[q]["exp_inf"])
        assert ours.state[p]["step"].item() == ref.state[q]["step"].item() == 20


@pytest.mark.parametrize("name", ["adam", "adamw", "adamax", "sgd"])
def test_a_nan_gradient_is_skipped_and_counted_state_and_all(name):
    cfg = cfg_with(optimizer=name, lr=0.01)
    vae = build_vae(cfg, (1, 8, 8)).to(DEVICE)
    opt = make_optimizer(cfg, vae, torch.device(DEVICE))
    step = make_step(vae, opt, None, cfg, torch.device(DEVICE))
    x = torch.rand(16, 1, 8, 8, device=DEVICE).round()
    eps = torch.randn(16, cfg.model.latent, device=DEVICE)
    first = step(x, eps)
    assert first[STATS.index("applied")] == 1 and first[STATS.index("skipped")] == 0
    params = [p.detach().clone() for p in vae.parameters()]
    state = [v.clone() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    bad = x.clone()
    bad[0, 0, 0, 0] = math.nan
    out = step(bad, eps)
    assert out[STATS.index("skipped")] == 1 and out[STATS.index("applied")] == 0
    assert torch.isfinite(out).all()  # a skipped step adds zeros to the loop's sums, never NaN
    assert all(torch.equal(p, q) for p, q in zip(params, vae.parameters(), strict=True))
    after = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(u, v) for u, v in zip(state, after, strict=True))  # moments and step count too
    again = step(x, eps)
    assert again[STATS.index("applied")] == 1
    assert not all(torch.equal(p, q) for p, q in zip(params, vae.parameters(), strict=True))


def _top_level_ops(fn):
    """The names of the top-level aten operators ``fn()`` runs (those not inside another one)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return [e.name for e in prof.events() if e.name.startswith("aten::")
            and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]  # fmt: skip


@pytest.mark.parametrize("name", ["adam", "adamax"])
def test_guard_update_and_average_are_a_few_operators_whatever_the_number_of_tensors(name):
    """Everything after the backward runs multi-tensor kernels: the guard (norm, clipping, skipping),
    the update and the EMA run as many operators for 40 tensors as for 4, and read nothing back."""
    cfg = cfg_with(optimizer=name, clip_grad=1.0, skip_grad=5.0, ema=0.9)
    counts = []
    for layers in (2, 20):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(3, 3) for _ in range(layers)))
        params = list(model.parameters())
        opt = make_optimizer(cfg, model)
        opt.found_inf = torch.zeros(())
        guard, ema = GradGuard(cfg, params, torch.device("cpu")), weight_average(cfg, model, opt)

        def after_backward(guard=guard, opt=opt, ema=ema):
            opt.found_inf.copy_(~guard())
            opt.step()
            ema.update()

        for _ in range(3):  # the state exists after the first step
            for p in params:
                p.grad = torch.randn_like(p)
            ops = _top_level_ops(after_backward)
        assert "aten::item" not in ops and "aten::_local_scalar_dense" not in ops
        counts.append(len(ops))
    assert counts[0] == counts[1], counts


def test_adamax_skips_a_nan_step_mid_run_bit_for_bit_with_weight_decay():
    """A flagged step after applied ones leaves parameters and state bit for bit, weight decay and
    all, and the next step is the one an optimiser that never saw the flagged step takes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = Adamax(model.parameters(), lr=torch.tensor(0.01), weight_decay=0.01)
    opt.found_inf = torch.zeros(())
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
    twin_model = copy.deepcopy(model)
    twin = Adamax(twin_model.parameters(), lr=torch.tensor(0.01), weight_decay=0.01)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    before = [p.detach().clone() for p in model.parameters()]
    state = [v.clone() for st in opt.state.values() for v in st.values()]
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, (math.nan, math.inf, -math.inf)[i % 3])
    opt.found_inf.fill_(1.0)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(state, [v for st in opt.state.values() for v in st.values()],
                                                 strict=True))  # fmt: skip
    opt.found_inf.fill_(0.0)
    x = torch.randn(4, 6)
    for m, o in ((model, opt), (twin_model, twin)):
        o.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters(), strict=True))


def test_backward_into_gives_backwards_gradients_bit_for_bit_and_owned():
    """The step's gradients straight from the graph: the values backward() leaves in .grad, bit for
    bit, and, as AccumulateGrad's, each a tensor of its own with its parameter's strides (a view, one
    tensor that is two parameters' gradient, or other strides are copied)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    top = torch.nn.Parameter(torch.randn(1, 4, 1, 1).contiguous(memory_format=torch.channels_last))
    params = [*conv.parameters(), a, b, top]
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)

    def loss():  # a + b: one gradient tensor for two parameters; top.sum(): an expand's gradient
        h = conv(x) + top
        return h.square().mean() + (a + b).sum() + top.sum()

    loss().backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    backward_into(loss(), params)
    assert all(torch.equal(p.grad, e) for p, e in zip(params, expected, strict=True))
    assert all(p.grad.stride() == p.stride() and p.grad._base is None for p in params)
    assert len({p.grad.data_ptr() for p in params}) == len(params)
    torch._foreach_mul_([p.grad for p in params], 2.0)  # in place, as clipping does: each once
    assert all(torch.equal(p.grad, 2 * e) for p, e in zip(params, expected, strict=True))


def bf16_steps_with_and_without_weight_copies(vae, cfg, shape, steps=3):
    """(stats, parameters, gradients) of ``steps`` bf16 steps of a copy of ``vae``, once with the step's
    bf16 weight copies and once with autocast casting every weight itself; and the top-level aten
    operators of the last step of each."""
    import turbovae.engine.step as step_module

    out = []
    for copies in (True, False):
        model = copy.deepcopy(vae)
        opt = make_optimizer(cfg, model, torch.device(DEVICE))
        ema = weight_average(cfg, model, opt)
        make = step_module.LowPrecisionWeights
        try:
            if not copies:
                step_module.LowPrecisionWeights = lambda *args: None
            step = make_step(model, opt, None, cfg, torch.device(DEVICE), "bf16", ema=ema)
        finally:
            step_module.LowPrecisionWeights = make
        gen = torch.Generator(device=DEVICE).manual_seed(1)
        stats: list[torch.Tensor] = []
        for i in range(steps):
            x = torch.rand(16, *shape, generator=gen, device=DEVICE).round()
            eps = torch.randn(16, model.latent, generator=gen, device=DEVICE)
            if i + 1 < steps:
                stats.append(step(x, eps))
            else:
                ops = _top_level_ops(lambda x=x, eps=eps, step=step, stats=stats: stats.append(step(x, eps)))
        out.append((torch.stack(stats), [p.detach().clone() for p in model.parameters()],
                    [p.grad.clone() for p in model.parameters()], ops))  # fmt: skip
    return out


@pytest.mark.parametrize("config", ["digits-mlp", "digits-conv"])
def test_bf16_steps_read_bf16_weight_copies_and_are_the_autocast_steps_bit_for_bit(config):
    """Under bf16 the layers read bf16 copies of their weights (one multi-tensor copy a step, their
    gradients widened by another) instead of autocast casting each weight at every call and each
    gradient back: the same statistics, parameters and gradients, bit for bit, and no cast per
    tensor left."""
    cfg = resolve(config, overrides=["train.compile=off", "train.ema=0.9"])
    torch.manual_seed(0)
    vae = build_vae(cfg, (1, 8, 8)).to(DEVICE)
    (stats_a, params_a, grads_a, ops_a), (stats_b, params_b, grads_b, ops_b) = (
        bf16_steps_with_and_without_weight_copies(vae, cfg, (1, 8, 8))
    )
    assert torch.equal(stats_a, stats_b)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    tensors = len(params_a)
    assert ops_a.count("aten::to") < ops_b.count("aten::to") - tensors // 2, (
        ops_a.count("aten::to"),
        tensors,
    )


def _fp16_scaler_or_skip(device):
    """A GradScaler for ``device`` and a check that fp16 autocast runs there, or a skip that says why."""
    try:
        scaler = torch.amp.GradScaler(device.type)
        with torch.autocast(device.type, dtype=torch.float16):
            y = torch.nn.functional.linear(torch.ones(2, 3, device=device), torch.ones(4, 3, device=device))
    except (AttributeError, RuntimeError, TypeError) as e:
        pytest.skip(f"torch {torch.__version__} has no fp16 autocast with a GradScaler on {device.type}: {e}")
    if y.dtype != torch.float16:
        pytest.skip(f"torch {torch.__version__} does not autocast linear layers to fp16 on {device.type}")
    return scaler


def test_the_fp16_step_with_a_grad_scaler_learns_and_skips_a_nan_batch():
    """make_step's GradScaler branch, built directly (runtime.resolve_precision keeps fp16 for CUDA): the
    network runs in fp16, the loss falls over a few steps, and a NaN batch is skipped by the scaler,
    counted in STATS, with the parameters untouched."""
    device = torch.device(DEVICE)
    scaler = _fp16_scaler_or_skip(device)
    cfg = resolve("digits-mlp", overrides=["train.lr=3e-3", "model.hidden=[64]"])
    torch.manual_seed(0)
    vae = build_vae(cfg, (1, 8, 8)).to(device)
    dtypes = set()
    first_layer = next(m for m in vae.modules() if isinstance(m, torch.nn.Linear))
    first_layer.register_forward_hook(lambda module, args, y: dtypes.add(y.dtype))
    opt = make_optimizer(cfg, vae, device)
    step = make_step(vae, opt, scaler, cfg, device, "fp16")
    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.rand(64, 1, 8, 8, generator=g, device=device) < 0.3).float()
    x[:32, :, 2:6, 2:6] = 1.0  # two kinds of images: something to learn
    noise = lambda: torch.randn(64, cfg.model.latent, generator=g, device=device)  # noqa: E731
    losses, sums = [], torch.zeros(len(STATS), device=device)
    for _ in range(30):
        out = step(x, noise())
        sums += out
        losses.append(out[STATS.index("loss")].item())
    assert dtypes == {torch.float16}  # autocast ran the network in fp16
    # fp16 overflows at the scaler's initial scale could skip a first step or two; the rest are applied
    applied, skipped = sums[STATS.index("applied")].item(), sums[STATS.index("skipped")].item()
    assert applied >= 28 and applied + skipped == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 2  # nats per image: it learns
    scale = scaler.get_scale()
    params = [p.detach().clone() for p in vae.parameters()]
    bad = x.clone()
    bad[0, 0, 0, 0] = math.nan
    out = step(bad, noise())
    assert out[STATS.index("skipped")] == 1 and out[STATS.index("applied")] == 0
    assert torch.isfinite(out).all()  # nothing of the NaN step reaches the loop's sums
    assert all(torch.equal(p, q) for p, q in zip(params, vae.parameters(), strict=True))
    assert scaler.get_scale() == scale / 2  # the scaler saw the inf and backed off
    out = step(x, noise())
    assert out[STATS.index("applied")] == 1
    assert not all(torch.equal(p, q) for p, q in zip(params, vae.parameters(), strict=True))


def _guard_run(norms, skip=3.0):
    """Feed the guard gradients of the given norms; the list of keep decisions."""
    cfg = cfg_with(skip_grad=skip)
    p = torch.nn.Parameter(torch.zeros(4))
    guard = GradGuard(cfg, [p], torch.device("cpu"))
    keeps = []
    for n in norms:
        p.grad = torch.full((4,), n / 2.0)  # the norm of four equal entries v is 2v
        keeps.append(bool(guard()))
    return keeps


def test_adaptive_skip_catches_outliers_and_follows_a_lasting_change_of_scale():
    gen = torch.Generator().manual_seed(0)
    healthy = (1 + 0.2 * torch.randn(300, generator=gen)).abs().tolist()
    keeps = _guard_run([*healthy[:100], 50.0, *healthy[100:]])
    assert keeps[100] is False  # the spike is skipped
    assert sum(not k for k in keeps) == 1  # and only the spike: nothing of the healthy run
    # the scale grows tenfold for good: skipped at first, then the running mean catches up (no stall)
    keeps = _guard_run([*healthy[:100], *[10 * v for v in healthy[100:]]])
    skipped_after = [not k for k in keeps[100:]]
    assert any(skipped_after[:5]) and not any(skipped_after[100:])


def test_clipping_bounds_the_applied_gradient():
    cfg = cfg_with(clip_grad=1.0)
    p = torch.nn.Parameter(torch.zeros(4))
    guard = GradGuard(cfg, [p], torch.device("cpu"))
    p.grad = torch.full((4,), 5.0)
    assert guard() and guard.state["last_norm"].item() == pytest.approx(10.0)  # the pre-clip norm is logged
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-4)


def test_the_guards_norm_is_the_global_l2_norm_and_inf_or_nan_skip():
    gen = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(400, 784, generator=gen),
        torch.randn(20, generator=gen),
        torch.randn(3, 5, generator=gen),
    ]
    expected = torch.cat([g.double().reshape(-1) for g in grads]).norm().float()
    for multi_tensor in (False, True):  # one dot per tensor (CPU), torch's multi-tensor norm (CUDA)
        torch.testing.assert_close(total_norm(grads, multi_tensor), expected, rtol=1e-5, atol=0)
        assert total_norm([torch.tensor([3.0, 4.0])], multi_tensor).item() == 5.0
        for bad, norm in ((math.nan, math.nan), (math.inf, math.inf), (1e20, math.inf)):
            got = total_norm([torch.tensor([1.0, bad]), torch.ones(3)], multi_tensor).item()
            assert got == norm or (math.isnan(norm) and math.isnan(got))
    cfg = cfg_with()
    p = torch.nn.Parameter(torch.zeros(4))
    guard = GradGuard(cfg, [p], torch.device("cpu"))
    for bad in (math.nan, math.inf, 1e20):  # 1e20: its square overflows float32, as Adam's moments would
        p.grad = torch.tensor([1.0, bad, 0.0, 0.0])
        assert not guard() and guard.state["last_norm"].item() == 0.0
    p.grad = torch.full((4,), 0.5)
    assert guard() and guard.state["last_norm"].item() == 1.0
    assert guard.state["nonfinite"].item() == 3 and guard.state["max_run"].item() == 3
    assert guard.state["run"].item() == 0 and guard.state["seen"].item() == 1
    assert guard.state["ema"].item() == pytest.approx(0.01)  # one finite norm of 1.0 heard


def test_ema_averages_with_a_warm_up_and_swaps_back():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()  # d = min(0.5, 1/10): the first update moves 90% of the way
    assert all(torch.allclose(e, s + 0.9) for e, s in zip(ema.params, start, strict=True))
    for _ in range(20):  # after the warm-up d = 0.5: each update halves the remaining distance
        ema.update()
    assert all(torch.allclose(e, s + 1.0, atol=1e-5) for e, s in zip(ema.params, start, strict=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    assert all(torch.allclose(e, s + 1.5, atol=1e-5) for e, s in zip(ema.params, start, strict=True))
    with ema.swapped():
        assert all(torch.allclose(p, e) for p, e in zip(model.parameters(), ema.params, strict=True))
    assert all(torch.allclose(p, s + 2.0) for p, s in zip(model.parameters(), start, strict=True))


# ---- the loop -----------------------------------------------------------------------------------------

# the runs train where the tests run (TURBOVAE_DEVICE; benchmarks/gpu.sh sets cuda), and the checks
# that recompute a run's figures use the same device (its generators and kernels)
SMALL = ["train.epochs=3", "train.log_every=5", "eval.iwae_k=0", "train.threads=1", "train.compile=off",
         f"train.device={DEVICE}"]  # fmt: skip


def run(tmp_path, *overrides, name="run"):
    cfg = resolve("digits-mlp", overrides=[*SMALL, *overrides])
    out = tmp_path / name
    summary = fit(cfg, out, progress=False)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, summary, events


def test_metrics_carry_noise_scale_active_units_and_skips(tmp_path):
    out, summary, events = run(tmp_path, "train.skip_grad=4", "train.epochs=10")
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert all("noise_scale" in e and e["noise_scale"] > 0 for e in train[2:])
    assert len(evals) == 10 and all(len(e["kl_per_dim"]) == 16 for e in evals)
    # the last epoch's count is the trained model's, recomputed here from its checkpoint on the same
    # validation images; after 10 epochs the model uses its latents again (11 of 16 active; 0: a collapse)
    s = setup(resolve("digits-mlp", overrides=SMALL), torch.device(DEVICE))
    q = encode_all(load(out), s.x_val[:COLLAPSE_EXAMPLES], s.prepare_val)
    assert evals[-1]["active_units"] == active_units(q)[0] >= 4
    # a healthy run: the adaptive skip leaves every step alone, and the counts add up
    assert all(e["grad_norm"] > 0 for e in train)
    assert sum(e["skipped"] for e in train) == train[-1]["skipped_total"] == summary["skipped_steps"] == 0


def test_repeated_nan_gradients_roll_back_with_a_lower_lr(tmp_path, monkeypatch, capsys):
    import turbovae.engine.loop as t

    real = t.compiled_step

    def poisoned(r):
        # the batches are poisoned on their way into the step as the loop runs it (on CUDA: into the
        # captured graph's inputs, so the roll-back is tested against the replayed graph too)
        compiled = real(r)
        inner, calls = compiled.fn, {"n": 0}

        def bad_for_a_while(x, eps, *rest):
            calls["n"] += 1
            if 12 <= calls["n"] < 20:  # eight NaN batches in a row: more than nan_patience (5)
                x = torch.full_like(x, math.nan)
            return inner(x, eps, *rest)

        compiled.fn = bad_for_a_while
        return compiled

    monkeypatch.setattr(t, "compiled_step", poisoned)
    _, summary, events = run(tmp_path, "train.nan_patience=5")
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["lr_scale"] == 0.5 and rollbacks[0]["to_step"] == 10
    assert summary["rollbacks"] == 1 and summary["skipped_steps"] == 8
    train = [e for e in events if e["event"] == "train"]
    assert sum(e["skipped"] for e in train) == train[-1]["skipped_total"] == 8  # the eight poisoned steps
    assert math.isfinite(summary["test_nelbo"])
    lrs = [e["lr"] for e in events if e["event"] == "train"]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(5e-4)
    assert "rolled back to the state of step 10" in capsys.readouterr().err


def test_a_schedule_free_roll_back_restores_the_step_count_and_the_base_sequence(tmp_path, monkeypatch):
    """schedulefree keeps k, weight_sum and lr_max in the parameter group, not in the per-parameter
    state: the roll-back restores them with y, z and the second moments. It used to keep the later
    step's k and weight_sum, and a snapshot from before the first step put z at 0 (x pulled to 0)."""
    import turbovae.engine.loop as t
    from turbovae.engine import state as state_module

    real_step, real_start, real_restore = t.compiled_step, t.start, state_module.Snapshot.restore
    runs, restored = [], []

    def start(*args, **kwargs):
        runs.append(real_start(*args, **kwargs))
        return runs[-1]

    def poisoned(r):  # the batches poisoned on their way into the step (on CUDA: into its graph)
        compiled = real_step(r)
        inner, calls = compiled.fn, {"n": 0}

        def bad_for_a_while(x, eps, *rest):
            calls["n"] += 1
            if 3 <= calls["n"] < 10 or 17 <= calls["n"] < 24:  # two runs of 7 NaN batches (patience 5)
                x = torch.full_like(x, math.nan)
            return inner(x, eps, *rest)

        compiled.fn = bad_for_a_while
        return compiled

    def restore(self):
        real_restore(self)
        opt = self.st.opt
        params = opt.param_groups[0]["params"]
        fresh = all("z" not in opt.state[p] or torch.equal(opt.state[p]["z"], p) for p in params)
        restored.append((opt.param_groups[0]["k"], fresh))

    monkeypatch.setattr(t, "compiled_step", poisoned)
    monkeypatch.setattr(t, "start", start)
    monkeypatch.setattr(state_module.Snapshot, "restore", restore)
    _, summary, _ = run(tmp_path, *SF, "train.nan_patience=5", "train.epochs=2")
    assert summary["rollbacks"] == 2 and summary["skipped_steps"] == 14 and summary["steps"] > 23
    # at step 10 back to the start (k = 0, a fresh state: z is y); at the epoch's end (step 22, six bad
    # steps) back to the snapshot of step 15, five applied steps (11-15) after the first roll-back; then
    # one more bad step (23) and good ones to the end
    assert restored == [(0, True), (5, False)]
    assert runs[0].st.opt.param_groups[0]["k"] == 5 + summary["steps"] - 23
    assert math.isfinite(summary["test_nelbo"])


def test_ema_weights_are_what_the_run_evaluates_and_load_returns(tmp_path):
    out, _, _ = run(tmp_path, "train.ema=0.9")
    vae = load(out)
    from turbovae.engine import checkpoint

    tensors, _ = checkpoint.load(checkpoint.latest(out))
    for name, p in vae.named_parameters():
        assert torch.equal(p.detach(), tensors[f"ema.{name}"])
        assert not torch.equal(p.detach(), tensors[f"model.{name}"])  # the average is not the last step


def test_posterior_collapse_is_warned_about(tmp_path, capsys):
    _, _, events = run(tmp_path, "train.beta=30")
    assert any(e["event"] == "warning" and "posterior collapse" in e["message"] for e in events)
    assert "train.free_bits" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override",
    [
        "train.skip_grad=0.5",
        "train.ema=1.5",
        "train.schedule=linear",
        "train.betas=[0.9]",
        "train.betas=[0.9,1.0]",
        "model.init_output_bias=true model.name=conv",
        "model.init_output_bias=true model.likelihood=gaussian",
    ],
)
def test_impossible_settings_are_refused(override):
    with pytest.raises(ConfigError):
        resolve("digits-mlp", overrides=override.split())


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "adamax", "schedulefree"])
def test_train_betas_reach_the_optimiser(optimizer):
    cfg = resolve("digits-mlp", overrides=[f"train.optimizer={optimizer}", "train.betas=[0.95,0.99]"])
    opt = make_optimizer(cfg, torch.nn.Linear(3, 2), torch.device("cpu"))
    assert all(tuple(g["betas"]) == (0.95, 0.99) for g in opt.param_groups)
    default = make_optimizer(resolve("digits-mlp"), torch.nn.Linear(3, 2), torch.device("cpu"))
    assert tuple(default.param_groups[0]["betas"]) == (0.9, 0.999)


def test_the_output_bias_starts_at_the_logit_of_the_mean_training_image():
    cfg = resolve("digits-mlp", overrides=["model.init_output_bias=true", "data.validation=0"])
    s = setup(cfg)
    mean = (s.x_train.double().mean(0) / s.train_max).clamp(1e-3, 1 - 1e-3).flatten()
    bias = s.vae.net.decoder[-1].bias.detach().double()
    torch.testing.assert_close(bias, (mean / (1 - mean)).log(), rtol=1e-5, atol=1e-5)
    # without the option the bias keeps torch's default initialisation
    assert not torch.allclose(setup(resolve("digits-mlp")).vae.net.decoder[-1].bias.detach().double(), bias)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU (benchmarks/gpu.sh runs this)")
@pytest.mark.parametrize("optimizer", ["adam", "adamax", "schedulefree"])
def test_the_step_replayed_as_one_cuda_graph_matches_the_plain_step(optimizer):
    from turbovae.runtime import CudaGraphStep

    sf = optimizer == "schedulefree"
    cfg = cfg_with(optimizer=optimizer, lr=0.01, skip_grad=5, clip_grad=10, **({} if sf else {"ema": 0.9}))
    device = torch.device("cuda")

    def build():
        torch.manual_seed(0)
        vae = build_vae(cfg, (1, 8, 8)).to(device)
        opt = make_optimizer(cfg, vae, device)
        assert getattr(opt, "device_scalars", True)  # schedule-free keeps its scalars on the device
        ema = weight_average(cfg, vae, opt)
        return vae, make_step(vae, opt, None, cfg, device, ema=ema), ema, opt

    (va, plain, ema_a, _), (vb, step, ema_b, opt_b) = build(), build()
    graphed = CudaGraphStep(step)
    gen = torch.Generator(device=device).manual_seed(1)
    for i in range(12):
        x = torch.rand(32, 1, 8, 8, device=device, generator=gen).round()
        if i == 8:
            x[0, 0, 0, 0] = math.nan  # a skipped step, decided inside the graph
        eps = torch.randn(32, cfg.model.latent, device=device, generator=gen)
        a, b = plain(x, eps).clone(), graphed(x, eps).clone()
        torch.testing.assert_close(a, b)
        assert b[STATS.index("skipped")] == (i == 8)
    assert graphed.graph is not None and not graphed.failed
    if sf:  # the step count went on inside the graph: 11 steps taken, the flagged one not counted
        assert opt_b.state_dict()["param_groups"][0]["k"] == 11

    def averaged(a):  # EMA's weights, or schedule-free's x
        return a.average() if sf else a.params

    for p, q in zip([*va.parameters(), *averaged(ema_a)], [*vb.parameters(), *averaged(ema_b)], strict=True):
        torch.testing.assert_close(p, q)


# ---- schedule-free AdamW (schedulefree) ---------------------------------------------------------------

SF = ["train.optimizer=schedulefree", "train.lr=5e-3", "train.warmup_steps=10"]


def test_schedule_free_reads_the_loops_rate_and_skips_a_flagged_step_entirely():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = make_optimizer(cfg_with(optimizer="schedulefree", lr=0.01), model)
    lr = lr_tensor(opt)
    lr.fill_(0.02)  # the loop's schedule fills this tensor in; the optimiser must follow it
    opt.found_inf = torch.zeros(())
    model(torch.randn(8, 4)).square().sum().backward()
    opt.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02) and opt.param_groups[0]["k"] == 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    z = [opt.state[p]["z"].clone() for p in model.parameters()]
    opt.found_inf.fill_(1.0)  # a NaN gradient: nothing may move, the step count included
    for p in model.parameters():
        p.grad = torch.full_like(p, math.nan)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(a, opt.state[p]["z"]) for a, p in zip(z, model.parameters(), strict=True))
    assert opt.param_groups[0]["k"] == 1


def _schedule_free_pair():
    """A small model with turbovae's schedule-free optimiser and its copy with schedulefree's own."""
    import schedulefree

    torch.manual_seed(0)
    ours_model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    ref_model = copy.deepcopy(ours_model)
    opt = make_optimizer(cfg_with(optimizer="schedulefree", lr=0.01), ours_model)
    opt.found_inf = torch.zeros(())
    ref = schedulefree.AdamWScheduleFree(ref_model.parameters(), lr=0.01, warmup_steps=0)
    ref.train()
    return ours_model, opt, ref_model, ref


def _next_batch_at_rate(opt, ref, i):
    """Step i's batch, with both optimisers' rate set to a warm-up over the first 10 steps."""
    rate = 0.01 * min(1.0, (i + 1) / 10)
    lr_tensor(opt).fill_(rate)
    for group in ref.param_groups:
        group["lr"] = rate
    return torch.randn(16, 6)


def test_schedule_free_on_the_fused_kernel_follows_the_library_step_for_step():
    """The fused update (torch's fused Adam for z, then y) against schedulefree's own step: the same
    parameters, z, second moments and averaging weights over 40 steps with a changing rate."""
    ours_model, opt, ref_model, ref = _schedule_free_pair()
    for i in range(40):
        x = _next_batch_at_rate(opt, ref, i)
        for model, o in ((ours_model, opt), (ref_model, ref)):
            o.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            o.step()
    assert opt.param_groups[0]["k"] == ref.param_groups[0]["k"] == 40
    assert opt.param_groups[0]["weight_sum"] == pytest.approx(ref.param_groups[0]["weight_sum"])
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        assert not torch.equal(p, q.new_zeros(q.shape))
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ("z", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-7)
    # and it is the fused path that ran, not the library's step
    assert getattr(opt, "_fused_scratch", None)


def test_schedule_free_with_its_scalars_on_the_device_follows_the_library_and_skips_exactly():
    """The CUDA form of the step (k, weight_sum, lr_max, the rate and the skip flag all device tensors,
    nothing read back, so it can be captured in a CUDA graph), here forced on the CPU: the library's
    step for step over 40 steps with a changing rate, a flagged step that moves nothing (the scalars
    included), and the scalars back in the group for a checkpoint and out of it on loading."""
    ours_model, opt, ref_model, ref = _schedule_free_pair()
    assert not opt.device_scalars  # made on the CPU: the host's form, forced to the device's here
    opt.device_scalars = True
    for i in range(40):
        x = _next_batch_at_rate(opt, ref, i)
        opt.zero_grad(set_to_none=True)
        ours_model(x).square().mean().backward()
        if i == 20:  # a flagged step: the reference takes none
            before = [p.detach().clone() for p in ours_model.parameters()]
            state = [v.clone() for p in ours_model.parameters() for v in opt.state[p].values()]
            scalars = {k: v.clone() for k, v in opt._scalars[0].items()}
            opt.found_inf.fill_(1.0)
            for p in ours_model.parameters():
                p.grad.fill_(math.nan)
            opt.step()
            opt.found_inf.fill_(0.0)
            assert all(torch.equal(a, b) for a, b in zip(before, ours_model.parameters(), strict=True))
            after = [v for p in ours_model.parameters() for v in opt.state[p].values()]
            assert all(torch.equal(a, b) for a, b in zip(state, after, strict=True))
            assert all(torch.equal(v, opt._scalars[0][k]) for k, v in scalars.items())
            continue
        opt.step()
        ref.zero_grad(set_to_none=True)
        ref_model(x).square().mean().backward()
        ref.step()
    assert opt.param_groups[0]["k"] == 0  # the group holds the host's copy until it is read back
    sd = opt.state_dict()
    assert sd["param_groups"][0]["k"] == opt.param_groups[0]["k"] == ref.param_groups[0]["k"] == 39
    assert opt.param_groups[0]["weight_sum"] == pytest.approx(ref.param_groups[0]["weight_sum"])
    assert opt.param_groups[0]["lr_max"] == pytest.approx(ref.param_groups[0]["lr_max"])
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key in ("z", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-7)
    # loading puts the scalars back on the device, into the same tensors (a captured step holds them)
    held = opt._scalars[0]["k"]
    sd["param_groups"][0]["k"] = 7
    opt.load_state_dict(sd)
    assert opt._scalars[0]["k"] is held and held.item() == 7


def test_schedule_free_steps_allocate_nothing_after_the_first(monkeypatch):
    """The fused step's scratch buffers are made once: a later step calls no zeros_like (it used to
    make and drop one buffer per parameter every step, a third of the step's time on a CPU)."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    opt = make_optimizer(cfg_with(optimizer="schedulefree", lr=0.01), model)
    opt.found_inf = torch.zeros(())
    model(torch.randn(4, 6)).sum().backward()
    opt.step()

    def refuse(*args, **kwargs):
        raise AssertionError("zeros_like called in a later step")

    monkeypatch.setattr(torch, "zeros_like", refuse)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["schedulefree", "adam", "adamw", "adamax", "sgd"])
def test_no_optimiser_imports_torch_dynamo(optimizer):
    """torch.optim's methods are wrapped in torch._disable_dynamo (Adam's step in a graph break), whose
    first call imports torch._dynamo (1-3 s of a run's start on a 2-core CPU); outside torch.compile the
    optimisers run them unwrapped. Adam and AdamW used to import it in their constructor."""
    code = (
        "import sys, torch\n"
        "from turbovae.config import resolve\n"
        "from turbovae.engine.optim import make_optimizer\n"
        f"cfg = resolve('digits-mlp', overrides=['train.optimizer={optimizer}'])\n"
        "m = torch.nn.Linear(3, 2)\n"
        "opt = make_optimizer(cfg, m)\n"
        "opt.found_inf = torch.zeros(())\n"
        "m(torch.randn(4, 3)).sum().backward()\n"
        "opt.step(); opt.zero_grad(); opt.load_state_dict(opt.state_dict())\n"
        "opt.zero_grad(set_to_none=False)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_adam_under_torch_compile_runs_step_hooks_once_per_step():
    """Under torch.compile the optimiser runs torch's own step, without the hook wrapper torch puts on
    torch.optim.Adam once a plain Adam exists (it used to nest two: a global pre-hook ran twice)."""
    torch.optim.Adam(torch.nn.Linear(2, 2).parameters())  # torch patches Adam.step with its hooks
    model = torch.nn.Linear(4, 3)
    opt = make_optimizer(cfg_with(lr=0.01), model)
    calls = []
    handle = register_optimizer_step_pre_hook(lambda *a: calls.append(1))
    try:

        @torch.compile(backend="eager")
        def step(x):
            opt.zero_grad(set_to_none=True)
            model(x).square().sum().backward()
            opt.step()

        for _ in range(3):
            step(torch.randn(8, 4))
    finally:
        handle.remove()
    assert len(calls) == 3 and opt.state[model.weight]["step"].item() == 3


@pytest.mark.skipif(DEVICE != "cuda", reason="the device form of schedule-free is CUDA's")
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_schedule_free_keeps_its_scalars_on_cuda_only_where_its_device_step_applies(weight_decay):
    """With weight decay the library's step runs, which reads the host: that run is not captured."""
    model = torch.nn.Linear(4, 3).cuda()
    opt = make_optimizer(cfg_with(optimizer="schedulefree", lr=0.01, weight_decay=weight_decay), model)
    assert opt.device_scalars == (weight_decay == 0)


def test_schedule_free_with_weight_decay_takes_the_library_step():
    """Weight decay is taken at y by the library: the fused kernel does not apply, the library's step
    runs (the same bits as schedulefree's own)."""
    import schedulefree

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ref_model = copy.deepcopy(model)
    opt = make_optimizer(cfg_with(optimizer="schedulefree", lr=0.01, weight_decay=0.1), model)
    opt.found_inf = torch.zeros(())
    ref = schedulefree.AdamWScheduleFree(ref_model.parameters(), lr=0.01, warmup_steps=0, weight_decay=0.1)
    ref.train()
    x = torch.randn(8, 4)
    for m, o in ((model, opt), (ref_model, ref)):
        m(x).square().sum().backward()
        o.step()
    assert not getattr(opt, "_fused_scratch", None)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters(), strict=True))


def checkpoint_k(out):
    """Schedule-free's step count k as the run's latest checkpoint holds it."""
    from turbovae.engine import checkpoint

    return checkpoint.load(checkpoint.latest(out))[1]["optimizer"]["param_groups"][0]["k"]


@pytest.mark.parametrize("device_scalars", [None, True])
def test_schedule_free_run_evaluates_and_saves_its_average_and_resumes_exactly(
    tmp_path, monkeypatch, device_scalars
):
    """``device_scalars``: True forces the CUDA form of the step (its scalars on the device) on the CPU."""
    if device_scalars:
        import turbovae.engine.loop as t

        real = t.make_optimizer

        def on_device(*args, **kwargs):
            opt = real(*args, **kwargs)
            opt.device_scalars = True
            return opt

        monkeypatch.setattr(t, "make_optimizer", on_device)
    out, summary, _ = run(tmp_path, *SF, "train.epochs=2", name="whole")
    assert summary["steps"] == checkpoint_k(out)
    assert math.isfinite(summary["test_nelbo"]) and summary["compile"] == "eager"
    from turbovae.engine import checkpoint

    tensors, meta = checkpoint.load(checkpoint.latest(out))
    vae = load(out)
    beta1 = meta["optimizer"]["param_groups"][0]["betas"][0]
    for i, (name, p) in enumerate(vae.named_parameters()):
        # x = y + (1 - 1/beta1)(z - y): schedulefree's eval() weights, what load() and evaluation use
        x = torch.lerp(tensors[f"model.{name}"], tensors[f"optim.{i}.z"], 1 - 1 / beta1)
        assert torch.equal(p.detach(), tensors[f"ema.{name}"]) and torch.allclose(p.detach(), x)
        assert not torch.equal(p.detach(), tensors[f"model.{name}"])
    # the summary's test NELBO is the average's: the loaded model, with the final evaluation's noise,
    # gives it again (the training point y gives another figure)
    s = setup(resolve("digits-mlp", overrides=[*SMALL, *SF]), torch.device(DEVICE))
    from turbovae import evaluation
    from turbovae.runtime import generator

    def test_nelbo(model):
        gen = generator(s.device, 54321)  # engine/finish.py's
        return evaluation.nelbo(model, s.x_test, s.prepare_test, batch_size=1000, generator=gen)["nelbo"]

    assert test_nelbo(vae) == pytest.approx(summary["test_nelbo"], rel=1e-6)
    vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    assert test_nelbo(vae) != pytest.approx(summary["test_nelbo"], rel=1e-6)
    # resumed after its first epoch, the run ends on the same bits as the uninterrupted one
    cfg = resolve("digits-mlp", overrides=[*SMALL, *SF, "train.epochs=1"])
    fit(cfg, tmp_path / "part", progress=False)
    cfg2 = resolve("digits-mlp", overrides=[*SMALL, *SF, "train.epochs=2"])
    fit(cfg2, tmp_path / "part", resume=True, progress=False)
    a, b = (
        checkpoint.load(checkpoint.latest(out))[0],
        checkpoint.load(checkpoint.latest(tmp_path / "part"))[0],
    )
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override", ["train.schedule=warmup-cosine", "train.ema=0.99"])
def test_schedule_free_refuses_a_schedule_or_a_second_average(override):
    with pytest.raises(ConfigError, match="schedulefree"):
        resolve("digits-mlp", overrides=["train.optimizer=schedulefree", override])


def test_schedule_free_without_its_package_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "schedulefree", None)  # import schedulefree raises ImportError
    with pytest.raises(ConfigError, match="pip install schedulefree"):
        make_optimizer(cfg_with(optimizer="schedulefree"), torch.nn.Linear(2, 2))
