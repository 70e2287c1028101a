r"""Normalization-free point-wise replacements for LayerNorm: Dynamic Tanh (DyT) and Dynamic erf (Derf)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_channels, check_input, check_normalized_shape, check_trailing

__all__ = ["DynamicErf", "DynamicTanh"]


class _PointwiseNorm(nn.Module):
    def __init__(self, normalized_shape, alpha_init, channels_last, elementwise_affine, bias, device, dtype) -> None:
        super().__init__()
        shape = check_normalized_shape(normalized_shape)
        if not channels_last and len(shape) != 1:
            raise ValueError(
                f"normalized_shape: expected one int (C) for channels_last=False, got {normalized_shape!r}"
            )
        if isinstance(alpha_init, bool) or not isinstance(alpha_init, (int, float)):
            raise TypeError(f"alpha_init: expected a number, got {type(alpha_init).__name__}")
        if not isinstance(channels_last, bool):
            raise TypeError(f"channels_last: expected a bool, got {type(channels_last).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape, self.alpha_init = shape, float(alpha_init)
        self.channels_last, self.elementwise_affine = channels_last, elementwise_affine
        self.alpha = nn.Parameter(torch.full((1,), self.alpha_init, **factory))
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.zeros(shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.alpha, self.alpha_init)
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check(self, input: Tensor) -> None:
        check_input(input)
        if self.channels_last:
            check_trailing(input, self.normalized_shape)
        else:
            check_channels(input, self.normalized_shape[0])

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, alpha_init={self.alpha_init}, channels_last={self.channels_last}, "
                f"elementwise_affine={self.elementwise_affine}")


class DynamicTanh(_PointwiseNorm):
    r"""Dynamic Tanh (Zhu, Chen, He, LeCun & Liu 2025, "Transformers without Normalization").

    .. math:: y = \gamma \odot \tanh(\alpha x) + \beta

    A drop-in for LayerNorm without statistics: α is one learned scalar per layer (``alpha``,
    init ``alpha_init`` = 0.5, the paper's default for non-LLM models), γ (ones) and β (zeros)
    of ``normalized_shape``. ``channels_last=True`` (default): γ, β over the trailing dims, as
    LayerNorm; ``channels_last=False``: (N, C, \*) input, γ, β of shape (C,) on dim 1 (for
    ConvNeXt-style channels-first blocks). Keyword-only ``bias=False`` drops β.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        alpha_init: float = 0.5,
        channels_last: bool = True,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(normalized_shape, alpha_init, channels_last, elementwise_affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        if not F.traced(input):
            self._check(input)
        return F.dynamic_tanh(input, self.alpha, self.weight, self.bias, channels_last=self.channels_last)


class DynamicErf(_PointwiseNorm):
    r"""Dynamic erf, Derf (Chen, Lu, Zhu, Sun & Liu 2025, "Stronger Normalization-Free Transformers").

    .. math:: y = \gamma \odot \operatorname{erf}(\alpha x + s) + \beta

    As :class:`DynamicTanh` with erf and a learned scalar shift ``shift`` (s, init
    ``shift_init`` = 0). ``alpha_init`` defaults to 0.5.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        alpha_init: float = 0.5,
        shift_init: float = 0.0,
        channels_last: bool = True,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(normalized_shape, alpha_init, channels_last, elementwise_affine, bias, device, dtype)
        if isinstance(shift_init, bool) or not isinstance(shift_init, (int, float)):
            raise TypeError(f"shift_init: expected a number, got {type(shift_init).__name__}")
        self.shift_init = float(shift_init)
        self.shift = nn.Parameter(torch.full((1,), self.shift_init, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.constant_(self.shift, self.shift_init)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", shift_init={self.shift_init}"

    def forward(self, input: Tensor) -> Tensor:
        if not F.traced(input):
            self._check(input)
        return F.dynamic_erf(input, self.alpha, self.shift, self.weight, self.bias, channels_last=self.channels_last)
