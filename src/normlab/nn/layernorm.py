"""Layer normalization (Ba, Kiros & Hinton 2016) and RMS normalization (Zhang & Sennrich 2019)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_eps, check_normalized_shape
from normlab.core import masked


class LayerNorm(nn.LayerNorm):
    r"""Layer normalization over the trailing dims given by ``normalized_shape``.

    .. math:: y = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    One (μ, σ²) per row (every leading index), γ and β of shape ``normalized_shape``
    (``elementwise_affine``; ``bias=False`` drops β). Independent of the batch, same in train and
    eval. A subclass of torch.nn.LayerNorm: same constructor, defaults and state_dict keys;
    keyword-only ``backend`` forces a backend for this layer.

    ``forward(input, mask=None)``: ``mask`` is a boolean tensor broadcastable to the input, True
    = valid position. Per row with n = Σ m valid values, μ = Σ m·x / n, σ² = Σ m·(x − μ)² / n
    and y = m·(γ ⊙ (x − μ)/sqrt(σ² + ε) + β): zero at masked positions (padding cannot change
    any output, its gradient is exactly zero), zeros for a row with n = 0. See
    :func:`normlab.functional.layer_norm`.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        shape = check_normalized_shape(normalized_shape)
        check_eps(eps)
        super().__init__(shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = None if mask is None else masked.layer_mask(mask, self)
        if mask is None and F.traced(input):
            return super().forward(input)
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, mask=mask,
                            backend=self.backend)


class RMSNorm(nn.RMSNorm):
    r"""Root-mean-square normalization over the trailing dims given by ``normalized_shape``.

    .. math:: y = \gamma \odot \frac{x}{\sqrt{\tfrac{1}{n}\sum_i x_i^2 + \epsilon}}

    No centring and no bias. ``eps=None`` uses the machine epsilon of the compute dtype (float32
    for 16-bit inputs), as torch.nn.RMSNorm, of which this is a subclass.

    ``forward(input, mask=None)``: ``mask`` is a boolean tensor broadcastable to the input, True
    = valid position. Per row with n = Σ m valid values, ν² = Σ m·x² / n and
    y = m·γ ⊙ x / sqrt(ν² + ε): zero at masked positions, zeros for a row with n = 0. See
    :func:`normlab.functional.rms_norm`.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        shape = check_normalized_shape(normalized_shape)
        if eps is not None:
            check_eps(eps)
        super().__init__(shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = None if mask is None else masked.layer_mask(mask, self)
        if mask is None and F.traced(input):
            return super().forward(input)
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps, mask=mask, backend=self.backend)


class LayerNorm2d(nn.LayerNorm):
    r"""Channels-first layer normalization of (N, C, \*) input: statistics over C at every position.

    .. math:: y_{n,:,s} = \gamma \odot \frac{x_{n,:,s} - \mu_{ns}}{\sqrt{\sigma^2_{ns} + \epsilon}} + \beta

    The LayerNorm of ConvNeXt and timm's ``LayerNorm2d``: one (μ, σ²) per sample and position,
    over the C channels; γ, β per channel. A subclass of torch.nn.LayerNorm with
    ``normalized_shape = (C,)`` (timm's constructor: ``num_channels, eps=1e-6, affine=True``), so
    state dicts of timm's layer load unchanged. Computed natively on (N, C, \*) memory, NCHW or
    channels_last, without permuting the tensor.

    ``forward(input, mask=None)``: ``mask`` is a boolean tensor broadcastable to the input, True
    = valid; statistics over the valid channels of each position (μ = Σ_c m·x / n,
    σ² = Σ_c m·(x − μ)² / n), output zero at masked positions. See
    :func:`normlab.functional.layer_norm_2d`.

    ``memory_format`` (keyword): the layout of the output of 4-D input. None (default): the
    input's (NCHW stays NCHW, channels_last stays channels_last); ``torch.channels_last``: always
    channels-last, what a permute → LayerNorm → permute module (timm's ``LayerNorm2d``) returns,
    so the convolutions after it keep running on the layout they had (:func:`normlab.convert`
    sets it when it replaces such a module).
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-6,
        affine: bool = True,
        *,
        bias: bool = True,
        device=None,
        dtype=None,
        backend: str | None = None,
        memory_format: torch.memory_format | None = None,
    ) -> None:
        check_eps(eps)
        if memory_format not in (None, torch.channels_last):
            raise ValueError(f"memory_format: expected None or torch.channels_last, got {memory_format!r}")
        super().__init__(check_normalized_shape(num_channels), eps, affine, bias, device, dtype)
        self.backend = backend
        self.memory_format = memory_format

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = None if mask is None else masked.layer_mask(mask, self)
        if self.memory_format is not None and input.dim() == 4:
            # channels innermost: the CPU kernels run it as a row layer norm, output channels-last
            input = input.contiguous(memory_format=self.memory_format)
        return F.layer_norm_2d(input, self.weight, self.bias, self.eps, mask=mask, backend=self.backend)

    def extra_repr(self) -> str:
        fmt = "" if self.memory_format is None else ", memory_format=torch.channels_last"
        return super().extra_repr() + fmt
