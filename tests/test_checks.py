"""normlab._checks (one validation module, one message style) and the one "is this a norm layer?"."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import normlab.functional as NF
import normlab.nn as lnn
from normlab import _checks as C
from normlab.nn.utils import ChannelsLast, is_batch_norm, is_norm_layer

ONE_LINE = re.compile(r"^[^\s:]+(\s\([^)]*\))?: expected .+, got .+$")

BAD = [
    # call, exception, exact message
    (lambda: C.check_positive_int(0, "hidden"), ValueError, "hidden: expected a positive int, got 0"),
    (lambda: C.check_positive_int(True, "hidden"), ValueError, "hidden: expected a positive int, got True"),
    (lambda: C.check_positive_int(2.0, "n", allow_none=True), ValueError,
     "n: expected a positive int or None, got 2.0"),
    (lambda: C.check_int(-1, "warmup", low=0), ValueError, "warmup: expected an int >= 0, got -1"),
    (lambda: C.check_divisor(3, 8, "num_groups", "num_channels=8"), ValueError,
     "num_groups: expected a positive divisor of num_channels=8, got 3"),
    (lambda: C.check_divisor(False, 8, "groups", "the 8 channels"), ValueError,
     "groups: expected a positive divisor of the 8 channels, got False"),
    (lambda: C.check_eps(-1e-3), ValueError, "eps: expected a number >= 0, got -0.001"),
    (lambda: C.check_momentum(1.5), ValueError, "momentum: expected a number in [0, 1], got 1.5"),
    (lambda: C.check_momentum("x", allow_none=True), ValueError,
     "momentum: expected a number in [0, 1] or None, got 'x'"),
    (lambda: C.check_limit(0.5, "r_max", 1.0), ValueError, "r_max: expected a number >= 1, got 0.5"),
    (lambda: C.check_limit(torch.tensor(3.0), "r_max", 1.0, schedule=True), ValueError,
     "r_max: expected a number >= 1 or a callable schedule, got tensor(3.)"),
    (lambda: C.check_scalar("a", "alpha"), TypeError, "alpha: expected a number or a 1-element tensor, got str"),
    (lambda: C.check_normalized_shape((4, 0)), ValueError,
     "normalized_shape: expected a non-empty sequence of positive ints, got (4, 0)"),
    (lambda: C.check_param(torch.ones(3), (4,), "weight"), ValueError, "weight: expected shape (4,), got (3,)"),
    (lambda: C.check_input(np.ones(2)), TypeError, "input: expected a torch.Tensor, got ndarray"),
    (lambda: C.check_channels(torch.ones(2, 3), 4), ValueError,
     "input: expected 4 channels (dim 1), got 3 in shape (2, 3)"),
]


@pytest.mark.parametrize(("call", "exc", "message"), BAD)
def test_one_message_style(call, exc, message: str) -> None:
    with pytest.raises(exc) as info:
        call()
    assert str(info.value) == message
    assert ONE_LINE.match(str(info.value)), str(info.value)


def test_valid_values_pass() -> None:
    C.check_positive_int(np.int64(3), "n")  # any integral type, as torch's layers take
    C.check_positive_int(None, "n", allow_none=True)
    C.check_int(0, "warmup", low=0)
    C.check_divisor(4, 8, "num_groups", "num_channels=8")
    C.check_eps(0)
    C.check_momentum(None, allow_none=True)
    C.check_limit(torch.tensor(0.5), "r_max", 1.0)  # a schedule's value: not inspected
    C.check_limit(lambda step: 1.0, "r_max", 1.0, schedule=True)
    assert C.check_normalized_shape(5) == (5,)


def test_functional_keeps_its_check_names() -> None:
    for name in ("check_input", "check_eps", "check_momentum", "check_channels"):
        assert getattr(NF, name) is getattr(C, name)


NORM_LAYERS = [
    nn.BatchNorm2d(4), nn.InstanceNorm1d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4), nn.RMSNorm(4),
    nn.SyncBatchNorm(4), lnn.BatchNorm1d(4), lnn.MeanOnlyBatchNorm(4), lnn.BatchRenorm2d(4),
    lnn.GhostBatchNorm1d(4, virtual_batch_size=2), lnn.InstanceNorm2d(4), lnn.GroupNorm(2, 4),
    lnn.LayerNorm(4), lnn.LayerNorm2d(4), lnn.RMSNorm(4), lnn.FilterResponseNorm2d(4), lnn.EvoNormS0(4, groups=2),
    lnn.EvoNormB0(4), lnn.DynamicTanh(4), lnn.DynamicErf(4),
]
NOT_NORM_LAYERS = [nn.Linear(4, 4), nn.Conv2d(4, 4, 1), nn.Sequential(nn.BatchNorm1d(4)),
                   ChannelsLast(lnn.RMSNorm(4)), nn.ReLU(), lnn.Standardizer(4)]


@pytest.mark.parametrize("module", NORM_LAYERS, ids=lambda m: type(m).__name__)
def test_norm_layers(module: nn.Module) -> None:
    assert is_norm_layer(module)


@pytest.mark.parametrize("module", NOT_NORM_LAYERS, ids=lambda m: type(m).__name__)
def test_not_norm_layers(module: nn.Module) -> None:
    assert not is_norm_layer(module)


def test_batch_norms() -> None:
    yes = [nn.BatchNorm1d(4), nn.SyncBatchNorm(4), lnn.BatchNorm2d(4), lnn.MeanOnlyBatchNorm(4),
           lnn.BatchRenorm1d(4), lnn.GhostBatchNorm2d(4, virtual_batch_size=2), lnn.SyncBatchNorm(4)]
    no = [nn.InstanceNorm2d(4), lnn.InstanceNorm2d(4), lnn.GroupNorm(2, 4), lnn.LayerNorm(4), nn.Linear(2, 2)]
    assert all(is_batch_norm(m) for m in yes)
    assert not any(is_batch_norm(m) for m in no)
