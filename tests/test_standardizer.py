"""Tests for normlab.nn.standardizer.Standardizer (oracle: sklearn.preprocessing.StandardScaler)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlab.nn.standardizer import Standardizer

sklearn_preprocessing = pytest.importorskip("sklearn.preprocessing")
StandardScaler = sklearn_preprocessing.StandardScaler

TOL = {"rtol": 1e-10, "atol": 1e-10}


def _data(rng: np.random.Generator, n: int = 500) -> np.ndarray:
    # Very different locations / scales per column, plus an exactly constant column.
    x = rng.normal(loc=[3.0, -1e3, 0.0, 5.0, 1e4], scale=[1.0, 250.0, 1e-4, 1.0, 3.0], size=(n, 5))
    x[:, 3] = 7.25
    return x


def _assert_matches(std: Standardizer, sk: StandardScaler, x: np.ndarray) -> None:
    np.testing.assert_allclose(std.mean.numpy(), sk.mean_, **TOL)
    np.testing.assert_allclose(std.var.numpy(), sk.var_, **TOL)
    np.testing.assert_allclose(std.scale.numpy(), sk.scale_, **TOL)
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(std.transform(xt).numpy(), sk.transform(x), **TOL)
    np.testing.assert_allclose(std(xt).numpy(), sk.transform(x), **TOL)
    z = sk.transform(x)
    np.testing.assert_allclose(
        std.inverse_transform(torch.from_numpy(z)).numpy(), sk.inverse_transform(z), **TOL
    )


# --------------------------------------------------------------------------- sklearn equivalence


def test_fit_matches_sklearn() -> None:
    x = _data(np.random.default_rng(0))
    std = Standardizer(5).fit(torch.from_numpy(x))
    sk = StandardScaler().fit(x)
    _assert_matches(std, sk, x)
    assert std.scale[3].item() == 1.0  # the constant column gets scale 1, not 0 / NaN
    assert torch.all(std.transform(torch.from_numpy(x))[:, 3] == 0)
    assert torch.equal(std.count, torch.full((5,), 500.0, dtype=torch.float64))


def test_fit_accepts_numpy() -> None:
    x = _data(np.random.default_rng(1))
    std = Standardizer().fit(x)
    _assert_matches(std, StandardScaler().fit(x), x)


def test_partial_fit_uneven_batches_matches_sklearn() -> None:
    rng = np.random.default_rng(2)
    x = _data(rng, n=2000)
    std, sk = Standardizer(5), StandardScaler()
    cuts = np.sort(rng.choice(np.arange(1, 2000), size=60, replace=False))
    for chunk in np.split(x, cuts):
        std.partial_fit(torch.from_numpy(chunk))
        sk.partial_fit(chunk)
    _assert_matches(std, sk, x)
    # And streaming equals one-shot fit on the concatenation.
    full = Standardizer(5).fit(x)
    np.testing.assert_allclose(std.mean.numpy(), full.mean.numpy(), **TOL)
    np.testing.assert_allclose(std.m2.numpy(), full.m2.numpy(), rtol=1e-10)


def test_single_row_batches() -> None:
    x = _data(np.random.default_rng(3), n=40)
    std, sk = Standardizer(), StandardScaler()
    for row in x:
        std.partial_fit(torch.from_numpy(row[None]))
        sk.partial_fit(row[None])
    _assert_matches(std, sk, x)


def test_ignore_nan_matches_sklearn() -> None:
    rng = np.random.default_rng(4)
    x = _data(rng, n=800)
    x[rng.random(x.shape) < 0.2] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        std = Standardizer(5, ignore_nan=True).fit(torch.from_numpy(x))
    sk = StandardScaler().fit(x)
    _assert_matches(std, sk, x)
    np.testing.assert_array_equal(std.count.numpy(), (~np.isnan(x)).sum(0))
    # NaN passes through transform at the same places.
    y = std.transform(torch.from_numpy(x))
    assert torch.equal(torch.isnan(y), torch.from_numpy(np.isnan(x)))


def test_ignore_nan_partial_fit_matches_sklearn() -> None:
    rng = np.random.default_rng(5)
    x = _data(rng, n=1200)
    x[rng.random(x.shape) < 0.3] = np.nan
    std, sk = Standardizer(ignore_nan=True), StandardScaler()
    for chunk in np.array_split(x, 37):
        std.partial_fit(torch.from_numpy(chunk))
        sk.partial_fit(chunk)
    _assert_matches(std, sk, x)
    np.testing.assert_array_equal(std.count.numpy(), sk.n_samples_seen_)


def test_ignore_nan_batches_without_any_value_for_a_feature() -> None:
    # The first batches hold no value of feature 0. sklearn's partial_fit turns that feature's mean
    # into NaN for good here, so the oracle is a one-shot StandardScaler.fit on all the data.
    rng = np.random.default_rng(15)
    x = _data(rng, n=600)
    x[rng.random(x.shape) < 0.3] = np.nan
    x[:100, 0] = np.nan
    x[300:350, 2] = np.nan
    std = Standardizer(ignore_nan=True)
    for chunk in np.array_split(x, 24):
        std.partial_fit(torch.from_numpy(chunk))
    _assert_matches(std, StandardScaler().fit(x), x)


def test_all_nan_feature_is_nan_like_sklearn() -> None:
    x = np.random.default_rng(6).normal(size=(30, 3))
    x[:, 1] = np.nan
    with pytest.warns(RuntimeWarning, match=r"features \[1\]"):
        std = Standardizer(ignore_nan=True).fit(x)
    assert std.count[1].item() == 0
    assert torch.isnan(std.mean[1]) and torch.isnan(std.scale[1]) and torch.isnan(std.var[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = StandardScaler().fit(x)
    np.testing.assert_allclose(std.mean.numpy(), sk.mean_, **TOL)  # NaN == NaN for assert_allclose
    np.testing.assert_allclose(std.scale.numpy(), sk.scale_, **TOL)


@pytest.mark.parametrize(("with_mean", "with_std"), [(False, True), (True, False), (False, False)])
def test_with_mean_with_std_flags_match_sklearn(with_mean: bool, with_std: bool) -> None:
    x = _data(np.random.default_rng(7))
    std = Standardizer(with_mean=with_mean, with_std=with_std).fit(x)
    sk = StandardScaler(with_mean=with_mean, with_std=with_std).fit(x)
    xt = torch.from_numpy(x)
    np.testing.assert_allclose(std.transform(xt).numpy(), sk.transform(x), **TOL)
    np.testing.assert_allclose(std.inverse_transform(std.transform(xt)).numpy(), x, rtol=1e-12, atol=1e-8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 60),
    f=st.integers(1, 4),
    splits=st.lists(st.integers(1, 59), max_size=6),
    seed=st.integers(0, 2**31 - 1),
    loc=st.floats(-1e5, 1e5),
    log_scale=st.floats(-3, 3),
)
def test_any_split_equals_sklearn(
    n: int, f: int, splits: list[int], seed: int, loc: float, log_scale: float
) -> None:
    x = np.random.default_rng(seed).normal(loc, 10.0**log_scale, size=(n, f))
    cuts = sorted({c for c in splits if c < n})
    std = Standardizer(f)
    for chunk in np.split(x, cuts):
        std.partial_fit(chunk)
    sk = StandardScaler().fit(x)
    np.testing.assert_allclose(std.mean.numpy(), sk.mean_, rtol=1e-10, atol=1e-10 * max(1.0, abs(loc)))
    np.testing.assert_allclose(std.var.numpy(), sk.var_, rtol=1e-8, atol=1e-12 * max(1.0, loc * loc))


# --------------------------------------------------------------------------- layouts and inputs


def test_axis1_per_channel_images() -> None:
    rng = np.random.default_rng(8)
    x = rng.normal(loc=[[[1.0]], [[-5.0]], [[100.0]]], scale=[[[0.5]], [[2.0]], [[30.0]]], size=(7, 3, 4, 5))
    std = Standardizer(3, axis=1).fit(torch.from_numpy(x))
    flat = x.transpose(0, 2, 3, 1).reshape(-1, 3)  # channels last, everything else is a sample
    sk = StandardScaler().fit(flat)
    np.testing.assert_allclose(std.mean.numpy(), sk.mean_, **TOL)
    np.testing.assert_allclose(std.scale.numpy(), sk.scale_, **TOL)
    y = std(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(y.transpose(0, 2, 3, 1).reshape(-1, 3), sk.transform(flat), **TOL)
    assert std.count[0].item() == 7 * 4 * 5


def test_axis_last_with_sequence_dim() -> None:
    x = torch.randn(6, 9, 4, dtype=torch.float64) * 3 + 1
    std = Standardizer(axis=-1).fit(x)
    sk = StandardScaler().fit(x.reshape(-1, 4).numpy())
    np.testing.assert_allclose(std.mean.numpy(), sk.mean_, **TOL)
    # A single sample (F,) can be transformed (axis -1 is its only axis).
    np.testing.assert_allclose(std(x[0, 0]).numpy(), sk.transform(x[0, :1].numpy())[0], **TOL)


def test_fit_iterable_of_batches() -> None:
    x = torch.from_numpy(_data(np.random.default_rng(9), n=103))
    y = torch.arange(103)
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True)  # yields [x, y]
    ref = Standardizer().fit(x)
    for source in (loader, [x[:50], x[50:]], (b.numpy() for b in x.split(17))):
        std = Standardizer().fit(source)
        np.testing.assert_allclose(std.mean.numpy(), ref.mean.numpy(), **TOL)
        np.testing.assert_allclose(std.scale.numpy(), ref.scale.numpy(), **TOL)
        assert std.count[0].item() == 103


def test_fit_resets_previous_statistics() -> None:
    a, b = torch.randn(50, 2, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64) + 10
    std = Standardizer(2).fit(a).fit(b)
    torch.testing.assert_close(std.mean, b.mean(0))
    assert std.count[0].item() == 40


def test_forward_keeps_dtype_and_is_differentiable() -> None:
    std = Standardizer(3).fit(torch.randn(100, 3, dtype=torch.float64) * 4 + 2)
    x = torch.randn(8, 3, dtype=torch.float32, requires_grad=True)
    y = std(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    y.sum().backward()
    torch.testing.assert_close(x.grad, (1 / std.scale).float().expand(8, 3))
    for dt in (torch.float16, torch.bfloat16):
        assert std(x.detach().to(dt)).dtype == dt


def test_first_layer_of_a_model_and_state_dict_roundtrip() -> None:
    data = torch.randn(200, 4, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 5.0]) + 3
    model = nn.Sequential(Standardizer(4).fit(data), nn.Linear(4, 2).double())
    sd = model.state_dict()
    assert {"0.count", "0.mean", "0.m2", "0.scale"} <= set(sd)
    fresh = nn.Sequential(Standardizer(4), nn.Linear(4, 2).double())
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(data), model(data), rtol=0, atol=0)
    # Through torch.save too, and into a lazy Standardizer() that does not know F yet.
    buf = io.BytesIO()
    torch.save(model[0].state_dict(), buf)
    buf.seek(0)
    lazy = Standardizer()
    lazy.load_state_dict(torch.load(buf))
    assert lazy.num_features == 4 and lazy.is_fitted
    torch.testing.assert_close(lazy(data), model[0](data), rtol=0, atol=0)
    # Loaded statistics keep streaming exactly.
    more = torch.randn(30, 4, dtype=torch.float64)
    lazy.partial_fit(more)
    torch.testing.assert_close(lazy.mean, torch.cat([data, more]).mean(0), rtol=1e-12, atol=1e-12)


def test_float32_buffers() -> None:
    x = torch.randn(100, 3, dtype=torch.float64)
    std = Standardizer(3, dtype=torch.float32).fit(x)
    assert std.mean.dtype == torch.float32
    torch.testing.assert_close(std.mean, x.mean(0).float())


def test_eps_is_added_to_variance_but_constant_features_keep_scale_one() -> None:
    x = torch.randn(100, 2, dtype=torch.float64)
    x[:, 1] = 3.0
    std = Standardizer(eps=0.5).fit(x)
    torch.testing.assert_close(std.scale[0], (x[:, 0].var(correction=0) + 0.5).sqrt())
    assert std.scale[1].item() == 1.0


def test_reset_and_lazy_feature_count() -> None:
    std = Standardizer()
    std.fit(torch.randn(10, 3))
    assert std.num_features == 3 and std.is_fitted
    std.reset()
    assert std.num_features is None and not std.is_fitted
    std.fit(torch.randn(10, 5))  # a lazy Standardizer may be refitted on another feature count
    assert std.mean.shape == (5,)
    fixed = Standardizer(3).fit(torch.randn(10, 3)).reset()
    assert fixed.num_features == 3 and fixed.count.sum().item() == 0


def test_repr() -> None:
    assert "axis=1" in repr(Standardizer(3, axis=1, ignore_nan=True))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method", ["transform", "inverse_transform", "forward"])
def test_not_fitted(method: str) -> None:
    with pytest.raises(RuntimeError, match=r"not fitted.*fit\(x\) or partial_fit\(x\)"):
        getattr(Standardizer(3), method)(torch.randn(2, 3))


def test_wrong_feature_count() -> None:
    std = Standardizer(3).fit(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"^x: expected 3 features along axis -1, got 4 \(shape \(2, 4\)\)$"):
        std(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"^x: expected 3 features along axis -1, got 2 \(shape \(5, 2\)\)$"):
        std.partial_fit(torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"^x: expected 3 features along axis -1, got 2 \(shape \(5, 2\)\)$"):
        Standardizer(3).fit(torch.randn(5, 2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_and_bool_inputs_rejected(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match=r"x: expected a floating dtype, got torch\."):
        Standardizer().fit(torch.zeros(4, 2, dtype=dtype))
    std = Standardizer(2).fit(torch.randn(4, 2))
    with pytest.raises(TypeError, match=r"x: expected a floating dtype, got torch\."):
        std(torch.zeros(4, 2, dtype=dtype))
    with pytest.raises(TypeError, match=r"floating dtype"):
        Standardizer().fit(np.zeros((4, 2), dtype=np.int64))


def test_bad_inputs_to_fit() -> None:
    with pytest.raises(ValueError, match="empty batch"):
        Standardizer(2).partial_fit(torch.empty(0, 2))
    with pytest.raises(ValueError, match="at least 2 dims"):
        Standardizer().fit(torch.randn(5))
    with pytest.raises(ValueError, match="ignore_nan=True"):
        Standardizer().fit(torch.tensor([[1.0], [float("nan")]]))
    with pytest.raises(ValueError, match="infinite"):
        Standardizer(ignore_nan=True).fit(torch.tensor([[1.0], [float("inf")]]))
    with pytest.raises(ValueError, match="empty iterable"):
        Standardizer().fit([])
    with pytest.raises(TypeError, match="batch 0"):
        Standardizer().fit([[1.0, 2.0]])
    with pytest.raises(TypeError, match="x: expected a Tensor, a numpy array, or an iterable of batches, got float"):
        Standardizer().fit(3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="use fit"):
        Standardizer().partial_fit([torch.randn(2, 2)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"axis: expected a feature axis in \[-2, 1\] for x of 2 dims, got 2"):
        Standardizer(axis=2).fit(torch.randn(3, 2))


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="num_features"):
        Standardizer(0)
    with pytest.raises(TypeError, match="num_features"):
        Standardizer(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        Standardizer(eps=-1.0)
    with pytest.raises(TypeError, match="axis"):
        Standardizer(axis=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dtype"):
        Standardizer(dtype=torch.int64)
