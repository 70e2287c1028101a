"""Tests of normlab.lab.train: config, determinism, lr scaling, divergence, eval mode, hooks."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import normlab.nn as lnn
from normlab.lab import train as train_module
from normlab.lab.models import build_model
from normlab.lab.train import TrainConfig, TrainHook, evaluate, peak_rss_mb, set_threads, train

# Timing and memory differ between identical runs; everything else must not.
NON_DETERMINISTIC = {"epoch_time_s", "time_per_step_s", "eval_time_s", "train_time_s", "total_time_s", "peak_rss_mb"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster than two fighting over the shared cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def quick(**overrides: Any) -> dict[str, Any]:
    """A config that trains in well under a second."""
    cfg: dict[str, Any] = dict(
        data="digits", model="cnn", norm="bn", batch_size=16, epochs=2, lr=0.05,
        data_options={"limit": 160, "val_limit": 80}, model_options={"channels": [8, 8]},
    )
    cfg.update(overrides)
    return cfg


def strip(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k not in NON_DETERMINISTIC}


# --------------------------------------------------------------------------------------------
# TrainConfig
# --------------------------------------------------------------------------------------------
def test_config_round_trips_through_json() -> None:
    cfg = TrainConfig(**quick(max_steps=5))
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"epochs": 1.5}, "epochs"),
        ({"optimizer": "rmsprop"}, "optimizer: expected one of"),
        ({"lr_scaling": "sqrt"}, "lr_scaling"),
        ({"lr": 0}, "lr"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"max_steps": 0}, "max_steps"),
        ({"eval_every": 0}, "eval_every"),
    ],
)
def test_config_validation(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**change)


def test_config_errors_on_unknown_keys_and_types() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['batchsize'\]"):
        TrainConfig.from_dict({"batchsize": 4})
    with pytest.raises(TypeError, match="data_options"):
        TrainConfig(data_options=[1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="config"):
        train([("model", "cnn")])  # type: ignore[arg-type]


def test_linear_lr_scaling() -> None:
    assert TrainConfig(lr=0.1, batch_size=64).effective_lr == pytest.approx(0.2)
    assert TrainConfig(lr=0.1, batch_size=2).effective_lr == pytest.approx(0.1 * 2 / 32)
    assert TrainConfig(lr=0.1, batch_size=8, base_batch=8).effective_lr == pytest.approx(0.1)
    assert TrainConfig(lr=0.1, batch_size=64, lr_scaling="none").effective_lr == 0.1
    logged: list[dict[str, Any]] = []
    result = train(quick(batch_size=8, lr=0.08, epochs=1, max_steps=2), lambda e, m: logged.append(m))
    assert result["lr"] == pytest.approx(0.02) and logged[0]["lr"] == pytest.approx(0.02)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def test_runs_are_deterministic() -> None:
    logs: list[list[dict[str, Any]]] = [[], []]
    results = [train(quick(), lambda e, m, i=i: logs[i].append(strip(m))) for i in range(2)]
    assert strip(results[0]) == strip(results[1])
    assert logs[0] == logs[1] and len(logs[0]) == 2
    other = train(quick(seed=1))
    assert other["final_train_loss"] != results[0]["final_train_loss"]


def test_metrics_per_epoch_and_final() -> None:
    logged: list[tuple[int, dict[str, Any]]] = []
    result = train(quick(epochs=3, eval_every=2), lambda e, m: logged.append((e, m)))
    assert [e for e, _ in logged] == [1, 2, 3]
    steps_per_epoch = 160 // 16
    assert [m["step"] for _, m in logged] == [steps_per_epoch * k for k in (1, 2, 3)]
    assert "val_acc" not in logged[0][1]  # eval every 2 epochs
    assert "val_acc" in logged[1][1] and "val_acc" in logged[2][1]  # and always the last one
    for _, m in logged:
        assert m["epoch_time_s"] > 0 and m["peak_rss_mb"] > 0 and m["diverged"] is False
        assert math.isfinite(m["train_loss"])
    assert result["steps"] == 30 and result["epochs"] == 3 and result["samples_seen"] == 480
    assert 0 <= result["final_val_acc"] <= 1 and result["best_val_acc"] >= result["final_val_acc"]
    assert result["final_val_acc"] == logged[-1][1]["val_acc"]
    assert result["n_train"] == 160 and result["n_val"] == 80 and result["n_params"] > 0
    assert result["time_per_step_s"] > 0 and result["task"] == "classification"
    json.dumps(result)  # the store saves it as JSON


def test_training_learns_digits() -> None:
    result = train(quick(epochs=4, lr=0.1, data_options={"limit": 400, "val_limit": 200}, model_options={}))
    assert result["final_val_acc"] > 0.8  # default 16-32-32 CNN; ~0.93 on this machine


def test_max_steps_budget() -> None:
    logged: list[dict[str, Any]] = []
    result = train(quick(epochs=50, max_steps=13), lambda e, m: logged.append(m))
    assert result["steps"] == 13 and result["epochs"] == 2
    assert "val_acc" in logged[-1]  # the cut epoch is evaluated


def test_divergence_is_reported_not_raised() -> None:
    # Unscaled inputs (x1 up to 200) and a huge rate: the MSE overflows within a few steps.
    logged: list[dict[str, Any]] = []
    result = train(
        dict(data="synthetic2d", model="mlp", norm="none", batch_size=32, epochs=5, lr=10.0),
        lambda e, m: logged.append(m),
    )
    assert result["diverged"] is True
    assert result["epochs"] == 1 and logged[-1]["diverged"] is True
    assert result["steps"] < 25  # stopped early


def test_regression_metrics() -> None:
    result = train(dict(data="synthetic2d", model="mlp", norm="ln", batch_size=32, epochs=2, lr=0.01,
                        data_options={"n": 300}))
    assert result["task"] == "regression" and result["final_val_acc"] is None
    assert result["best_val_acc"] is None and math.isfinite(result["final_val_loss"])


def test_batch_larger_than_data() -> None:
    with pytest.raises(ValueError, match="batch_size: 64 is larger than the 40 training samples"):
        train(quick(batch_size=64, data_options={"limit": 40}))


def test_adam_and_each_model_trains_a_step() -> None:
    for model, options in (("mlp", {"hidden": [16]}), ("cnn", {"channels": [4, 4]}), ("resnet", {"depth": 8, "width": 4})):
        for norm in ("gn", "wn+mobn"):
            result = train(quick(model=model, norm=norm, optimizer="adam", lr=0.001, epochs=1, max_steps=2,
                                 model_options=options))
            assert result["steps"] == 2 and not result["diverged"]


# --------------------------------------------------------------------------------------------
# Weight norm init, eval mode, hooks
# --------------------------------------------------------------------------------------------
def test_weight_norm_data_init_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    real = train_module.init_weight_norm_
    seen: list[tuple[nn.Module, torch.Tensor]] = []

    def spy(model: nn.Module, batch: torch.Tensor) -> nn.Module:
        seen.append((model, batch))
        return real(model, batch)

    monkeypatch.setattr(train_module, "init_weight_norm_", spy)

    class FirstLayerStats(TrainHook):
        def on_train_start(self, model, config, data) -> None:
            model_, batch = seen[0]
            assert model_ is model
            conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
            with torch.no_grad():
                out = conv(batch)
            self.mean = out.mean((0, 2, 3))
            self.std = out.std((0, 2, 3), unbiased=False)

    stats = FirstLayerStats()
    train(quick(norm="wn", epochs=1, max_steps=1, init_samples=64), hooks=stats)
    assert len(seen) == 1 and seen[0][1].shape == (64, 1, 8, 8)
    # After the init, the first layer's outputs are standardized on the init batch.
    assert torch.allclose(stats.mean, torch.zeros_like(stats.mean), atol=1e-4)
    assert torch.allclose(stats.std, torch.ones_like(stats.std), atol=1e-3)
    seen.clear()
    train(quick(norm="bn", epochs=1, max_steps=1))
    assert seen == []  # no weight norm, no data init


def test_evaluate_uses_eval_mode() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", norm="bn", input_shape=(4,), num_classes=3, hidden=[8])
    x, y = torch.randn(64, 4) * 3 + 1, torch.arange(64) % 3
    model.train()
    model(x)  # give BN some running statistics
    bn = next(m for m in model.modules() if isinstance(m, lnn.BatchNorm1d))
    running = bn.running_mean.clone()
    data = TensorDataset(x, y)
    full = evaluate(model, data, batch_size=512)
    one_by_one = evaluate(model, data, batch_size=1)  # batch stats of one sample would fail/differ
    assert full[0] == pytest.approx(one_by_one[0], rel=1e-5) and full[1] == one_by_one[1]
    assert torch.equal(bn.running_mean, running)  # eval did not update the statistics
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        expected = nn.functional.cross_entropy(model(x), y).item()
    assert full[0] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="task"):
        evaluate(model, data, task="ranking")


def test_hooks_are_called() -> None:
    class Recorder(TrainHook):
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.grad_seen = False
            self.final: dict[str, Any] | None = None

        def on_step(self, step, model, batch, loss) -> None:
            self.steps.append(step)
            x, y = batch
            assert x.shape == (16, 1, 8, 8) and isinstance(loss, float)
            self.grad_seen |= any(p.grad is not None for p in model.parameters())

        def on_epoch_end(self, epoch, model, metrics):
            return {"custom_metric": epoch * 10}

        def on_train_end(self, model, result) -> None:
            self.final = result

    class OnlyStep:  # any object with some of the methods is a hook
        def __init__(self) -> None:
            self.n = 0

        def on_step(self, step, model, batch, loss) -> None:
            self.n += 1

    rec, only = Recorder(), OnlyStep()
    logged: list[dict[str, Any]] = []
    result = train(quick(epochs=2), lambda e, m: logged.append(m), hooks=[rec, only])
    assert rec.steps == list(range(1, 21)) and only.n == 20 and rec.grad_seen
    assert [m["custom_metric"] for m in logged] == [10, 20]
    assert rec.final is result


def test_set_threads_and_rss() -> None:
    previous = set_threads(1)
    try:
        assert torch.get_num_threads() == 1
    finally:
        set_threads(previous)
    with pytest.raises(ValueError, match="n: expected a positive int"):
        set_threads(0)
    rss = peak_rss_mb()
    assert rss is None or rss > 10


# --------------------------------------------------------------------------------------------
# User model and data through train()
# --------------------------------------------------------------------------------------------
@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def write(source: str) -> str:
        name = f"user_train_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        return name

    yield write
    for name in [m for m in sys.modules if m.startswith("user_train_")]:
        sys.modules.pop(name, None)


def test_user_model_and_data(user_module) -> None:
    name = user_module(
        """
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset
        from normlab.lab.norms import get_norm

        def blobs(n=200):
            g = torch.Generator().manual_seed(0)
            y = torch.arange(n) % 2
            x = torch.randn(n, 3, generator=g) + 3 * y[:, None]
            return TensorDataset(x, y)

        def net(*, norm, input_shape, num_classes, hidden=8):
            return nn.Sequential(nn.Linear(input_shape[0], hidden), get_norm(norm).make(hidden, "linear"),
                                 nn.ReLU(), nn.Linear(hidden, num_classes))
        """
    )
    result = train(dict(data=f"{name}:blobs", model=f"{name}:net", norm="ln", batch_size=16, epochs=3, lr=0.05,
                        data_options={"n": 160}, model_options={"hidden": 12}))
    assert result["n_train"] == 128 and result["final_val_acc"] > 0.9
