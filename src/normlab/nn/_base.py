"""Running-statistics machinery shared by BatchNorm, InstanceNorm and MeanOnlyBatchNorm.

BatchNorm and InstanceNorm subclass their torch.nn twins (which own the parameters, buffers,
``reset_*`` and state_dict versioning); :class:`RunningStats` adds only what normlab does
differently: validation with clear errors and the per-step averaging factor. MeanOnlyBatchNorm
has no torch twin and builds on :class:`NormBase`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab._checks import check_eps, check_momentum, check_positive_int


class RunningStats:
    """Mixin for subclasses of ``torch.nn.modules.batchnorm._NormBase``."""

    def _validate(self, num_features, eps, momentum) -> None:
        check_positive_int(num_features, "num_features")
        check_eps(eps)
        check_momentum(momentum, allow_none=True)

    def _momentum_for_step(self) -> float:
        """Counts the batch and returns this step's averaging factor (1/n when momentum is None)."""
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum


class NormBase(RunningStats, nn.Module):
    """Per-channel γ/β and running statistics, with the exact attribute and state_dict layout of
    ``torch.nn.modules.batchnorm._NormBase`` so checkpoints move both ways.

    Keyword-only: ``bias=False`` drops β (as torch.nn), ``backend`` forces a backend for this
    layer ("reference", "cpu", ...).
    """

    _version = 2
    #: MeanOnlyBatchNorm tracks only the mean and has only a bias
    _tracks_var = True
    _has_weight = True

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(num_features, "num_features")
        check_eps(eps)
        check_momentum(momentum, allow_none=True)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.backend = backend
        if affine:
            if self._has_weight:
                self.weight = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("weight", None)
            if bias:
                self.bias = nn.Parameter(torch.empty(num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            if self._tracks_var:
                self.register_buffer("running_var", torch.ones(num_features, **factory))
            else:
                self.register_buffer("running_var", None)
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            if self.running_var is not None:
                self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            "{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "track_running_stats={track_running_stats}".format(**self.__dict__)
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints written before num_batches_tracked existed (torch's version < 2) lack it.
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            state_dict[key] = self.num_batches_tracked if self.num_batches_tracked is not None else torch.tensor(0)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
