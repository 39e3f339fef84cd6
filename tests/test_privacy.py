"""Differentially private training (``engine/privacy.py``): per-example clipping, the noise's scale, the
accountant's (ε, δ), the private table transform, and the combinations refused in one line."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from turbovae.config import resolve as resolve_dotted
from turbovae.config import setting_key
from turbovae.data.table_transform import decode, load_table
from turbovae.data.tables import Column, Table
from turbovae.engine import privacy
from turbovae.engine.optim import GradGuard
from turbovae.engine.setup import build_vae
from turbovae.errors import ConfigError

pytest.importorskip("opacus")

SMALL = {"hidden": [16], "latent": 4, "dp_epsilon": 1.0}


def resolve(preset: str, flags: dict) -> object:
    """The preset with settings as the API takes them (``epochs``, ``hidden``: the key alone)."""
    return resolve_dotted(preset, flags={setting_key(k): v for k, v in flags.items()})


def rows(n: int = 200) -> Table:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 10, n).round(2)
    return Table([Column("x", "continuous", x, decimals=2),
                  Column("k", "categorical", np.where(x > 5, "a", "b").astype(object))])  # fmt: skip


class Still:
    """An optimiser that leaves the parameters (and their gradients) as they are."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def step(self) -> None:
        pass


def pair() -> Table:
    x = rows().column("x").values
    return Table([Column("x", "continuous", x, decimals=2), Column("y", "continuous", x + 5, decimals=2)])


def private_step(dp: dict, n: int = 200) -> tuple[list[torch.nn.Parameter], int]:
    """Runs one DP-SGD step with learning rate 0; the parameters, their gradients set."""
    cfg = resolve("tabular", flags=SMALL)
    data = load_table("csv:rows.csv", rows=rows(n), private=True)
    vae = build_vae(cfg, tuple(data.x_train.shape[1:]), data.meta)
    params = [p for p in vae.parameters() if p.requires_grad]
    guard = GradGuard(cfg, params, torch.device("cpu"))
    data_args = ((data.x_train, None), dp, torch.Generator().manual_seed(0), lambda x: x)
    step = privacy.make_private_step(vae, Still(), cfg, guard, None, *data_args)  # type: ignore[arg-type]
    stats = step(data.x_train[:4], torch.zeros(4, 4))
    assert stats.shape == (7,)
    return params, len(data.x_train)


def norm(params: list[torch.nn.Parameter]) -> float:
    return float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params)))  # type: ignore[union-attr,misc]


def test_each_example_is_clipped_and_the_noise_has_its_scale() -> None:
    clip = 1e-3  # far below any example's gradient norm: every one is cut to it
    params, n = private_step({"sample_rate": 1.0, "noise_multiplier": 0.0, "max_grad_norm": clip})
    assert 0.2 * clip < norm(params) <= clip * (1 + 1e-4)  # the mean of n vectors of norm C
    unclipped, _ = private_step({"sample_rate": 1.0, "noise_multiplier": 0.0, "max_grad_norm": 1e6})
    assert norm(unclipped) > 100 * clip
    # no example drawn (q tiny): the update is the noise alone, N(0, (σC / qN)²) per coordinate
    q, sigma = 1e-7, 2.0
    noisy, n = private_step({"sample_rate": q, "noise_multiplier": sigma, "max_grad_norm": 1.0})
    values = torch.cat([p.grad.flatten() for p in noisy])  # type: ignore[union-attr]
    assert values.std().item() == pytest.approx(sigma / (q * n), rel=0.05)


def test_the_noise_multiplier_spends_the_target_epsilon() -> None:
    cfg = resolve("tabular", flags={"dp_epsilon": 1.0, "dp_delta": 1e-5, "batch_size": 500})
    plan = privacy.plan(cfg, 48_000, 96 * 20)
    assert plan["sample_rate"] == pytest.approx(500 / 48_000)
    spent = privacy.spent(plan["noise_multiplier"], plan["sample_rate"], 96 * 20, 1e-5)
    assert 0.95 <= spent <= 1.0
    assert privacy.spent(plan["noise_multiplier"], plan["sample_rate"], 96 * 10, 1e-5) < spent  # fewer steps
    longer = privacy.plan(cfg, 48_000, 96 * 80)
    assert longer["noise_multiplier"] > plan["noise_multiplier"]


def test_a_private_transform_takes_declared_bounds_and_says_what_it_read() -> None:
    data = load_table("csv:rows.csv", rows=rows(), private=True, constraints=["-5 <= x <= 20"])
    transform = data.meta["table"]
    spec = transform["columns"][0]
    assert spec["transform"] == "bounds" and (spec["min"], spec["max"]) == (-5.0, 20.0)  # not 0..10
    assert "modes" not in spec  # no mixture fitted on the rows
    assert transform["privacy"]["not_covered"] == ["k: categories read from the rows"]
    back = decode(np.random.default_rng(0).normal(0, 3, (1000, transform["layout"]["dims"])), transform)
    assert back.column("x").values.min() >= -5 and back.column("x").values.max() <= 20
    loose = load_table("csv:rows.csv", rows=rows(), private=True)
    assert loose.meta["table"]["privacy"]["not_covered"][0].startswith("x: range read from the rows")
    both = load_table(
        "csv:rows.csv", rows=pair(), private=True, constraints=["0 <= x <= 10", "5 <= y <= 30", "x <= y"]
    )
    assert {c["name"]: (c["min"], c["max"]) for c in both.meta["table"]["columns"]}["y"] == (
        0.0,
        30.0,
    )  # y − x


@pytest.mark.parametrize(
    ("flags", "world", "precision", "message"),
    [
        ({}, 2, "fp32", "does not support torchrun"),
        ({"compile": "on"}, 1, "fp32", "does not support train.compile=on"),
        ({}, 1, "bf16", "does not support precision bf16"),
        ({"skip_grad": 3.0}, 1, "fp32", "does not support train.skip_grad"),
        ({"dp_delta": 1.5}, 1, "fp32", r"train.dp_delta must be in \(0, 1\)"),
    ],
)
def test_impossible_combinations_are_refused_in_one_line(
    flags: dict, world: int, precision: str, message: str
) -> None:
    cfg = resolve("tabular", flags={**SMALL, **flags})
    with pytest.raises(ConfigError, match=message) as info:
        privacy.check(cfg, world, precision, mapped=False)
    assert "\n" not in str(info.value)


def test_without_opacus_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus.accountants", None)
    with pytest.raises(
        ConfigError, match=r"needs opacus, which is not installed: pip install 'turbovae\[privacy\]'"
    ):
        privacy.check(resolve("tabular", flags=SMALL), 1, "fp32", mapped=False)


@pytest.mark.slow
def test_a_private_synthesizer_reports_what_it_spent(tmp_path) -> None:
    pd = pytest.importorskip("pandas")
    import turbovae

    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x": rng.uniform(0, 10, 400).round(2), "k": rng.choice(["a", "b"], 400)})
    synth = turbovae.TableSynthesizer(epochs=2, hidden=[16], latent=4, dp_epsilon=1.0, dp_delta=1e-5,
                                      constraints=["0 <= x <= 10"])  # fmt: skip
    out = synth.fit(df, progress=False).sample(1000, seed=0)
    assert out["x"].between(0, 10).all()
    synth.save(tmp_path / "run")
    spent = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert 0 < spent["epsilon"] <= 1.0 and spent["delta"] == 1e-5 and spent["sampling"] == "poisson"
    assert spent["not_covered"] == ["k: categories read from the rows"]


def test_a_conditional_model_takes_per_example_gradients() -> None:
    """A conditional run's one-hot of its class ids runs under vmap (F.one_hot's range check cannot)."""
    from turbovae.conditioning import one_hot

    y = torch.tensor([0, 2, 1])
    out = torch.func.vmap(lambda v: one_hot(v, 3, torch.zeros(1)))(y)
    assert out.tolist() == torch.eye(3)[[0, 2, 1]].tolist()
