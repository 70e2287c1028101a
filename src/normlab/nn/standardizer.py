"""Input standardization as a module: ``Standardizer``.

The statistics are collected once (or streamed) from the training data and then frozen; the module
can sit in front of a model as its first layer so that checkpoints carry the preprocessing along with
the weights.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab._checks import check_positive_int
from normlab.core.reference import moments

__all__ = ["Standardizer"]


_F64_EPS = float(torch.finfo(torch.float64).eps)


class Standardizer(nn.Module):
    r"""Per-feature standardization with statistics estimated from data (like sklearn's StandardScaler).

    .. math::

        y = \frac{x - \mu}{s}, \qquad
        s = \begin{cases} \sqrt{\sigma^2 + \epsilon} & \text{if the feature is not constant} \\
                          1 & \text{if it is constant (zero variance)} \end{cases}

    where :math:`\mu` and :math:`\sigma^2` are the mean and the *biased* variance
    (:math:`\sigma^2 = M_2 / n`) of each feature over every sample seen by :meth:`fit` /
    :meth:`partial_fit`. A feature counts as constant when its variance is zero up to the rounding
    error of the variance computation, so a constant column maps to 0 instead of NaN/Inf. With
    ``eps=0`` (default) this is exactly scikit-learn's ``StandardScaler``.

    Statistics are streamed: each batch's ``(n_b, mean_b, M2_b)`` (two-pass, float64) is merged into
    the running ``(n_a, mean_a, M2_a)`` with Chan et al.'s pairwise formula

    .. math::

        n = n_a + n_b,\quad \delta = \bar x_b - \bar x_a,\quad
        \bar x = \bar x_a + \delta \frac{n_b}{n},\quad
        M_2 = M_{2,a} + M_{2,b} + \delta^2 \frac{n_a n_b}{n},

    so ``partial_fit`` over any split of the data gives the statistics of the whole (up to rounding).

    Args:
        num_features: number of features ``F`` (size of ``x`` along ``axis``). ``None`` infers it
            from the first batch (lazy); :meth:`reset` then forgets it again.
        axis: the feature axis. ``-1`` for tabular ``(N, F)`` / sequence ``(N, T, F)`` data, ``1``
            for per-channel statistics of images ``(N, C, *)``. Statistics are taken over every
            other axis.
        eps: added to the variance of non-constant features (``0.0``: scikit-learn semantics).
        ignore_nan: if ``True``, NaNs are left out of the statistics feature by feature (so each
            feature has its own count) and pass through :meth:`transform` unchanged (NaN in,
            NaN out). If ``False``, a NaN in the data given to ``fit``/``partial_fit`` is an error.
        with_mean: subtract the mean in :meth:`transform` (statistics are always collected).
        with_std: divide by the scale in :meth:`transform` (statistics are always collected).
        dtype: floating dtype of the statistics buffers (float64 by default). Merging always runs
            in float64; a lower-precision buffer only rounds what is stored between batches.

    Buffers (all of shape ``(F,)``; they round-trip through ``state_dict``):
        ``count``: number of (non-NaN) values seen per feature. Always per feature, even when
        ``ignore_nan=False`` and all counts are equal, so there is one layout to save and load.
        ``mean``: per-feature mean (NaN for a feature with ``count == 0``).
        ``m2``: per-feature sum of squared deviations from the mean, :math:`M_2`.
        ``scale``: the divisor :math:`s` above (NaN for a feature with ``count == 0``).

    Shape:
        - Input: ``(*, F, *)`` with ``F`` at ``axis``; ``fit`` needs at least 2 dims (a sample axis).
        - Output: same shape and dtype as the input.

    Example::

        >>> std = Standardizer(3).fit(torch.randn(100, 3) * 5 + 2)
        >>> model = nn.Sequential(std, nn.Linear(3, 1))  # std's buffers travel with the model
    """

    count: Tensor
    mean: Tensor
    m2: Tensor
    scale: Tensor
    _fitted: bool

    def __init__(
        self,
        num_features: int | None = None,
        *,
        axis: int = -1,
        eps: float = 0.0,
        ignore_nan: bool = False,
        with_mean: bool = True,
        with_std: bool = True,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if num_features is not None and (
            isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral)
        ):
            raise TypeError(
                f"num_features: expected a positive int or None, got {type(num_features).__name__}"
            )
        check_positive_int(num_features, "num_features", allow_none=True)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps: expected a real number, got {type(eps).__name__}")
        if not (eps >= 0.0 and math.isfinite(eps)):
            raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")

        self._num_features_arg = None if num_features is None else int(num_features)
        self.num_features: int | None = self._num_features_arg
        self.axis = int(axis)
        self.eps = float(eps)
        self.ignore_nan = bool(ignore_nan)
        self.with_mean = bool(with_mean)
        self.with_std = bool(with_std)

        size = 0 if self.num_features is None else self.num_features
        for name in ("count", "mean", "m2", "scale"):
            self.register_buffer(name, torch.empty(size, dtype=dtype))
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> Standardizer:
        """Forget all statistics (and, if ``num_features`` was ``None``, the feature count)."""
        if self._num_features_arg is None and self.num_features is not None:
            self.num_features = None
            self._resize_buffers(0)
        self._clear_statistics()
        return self

    @torch.no_grad()
    def _clear_statistics(self) -> None:
        self.count.zero_()
        self.mean.fill_(math.nan)  # no data seen: the mean is undefined, as in sklearn
        self.m2.zero_()
        self.scale.fill_(math.nan)
        self._fitted = False

    def _resize_buffers(self, size: int) -> None:
        # Reassigning a registered buffer name replaces the buffer (and keeps it registered).
        for name in ("count", "mean", "m2", "scale"):
            old = getattr(self, name)
            setattr(self, name, torch.empty(size, dtype=old.dtype, device=old.device))

    @property
    def is_fitted(self) -> bool:
        """Whether at least one value has been seen for at least one feature."""
        # A Python flag, so forward() does not synchronize with the device to look at `count`.
        return self._fitted

    @property
    def var(self) -> Tensor:
        r"""Biased per-feature variance :math:`M_2 / n` (NaN where ``count == 0``)."""
        return torch.where(
            self.count > 0, self.m2 / self.count.clamp_min(1), torch.full_like(self.m2, math.nan)
        )

    @property
    def std(self) -> Tensor:
        """Per-feature standard deviation ``sqrt(var)`` (without ``eps`` and the zero-variance fix)."""
        return self.var.sqrt()

    # -------------------------------------------------------------- fitting

    def fit(self, x: Tensor | np.ndarray | Iterable[Any]) -> Standardizer:
        """Reset, then collect the statistics of ``x``.

        Args:
            x: a tensor / numpy array with ``F`` features at ``axis``, or an iterable of batches
                (e.g. a ``DataLoader``); each batch is a tensor / array, or a tuple / list whose
                first element is the input (``(x, y)`` pairs).

        Returns:
            ``self``.
        """
        self.reset()
        if isinstance(x, (Tensor, np.ndarray)):
            self._update(self._as_float_tensor(x, "x"))
        elif isinstance(x, Iterable) and not isinstance(x, (str, bytes, Mapping)):
            seen = 0
            for i, batch in enumerate(x):
                self._update(self._as_float_tensor(self._batch_input(batch, i), f"x (batch {i})"))
                seen += 1
            if seen == 0:
                raise ValueError("x: expected at least one batch, got an empty iterable")
        else:
            raise TypeError(
                "x: expected a Tensor, a numpy array, or an iterable of batches, "
                f"got {type(x).__name__}"
            )
        unseen = (self.count == 0).nonzero().flatten().tolist()
        if unseen:
            warnings.warn(
                f"Standardizer.fit: features {unseen} had no non-NaN value; their mean and scale "
                "are NaN, so transform maps them to NaN",
                RuntimeWarning,
                stacklevel=2,
            )
        return self

    def partial_fit(self, x: Tensor | np.ndarray) -> Standardizer:
        """Merge the statistics of one batch ``x`` into the running statistics.

        Args:
            x: a tensor / numpy array with at least 2 dims and ``F`` features at ``axis``.

        Returns:
            ``self``.
        """
        if not isinstance(x, (Tensor, np.ndarray)):
            raise TypeError(
                "x: expected a Tensor or numpy array (use fit() for an iterable of batches), "
                f"got {type(x).__name__}"
            )
        self._update(self._as_float_tensor(x, "x"))
        return self

    @staticmethod
    def _batch_input(batch: Any, index: int) -> Any:
        if isinstance(batch, (Tensor, np.ndarray)):
            return batch
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (Tensor, np.ndarray)):
            return batch[0]
        raise TypeError(
            f"x (batch {index}): expected a Tensor, a numpy array, or a tuple/list whose first "
            f"element is one, got {type(batch).__name__}"
        )

    @staticmethod
    def _as_float_tensor(x: Tensor | np.ndarray, arg: str) -> Tensor:
        t = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
        if not t.dtype.is_floating_point:
            raise TypeError(
                f"{arg}: expected a floating dtype, got {t.dtype}; convert it first, "
                "e.g. x.float() (integer and bool data are not standardized implicitly)"
            )
        return t

    def _feature_axis(self, x: Tensor, arg: str) -> int:
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(
                f"axis: expected a feature axis in [{-x.ndim}, {x.ndim - 1}] for {arg} of "
                f"{x.ndim} dims, got {self.axis}"
            )
        return self.axis % x.ndim

    def _check_features(self, x: Tensor, axis: int, arg: str) -> None:
        if self.num_features is not None and x.shape[axis] != self.num_features:
            raise ValueError(
                f"{arg}: expected {self.num_features} features along axis {self.axis}, got "
                f"{x.shape[axis]} (shape {tuple(x.shape)})"
            )

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(
                f"x: expected at least 2 dims (samples and features), got shape {tuple(x.shape)}"
            )
        axis = self._feature_axis(x, "x")
        self._check_features(x, axis, "x")
        num_features = x.shape[axis]
        if num_features == 0:
            raise ValueError(f"x: expected at least 1 feature along axis {self.axis}, got shape {tuple(x.shape)}")
        # Features last, every other axis flattened into samples; float64 so that large batches and
        # large means do not lose digits in the sums.
        flat = x.detach().movedim(axis, -1).reshape(-1, num_features).to(torch.float64)
        if flat.shape[0] == 0:
            raise ValueError(f"x: expected at least 1 sample, got an empty batch of shape {tuple(x.shape)}")
        if torch.isinf(flat).any():
            raise ValueError("x: expected finite values (an infinite value has no finite mean or variance), got Inf")
        nan = torch.isnan(flat)
        has_nan = bool(nan.any())
        if has_nan and not self.ignore_nan:
            raise ValueError("x: expected no NaN (pass ignore_nan=True to leave NaNs out of the statistics), got NaN")

        if has_nan:
            valid = ~nan
            n_b = valid.sum(0, dtype=torch.float64)
            safe_n = n_b.clamp_min(1)
            mean_b = torch.where(valid, flat, 0.0).sum(0) / safe_n
            m2_b = torch.where(valid, flat - mean_b, 0.0).square().sum(0)
        else:
            n_b = torch.full((num_features,), float(flat.shape[0]), dtype=torch.float64, device=flat.device)
            # The core's corrected two-pass moments: no cancellation from sum(x²) − n·mean².
            mean_b, var_b = moments(flat, (0,))
            m2_b = var_b * n_b

        if self.num_features is None:
            self.num_features = num_features
            self._resize_buffers(num_features)
            self._clear_statistics()

        device = self.count.device
        n_b, mean_b, m2_b = n_b.to(device), mean_b.to(device), m2_b.to(device)
        n_a = self.count.to(torch.float64)
        mean_a = torch.nan_to_num(self.mean.to(torch.float64), nan=0.0)
        m2_a = self.m2.to(torch.float64)

        n = n_a + n_b
        safe_n = n.clamp_min(1)
        delta = mean_b - mean_a
        mean = torch.where(n_a == 0, mean_b, mean_a + delta * (n_b / safe_n))
        m2 = m2_a + m2_b + delta.square() * (n_a * n_b / safe_n)
        # A feature without any value so far keeps an undefined (NaN) mean.
        mean = torch.where(n > 0, mean, math.nan)
        m2 = torch.where(n > 0, m2, 0.0)

        var = m2 / safe_n
        # Zero variance up to the rounding error of the variance computation (bound from Chan,
        # Golub & LeVeque): such a feature is constant, and dividing by sqrt(rounding noise)
        # would blow it up instead of mapping it to 0.
        constant = var <= n * _F64_EPS * var + (n * torch.nan_to_num(mean) * _F64_EPS).square()
        scale = torch.where(constant, 1.0, (var + self.eps).sqrt())
        scale = torch.where(n > 0, scale, math.nan)

        self.count.copy_(n)
        self.mean.copy_(mean)
        self.m2.copy_(m2)
        self.scale.copy_(scale)
        self._fitted = bool((n > 0).any())

    # ------------------------------------------------------------ transform

    def _prepare(self, x: Tensor, method: str) -> tuple[Tensor, Tensor, int, torch.dtype]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a Tensor, got {type(x).__name__}")
        if not self.is_fitted:
            raise RuntimeError(
                f"Standardizer is not fitted: call fit(x) or partial_fit(x) before {method}()"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
        axis = self._feature_axis(x, "x")
        self._check_features(x, axis, "x")
        # float32 at least so half/bfloat16 inputs are not standardized with rounded statistics;
        # float64 inputs keep full precision.
        compute = torch.promote_types(x.dtype, torch.float32)
        shape = [1] * x.ndim
        shape[axis] = -1
        mean = self.mean.to(device=x.device, dtype=compute).reshape(shape)
        scale = self.scale.to(device=x.device, dtype=compute).reshape(shape)
        return mean, scale, axis, compute

    def transform(self, x: Tensor) -> Tensor:
        """Return ``(x - mean) / scale`` (as enabled by ``with_mean`` / ``with_std``) in ``x``'s dtype."""
        mean, scale, _, compute = self._prepare(x, "transform")
        y = x.to(compute)
        if self.with_mean:
            y = y - mean
        if self.with_std:
            y = y / scale
        return y.to(x.dtype)

    def inverse_transform(self, y: Tensor) -> Tensor:
        """Return ``y * scale + mean`` (the inverse of :meth:`transform`) in ``y``'s dtype."""
        mean, scale, _, compute = self._prepare(y, "inverse_transform")
        x = y.to(compute)
        if self.with_std:
            x = x * scale
        if self.with_mean:
            x = x + mean
        return x.to(y.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`transform`, so the module can be a model's first layer."""
        return self.transform(x)

    # ------------------------------------------------------------ state_dict

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A lazy (num_features=None) module has 0-length buffers until it sees data; adopt the
        # checkpoint's feature count so that a fresh Standardizer() can load a fitted one.
        key = prefix + "count"
        if self._num_features_arg is None and key in state_dict:
            incoming = state_dict[key]
            if isinstance(incoming, Tensor) and incoming.ndim == 1:
                size = incoming.shape[0]
                if size != self.count.shape[0]:
                    self._resize_buffers(size)
                self.num_features = size if size > 0 else None
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            self._fitted = self.count.numel() > 0 and bool((self.count > 0).any())

    def extra_repr(self) -> str:
        parts = [f"{self.num_features}", f"axis={self.axis}"]
        if self.eps:
            parts.append(f"eps={self.eps}")
        if self.ignore_nan:
            parts.append("ignore_nan=True")
        if not self.with_mean:
            parts.append("with_mean=False")
        if not self.with_std:
            parts.append("with_std=False")
        return ", ".join(parts)
