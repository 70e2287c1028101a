r"""``normlab.convert``: put normlab's layers into an existing model, or swap its normalization method.

Two jobs, one entry point (:func:`convert`):

* ``convert(model)`` replaces every normalization layer with its normlab twin and copies its state
  exactly: the very same ``Parameter`` and buffer tensors move over (so values, device, dtype,
  ``requires_grad``, ``num_batches_tracked`` and any optimizer that holds them stay valid), with
  eps, momentum, affine/bias flags, train/eval mode and hooks. Outputs do not change.

  - torch.nn's BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm, RMSNorm (exact
    classes) become normlab.BatchNorm1d/... directly.
  - Third-party classes are recognised by *structure*, never by name alone, and each candidate is
    **verified numerically** before it is used: a float64 copy of the old layer and of the
    candidate run on random probe inputs (at unit scale and at a scale where ε matters, with the
    layer's own state and with randomised parameters/statistics, in eval mode and — for layers
    with running statistics — in train mode too, comparing the updated statistics) and must agree
    to 1e-5. Recognised structures: subclasses of torch's norm classes (timm's ``LayerNorm2d``,
    an ``nn.LayerNorm`` applied channels-first, becomes :class:`normlab.LayerNorm2d`; timm's
    ``BatchNormAct2d``/``GroupNormAct`` — a BatchNorm2d/GroupNorm subclass with ``drop``/``act``
    submodules — become :class:`~normlab.nn.utils.norm_act.BatchNormAct2d`/``GroupNormAct``
    holding the same ``drop`` and ``act`` modules), and leaf modules with a ``weight`` parameter
    and an epsilon attribute (``variance_epsilon``, ``eps`` or ``epsilon``): Hugging Face's
    ``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``Qwen3RMSNorm``, ``MistralRMSNorm``, ``T5LayerNorm``
    (→ :class:`normlab.RMSNorm`), custom LayerNorms with a bias (→ LayerNorm or LayerNorm2d).
    A class whose math differs (Gemma's RMSNorm, ``x̂ · (1 + w)``) fails the probe and is left
    alone and reported.
  - Layers that are already normlab's are left as they are. Other layers that look like norms
    (class name ending in ``Norm``/``Norm1d``/``Norm2d``/..., or with ``variance_epsilon``), e.g.
    ``SyncBatchNorm`` or ``LocalResponseNorm``, are left alone and reported.

  Numerics: in float32 and float64 converted layers give the same outputs to rounding. Hugging
  Face's RMSNorms round the normalized value to the input dtype *before* multiplying by the
  weight; normlab multiplies in float32 and rounds once, so 16-bit outputs can differ by an ulp.

* ``convert(model, "gn", groups=32)`` (any method of :data:`METHODS`, or ``"gn:G"``) swaps the
  method itself. Rules (``C`` = channels):

  ========== ===========================================================================
  target     built from a channels-first layer (BN, GN, IN, LayerNorm2d, mean-only BN)
  ========== ===========================================================================
  ``bn``     BatchNorm{1,2,3}d by input rank (IN{k}d → BN{k}d; GN and LayerNorm2d are
             assumed to see (N, C, H, W) unless ``example_input`` shows otherwise)
  ``gn``     GroupNorm(G, C), G = the largest divisor of C not above ``groups`` (default 32;
             ``"gn:G"`` also sets it); a note is reported when G ≠ ``groups``
  ``ln``     GroupNorm(1, C): statistics over (C, \*), the Group Norm paper's conv LayerNorm
             (as ``normlab.lab.norms``); ``ln2d`` gives LayerNorm2d (over C at each position)
  ``in``     InstanceNorm{1,2,3}d (``affine`` as the source's, no running statistics); an error
             for BatchNorm1d (it may see (N, C), which has no positions) unless
             ``example_input`` shows 3-D input, and for (N, C) input
  ``rms``    RMSNorm over C at each position (``normlab.nn.utils.ChannelsLast``; γ carried,
             β dropped — its state_dict key becomes ``inner.weight``)
  ``mobn``   MeanOnlyBatchNorm (β carried, γ dropped)
  ``none``   ``nn.Identity``
  ``brn``    BatchRenorm{1,2,3}d by input rank (as ``bn``; a BatchNorm source's running
             statistics carry over, so eval outputs are unchanged)
  ``gbn``    GhostBatchNorm{1,2,3}d, virtual batch 16 (``"gbn:G"``: G); statistics as ``brn``
  ``ws+X``   method ``X`` (e.g. ``ws+gn``) and Weight Standardization of every Conv1d/2d/3d
             weight (listed in ``report.standardized``)
  ``frn``    FilterResponseNorm2d (4-D input only); γ, β carried, τ = 0
  ``evonorm-s0`` EvoNormS0, groups as ``gn``; ``evonorm-b0`` EvoNormB0 (needs positions)
  ``dyt``    DynamicTanh (channels-first: ``channels_last=False``; a LayerNorm/RMSNorm
             source: over its ``normalized_shape``); γ, β carried; ``derf``: DynamicErf
  ========== ===========================================================================

  LayerNorm/RMSNorm normalize the *last* dim: ``ln``↔``rms`` swaps keep γ (LN→RMS drops β, noted
  when it is not 0; RMS→LN starts β at 0; RMSNorm's ``eps=None`` becomes the dtype's machine
  epsilon). Swapping them to a channels-first method (bn, gn, in, mobn, ...) is only the same axis
  for (N, C) input: allowed when ``example_input`` shows 2-D input, an error otherwise
  (InstanceNorm: always an error). Per-channel γ/β carry over between BN, GN, IN, LayerNorm2d and
  GroupNorm(1, C) (the same ``Parameter`` objects); a source without γ/β gives ``affine=False``.
  eps carries over; momentum carries between BN, IN and mean-only BN. A BatchNorm built from a
  non-BN layer starts with fresh running statistics (noted: run
  :func:`normlab.recalibrate_batchnorm`). Norm+activation layers swap only to ``bn``/``gn``
  (other targets: left alone and reported). Impossible swaps raise ``ValueError`` naming the
  layer path before anything is modified.

Options (keyword): ``groups`` (gn), ``backend`` (set on every layer convert creates),
``example_input`` (a tensor, tuple of positional inputs or dict of keyword inputs: one eval-mode,
no-grad forward records each norm layer's input rank; nothing in the model changes).
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

from normlab._checks import check_positive_int
from normlab.core.dispatch import use_backend
from normlab.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, MeanOnlyBatchNorm, _BatchNorm
from normlab.nn.dyt import DynamicErf, DynamicTanh
from normlab.nn.evonorm import EvoNormB0, EvoNormS0
from normlab.nn.frn import FilterResponseNorm2d
from normlab.nn.groupnorm import GroupNorm
from normlab.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, _InstanceNorm
from normlab.nn.layernorm import LayerNorm, LayerNorm2d, RMSNorm
from normlab.nn.utils.adapters import ChannelsLast
from normlab.nn.utils.norm_act import BatchNormAct2d, GroupNormAct

__all__ = ["METHODS", "ConversionReport", "convert"]

#: method names accepted by :func:`convert` (plus ``"gn:G"``); as in :mod:`normlab.lab.norms`
#: where the name exists there, and ``"ln2d"`` for a channels-first LayerNorm.
METHODS: tuple[str, ...] = ("bn", "gn", "ln", "ln2d", "in", "rms", "mobn", "none")
METHODS += ("brn", "gbn", "ws+gn", "frn", "evonorm-s0", "evonorm-b0", "dyt", "derf")
_NEW_CF = ("brn", "gbn", "frn", "evonorm-s0", "evonorm-b0", "dyt", "derf")
_OPTIONS = ("groups", "backend", "example_input")

_TWINS: dict[type, type] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.InstanceNorm1d: InstanceNorm1d,
    nn.InstanceNorm2d: InstanceNorm2d,
    nn.InstanceNorm3d: InstanceNorm3d,
    nn.LayerNorm: LayerNorm,
    nn.GroupNorm: GroupNorm,
    nn.RMSNorm: RMSNorm,
}
_NORMLAB = (_BatchNorm, _InstanceNorm, GroupNorm, LayerNorm, LayerNorm2d, RMSNorm, MeanOnlyBatchNorm)
_TORCH_NORMS = (_TorchBatchNorm, _TorchInstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_NORM_NAME = re.compile(r"Norm(\d+d)?(Act\d*d?)?$", re.IGNORECASE)
_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")


class _Leave(Exception):
    """This layer is left alone; the message says why."""


@dataclass
class ConversionReport:
    """What :func:`convert` did.

    Attributes:
        converted: ``(path, old class, new class)`` for every replaced layer.
        left_alone: ``(path, class, reason)`` for every norm-like layer that was not replaced.
        notes: ``(path, message)``: things to know about a replacement (groups clipped, β dropped,
            fresh running statistics, an assumed input rank).
    """

    converted: list[tuple[str, type, type]] = field(default_factory=list)
    left_alone: list[tuple[str, type, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    standardized: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)}, left alone {len(self.left_alone)}"]
        lines += [f"  {_show(p)}: {_name(a)} -> {_name(b)}" for p, a, b in self.converted]
        lines += [f"  left alone {_show(p)} ({_name(c)}): {r}" for p, c, r in self.left_alone]
        lines += [f"  note {_show(p)}: {m}" for p, m in self.notes]
        return "\n".join(lines)


def _show(path: str) -> str:
    return path or "<model>"


def _name(cls: type) -> str:
    mod = cls.__module__
    if mod.startswith("torch.nn."):
        mod = "torch.nn"
    elif mod.startswith("normlab.nn"):
        mod = "normlab.nn.utils" if ".utils" in mod else "normlab"
    return f"{mod}.{cls.__qualname__}"


# ----------------------------------------------------------------------------- building layers


def _adopt(new: nn.Module, old: nn.Module, *, children: dict[str, nn.Module] | None = None) -> nn.Module:
    """Give ``new`` (built on the meta device) ``old``'s parameters, buffers, mode and hooks."""
    have = {k for k, v in new._parameters.items() if v is not None}
    want = {k for k, v in old._parameters.items() if v is not None}
    bufs_new = {k for k, v in new._buffers.items() if v is not None}
    bufs_old = {k for k, v in old._buffers.items() if v is not None}
    if have != want or bufs_new != bufs_old:
        raise _Leave(
            f"state differs from {type(new).__name__}'s: parameters {sorted(want)} vs {sorted(have)}, "
            f"buffers {sorted(bufs_old)} vs {sorted(bufs_new)}"
        )
    for k in new._parameters:
        new._parameters[k] = old._parameters.get(k)
    for k in new._buffers:
        new._buffers[k] = old._buffers.get(k)
    for k, v in (children or {}).items():
        new._modules[k] = v
    new.train(old.training)
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        if getattr(old, hooks, None):
            getattr(new, hooks).update(getattr(old, hooks))
    return new


def _bias_flag(m: nn.Module) -> bool:
    return getattr(m, "bias", None) is not None or getattr(m, "weight", None) is None


def _build(cls: type, old: nn.Module, children=None, **ctor) -> nn.Module:
    try:
        new = cls(**ctor, device="meta")
    except (TypeError, ValueError) as exc:
        raise _Leave(f"{cls.__name__} rejects its settings: {exc}") from None
    return _adopt(new, old, children=children)


def _twin_ctor(cls: type, m: nn.Module) -> dict:
    """Constructor arguments of normlab class ``cls`` reproducing torch-style layer ``m``."""
    if issubclass(cls, (_BatchNorm, _InstanceNorm)):
        return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                    track_running_stats=m.track_running_stats, bias=_bias_flag(m))
    if issubclass(cls, GroupNorm):
        return dict(num_groups=m.num_groups, num_channels=m.num_channels, eps=m.eps, affine=m.affine,
                    bias=_bias_flag(m))
    if cls is LayerNorm2d:
        return dict(num_channels=m.normalized_shape[0], eps=m.eps, affine=m.elementwise_affine, bias=_bias_flag(m))
    if cls is LayerNorm:
        return dict(normalized_shape=m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine,
                    bias=_bias_flag(m))
    return dict(normalized_shape=m.normalized_shape, eps=m.eps, elementwise_affine=m.elementwise_affine)


def _torch_base(m: nn.Module) -> type | None:
    for base in type(m).__mro__:
        if base in _TWINS:
            return base
    return None


# ----------------------------------------------------------------------------- numerical check


def _probe_shape(new: nn.Module, c: int | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(new, BatchNorm1d):
        return (6, c)
    if isinstance(new, (BatchNorm3d, InstanceNorm3d)):
        return (2, c, 3, 3, 2)
    if isinstance(new, InstanceNorm1d):
        return (3, c, 7)
    if isinstance(new, (_BatchNorm, _InstanceNorm, GroupNorm, LayerNorm2d)):
        return (3, c, 4, 5)
    return (3, 5, *shape)


def _randomize(a: nn.Module, b: nn.Module, gen: torch.Generator) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    with torch.no_grad():
        for k, t in sa.items():
            if not t.is_floating_point() or k not in sb or sb[k].shape != t.shape:
                continue
            r = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            r = r.abs() + 0.5 if k.endswith("running_var") else (1 + 0.5 * r if k.endswith("weight") else 0.5 * r)
            t.copy_(r)
            sb[k].copy_(r)


def _verify(old: nn.Module, new: nn.Module, c: int | None, shape: tuple[int, ...]) -> None:
    """Raise :class:`_Leave` unless ``new`` computes what ``old`` computes (float64 probes)."""
    dev = next((t.device for t in list(old.parameters()) + list(old.buffers())), torch.device("cpu"))
    if dev.type == "meta":
        raise _Leave("cannot verify the math of a layer on the meta device")
    gen = torch.Generator().manual_seed(0)
    eps = next((float(getattr(old, a)) for a in _EPS_ATTRS if isinstance(getattr(old, a, None), (int, float))), 1e-5)
    scales = (1.0, math.sqrt(eps) if eps > 0 else 1e-3)
    stateful = isinstance(new, (_BatchNorm, _InstanceNorm))
    worst = 0.0
    for randomize in (False, True):
        a, b = copy.deepcopy(old).double(), copy.deepcopy(new).double()
        if randomize:
            _randomize(a, b, gen)
        for training in ((False, True) if stateful else (False,)):
            for mod in (a, b):
                mod.train(training)
                for child in mod.children():  # act/drop of norm+act layers: deterministic
                    child.eval()
            for scale in scales:
                x = (torch.randn(_probe_shape(new, c, shape), generator=gen, dtype=torch.float64) + 0.5) * scale
                try:
                    # the reference backend: pure torch, no kernel compilation for float64
                    with torch.no_grad(), use_backend("reference"):
                        ya, yb = a(x.to(dev)), b(x.to(dev))
                except Exception as exc:  # noqa: BLE001 - any failure means "not the same layer"
                    raise _Leave(f"probe as {type(new).__name__} failed: {type(exc).__name__}: {exc}") from None
                pairs = [(ya, yb)] + ([(sa, b.state_dict()[k]) for k, sa in a.state_dict().items()] if training else [])
                for u, v in pairs:
                    if not isinstance(u, torch.Tensor) or u.shape != v.shape:
                        raise _Leave(f"math differs from {type(new).__name__} (output shape)")
                    u, v = u.double().cpu(), v.double().cpu()
                    d = (u - v).abs().max().item() if u.numel() else 0.0
                    worst = max(worst, d if d == d else math.inf)
                    if not torch.allclose(u, v, rtol=1e-5, atol=1e-5, equal_nan=True):
                        raise _Leave(f"math differs from {type(new).__name__} (probe max |Δ| = {worst:.3g})")


def _output_format(old: nn.Module, c: int) -> torch.memory_format | None:
    """torch.channels_last when ``old`` returns channels-last output for contiguous (N, C, H, W)
    input (a permute → LayerNorm → permute module), else None (the output follows the input)."""
    x = torch.zeros(2, c, 3, 2, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = copy.deepcopy(old).double()(x)
    except Exception:  # noqa: BLE001 - _verify already ran it; keep the default if not
        return None
    cl = isinstance(y, torch.Tensor) and not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else None


# ----------------------------------------------------------------------------- method=None


def _looks_like_norm(m: nn.Module) -> bool:
    if isinstance(m, _TORCH_NORMS + (nn.LocalResponseNorm, nn.CrossMapLRN2d)):
        return True
    leaf = not any(True for _ in m.children())
    return leaf and (bool(_NORM_NAME.search(type(m).__name__)) or hasattr(m, "variance_epsilon"))


def _to_normlab(m: nn.Module) -> nn.Module:
    """normlab twin of norm-like layer ``m`` (same tensors), or raise :class:`_Leave`."""
    if isinstance(m, nn.SyncBatchNorm):
        raise _Leave("no normlab twin: SyncBatchNorm synchronises statistics across processes")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in m.parameters()):
        raise _Leave("lazy layer not initialised yet: run a forward first")
    base = _torch_base(m)
    if base is not None and type(m) is base:
        return _build(_TWINS[base], m, **_twin_ctor(_TWINS[base], m))
    children = dict(m.named_children())
    candidates: list[tuple[type, dict]] = []
    if base is not None:  # a subclass of a torch norm: same structure, maybe other math
        cls = _TWINS[base]
        if children:
            act_cls = {nn.BatchNorm2d: BatchNormAct2d, nn.GroupNorm: GroupNormAct}.get(base)
            if act_cls is None or not set(children) <= {"act", "drop"}:
                raise _Leave(f"has submodules {sorted(children)}: not a plain {base.__name__}")
            children = {"drop": nn.Identity(), "act": nn.Identity(), **children}
            cls = act_cls
        candidates.append((cls, _twin_ctor(cls, m)))
        if base is nn.LayerNorm and len(m.normalized_shape) == 1:
            candidates.append((LayerNorm2d, _twin_ctor(LayerNorm2d, m)))
    else:
        weight = getattr(m, "weight", None)
        eps_attr = next((a for a in _EPS_ATTRS if isinstance(getattr(m, a, None), (int, float))), None)
        if children or not isinstance(weight, nn.Parameter) or eps_attr is None or weight.dim() == 0:
            raise _Leave("not a recognised normalization structure (a leaf with a `weight` parameter and "
                         "`variance_epsilon`/`eps`/`epsilon`)")
        eps, shape = float(getattr(m, eps_attr)), tuple(weight.shape)
        has_bias = isinstance(getattr(m, "bias", None), nn.Parameter)
        if not has_bias:
            candidates.append((RMSNorm, dict(normalized_shape=shape, eps=eps)))
        candidates.append((LayerNorm, dict(normalized_shape=shape, eps=eps, bias=has_bias)))
        if len(shape) == 1:
            candidates.append((LayerNorm2d, dict(num_channels=shape[0], eps=eps, bias=has_bias)))
    reasons = []
    for cls, ctor in candidates:
        try:
            new = _build(cls, m, children=children, **ctor)
            c = getattr(new, "num_features", None) or getattr(new, "num_channels", None)
            if c is None and isinstance(new, LayerNorm2d):
                c = new.normalized_shape[0]
            _verify(m, new, c, tuple(getattr(new, "normalized_shape", ())))
            if isinstance(new, LayerNorm2d):
                new.memory_format = _output_format(m, c)
            return new
        except _Leave as exc:
            reasons.append(str(exc))
    raise _Leave("; ".join(reasons))


# ----------------------------------------------------------------------------- method swaps


def _channels(s: nn.Module) -> int:
    if isinstance(s, LayerNorm2d):
        return s.normalized_shape[0]
    return s.num_channels if isinstance(s, GroupNorm) else s.num_features


def _affine_of(s: nn.Module) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    return getattr(s, "weight", None), getattr(s, "bias", None)


def _ranked(s: nn.Module, rank: int | None, path: str, target: str, notes: list) -> int:
    """The input rank a channels-first target must accept (observed, implied, or assumed 4)."""
    if rank is not None:
        return rank
    implied = {BatchNorm2d: 4, BatchNorm3d: 5, InstanceNorm1d: 3, InstanceNorm2d: 4, InstanceNorm3d: 5}
    for cls, r in implied.items():
        if isinstance(s, cls):
            return r
    if isinstance(s, (GroupNorm, LayerNorm2d)):
        notes.append((path, f"assumed (N, C, H, W) input for {target!r} (pass example_input= to detect the rank)"))
        return 4
    if isinstance(s, BatchNorm1d) and target in ("bn", "brn", "gbn"):
        return 2
    raise ValueError(
        f"{_show(path)}: cannot swap {type(s).__name__} to {target!r}: its input rank is ambiguous "
        f"({type(s).__name__} accepts (N, C) and (N, C, *)); pass example_input= so convert can see it"
    )


def _fill(new: nn.Module, gamma, beta, like: nn.Module) -> nn.Module:
    """Move ``new`` off the meta device and give it γ/β (the same Parameters when shapes match)."""
    ref = next((t for t in list(like.parameters()) + list(like.buffers()) if t.is_floating_point()), None)
    factory = {"device": ref.device if ref is not None else None, "dtype": ref.dtype if ref is not None else None}
    new.to_empty(device=factory["device"] or "cpu")
    if factory["dtype"] is not None:
        new.to(factory["dtype"])
    with torch.no_grad():
        if hasattr(new, "reset_parameters"):
            new.reset_parameters()
    for name, src in (("weight", gamma), ("bias", beta)):
        cur = new._parameters.get(name)
        if cur is None or src is None:
            continue
        if src.shape == cur.shape:
            new._parameters[name] = src
    new.train(like.training)
    return new


def _swap(s: nn.Module, path: str, method: str, groups: int | None, rank: int | None, notes: list) -> nn.Module:
    """The ``method`` layer replacing normlab layer ``s`` (raises ValueError when impossible)."""
    gamma, beta = _affine_of(s)
    affine = gamma is not None or beta is not None
    eps = s.eps if s.eps is not None else torch.finfo(gamma.dtype if gamma is not None else torch.float32).eps
    momentum = getattr(s, "momentum", 0.1) if isinstance(s, (_BatchNorm, _InstanceNorm, MeanOnlyBatchNorm)) else 0.1
    meta = {"device": "meta"}
    last_dim = isinstance(s, (LayerNorm, RMSNorm)) and not isinstance(s, LayerNorm2d)
    name = type(s).__name__

    if isinstance(s, (BatchNormAct2d, GroupNormAct)):
        if method not in ("bn", "gn"):
            raise _Leave(f"a norm+activation layer swaps only to 'bn' or 'gn', not {method!r}")
        c = _channels(s)
        if method == "bn":
            new = BatchNormAct2d(c, eps, momentum if isinstance(s, _BatchNorm) else 0.1, affine, act=s.act,
                                 drop=s.drop, **meta)
        else:
            new = GroupNormAct(_groups(c, groups, path, notes), c, eps, affine, act=s.act, drop=s.drop, **meta)
        return _fill(new, gamma, beta, s)

    if method == "none":
        return nn.Identity()

    if last_dim:
        shape = tuple(s.normalized_shape)
        if method in ("dyt", "derf"):
            cls = DynamicTanh if method == "dyt" else DynamicErf
            affine = gamma is not None
            return _fill(cls(shape, elementwise_affine=affine, **meta), gamma,
                         beta if isinstance(s, LayerNorm) else None, s)
        if method == "ln":
            if isinstance(s, LayerNorm):
                return s
            new = LayerNorm(shape, eps, s.elementwise_affine, **meta)
            return _fill(new, gamma, None, s)
        if method == "rms":
            if isinstance(s, RMSNorm):
                return s
            if beta is not None and bool((beta != 0).any()):
                notes.append((path, "LayerNorm → RMSNorm drops β (it was not 0)"))
            return _fill(RMSNorm(shape, s.eps, s.elementwise_affine, **meta), gamma, None, s)
        if method == "in":
            raise ValueError(
                f"{_show(path)}: cannot swap {name} to 'in': InstanceNorm normalizes each channel over its "
                "positions, and a LayerNorm/RMSNorm's features have none (InstanceNorm after a Linear)"
            )
        if len(shape) != 1 or rank != 2:
            raise ValueError(
                f"{_show(path)}: cannot swap {name} to {method!r}: it normalizes the last dim, {method!r} "
                "normalizes dim 1; they coincide only for (N, C) input"
                + (f", and this layer sees {rank}-D input" if rank is not None else "; pass example_input= to show it")
            )
        c = shape[0]
        gamma = gamma if method != "mobn" else None
        src_beta = beta if isinstance(s, LayerNorm) else None
        s_like = s
        affine = s.elementwise_affine
        return _channels_first_target(s_like, path, method, c, 2, gamma, src_beta, affine, eps, 0.1, groups, notes,
                                      fresh=True)

    c = _channels(s)
    r = rank
    if method in ("bn", "in", "brn", "gbn", "frn", "evonorm-b0"):
        r = _ranked(s, rank, path, method, notes)
    same_bn = isinstance(s, _BatchNorm)
    return _channels_first_target(s, path, method, c, r, gamma, beta, affine, eps, momentum, groups, notes,
                                  fresh=not same_bn)


def _groups(c: int, groups: int | None, path: str, notes: list) -> int:
    want = 32 if groups is None else groups
    g = max(d for d in range(1, min(want, c) + 1) if c % d == 0)
    if g != want:
        notes.append((path, f"GroupNorm on {c} channels: {g} groups (the largest divisor of {c} not above {want})"))
    return g


def _channels_first_target(s, path, method, c, rank, gamma, beta, affine, eps, momentum, groups, notes, *, fresh):
    meta = {"device": "meta"}
    name = type(s).__name__
    if method == "bn":
        if isinstance(s, _BatchNorm) and (rank is None or rank in s._dims):
            return s
        cls = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}.get(rank)
        if cls is None:
            raise ValueError(f"{_show(path)}: cannot swap {name} to 'bn': no BatchNorm for {rank}-D input")
        new = cls(c, eps, momentum, affine, **meta)
        if fresh:
            notes.append((path, "new BatchNorm: running statistics start fresh (run normlab.recalibrate_batchnorm)"))
        return _fill(new, gamma, beta, s)
    if method == "mobn":
        if isinstance(s, MeanOnlyBatchNorm):
            return s
        if gamma is not None and bool((gamma != 1).any()):
            notes.append((path, "MeanOnlyBatchNorm drops γ (it was not 1)"))
        new = MeanOnlyBatchNorm(c, momentum, affine, **meta)
        if not isinstance(s, _BatchNorm):
            notes.append((path, "new MeanOnlyBatchNorm: running mean starts fresh (run normlab.recalibrate_batchnorm)"))
        return _fill(new, None, beta, s)
    if method == "gn":
        if isinstance(s, GroupNorm) and groups is None:
            return s
        new = GroupNorm(_groups(c, groups, path, notes), c, eps, affine, **meta)
        return _fill(new, gamma, beta, s)
    if method == "ln":
        if isinstance(s, GroupNorm) and s.num_groups == 1:
            return s
        return _fill(GroupNorm(1, c, eps, affine, **meta), gamma, beta, s)
    if method == "ln2d":
        if isinstance(s, LayerNorm2d):
            return s
        return _fill(LayerNorm2d(c, eps, affine, **meta), gamma, beta, s)
    if method == "in":
        if rank == 2:
            raise ValueError(
                f"{_show(path)}: cannot swap {name} to 'in': it sees (N, C) input (after a Linear), which has "
                "no positions to normalize over; use 'ln', 'gn' or 'bn'"
            )
        if isinstance(s, BatchNorm1d) and rank is None:
            raise ValueError(f"{_show(path)}: cannot swap BatchNorm1d to 'in': ambiguous input rank")
        cls = {3: InstanceNorm1d, 4: InstanceNorm2d, 5: InstanceNorm3d}.get(rank)
        if cls is None:
            raise ValueError(f"{_show(path)}: cannot swap {name} to 'in': no InstanceNorm for {rank}-D input")
        if isinstance(s, cls):
            return s
        return _fill(cls(c, eps, momentum, affine, **meta), gamma, beta, s)
    if method in _NEW_CF:
        return _new_method(s, path, method, c, rank, gamma, beta, affine, eps, momentum, groups, notes)
    if method == "rms":
        inner = _fill(RMSNorm(c, eps, gamma is not None, **meta), gamma, None, s)
        if beta is not None and bool((beta != 0).any()):
            notes.append((path, "RMSNorm drops β (it was not 0)"))
        wrapped = ChannelsLast(inner)
        wrapped.train(s.training)
        return wrapped
    raise AssertionError(method)


def _new_method(s, path, method, c, rank, gamma, beta, affine, eps, momentum, groups, notes):
    """Targets of issue 10 (Batch Renorm, Ghost BN, FRN, EvoNorm, DyT, Derf) from a channels-first layer."""
    from normlab.nn import ghost, renorm
    from normlab.nn.ghost import _GhostBatchNorm
    from normlab.nn.renorm import _BatchRenorm

    meta = {"device": "meta"}
    name = type(s).__name__
    if method in ("brn", "gbn"):
        base = _BatchRenorm if method == "brn" else _GhostBatchNorm
        if isinstance(s, base) and rank in s._dims and (method == "brn" or groups is None
                                                        or s.virtual_batch_size == groups):
            return s
        prefix = "BatchRenorm" if method == "brn" else "GhostBatchNorm"
        k = {2: 1, 3: 1, 4: 2, 5: 3}.get(rank)
        if k is None:
            raise ValueError(f"{_show(path)}: cannot swap {name} to {method!r}: no {prefix} for {rank}-D input")
        cls = getattr(renorm if method == "brn" else ghost, f"{prefix}{k}d")
        extra = {} if method == "brn" else {"virtual_batch_size": 16 if groups is None else groups}
        new = _fill(cls(c, eps, 0.1 if momentum is None else momentum, affine, **meta, **extra), gamma, beta, s)
        if isinstance(s, _BatchNorm) and s.running_mean is not None and s.running_var is not None:
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                new._buffers[key] = s._buffers[key]
        else:
            notes.append((path, f"new {prefix}: running statistics start fresh (run normlab.recalibrate_batchnorm)"))
        return new
    if method == "frn":
        if isinstance(s, FilterResponseNorm2d):
            return s
        if rank != 4:
            raise ValueError(f"{_show(path)}: cannot swap {name} to 'frn': FilterResponseNorm2d needs 4-D input, "
                             f"this layer sees {rank}-D input")
        return _fill(FilterResponseNorm2d(c, **meta), gamma, beta, s)
    if method == "evonorm-s0":
        if isinstance(s, EvoNormS0) and groups is None:
            return s
        return _fill(EvoNormS0(c, groups=_groups(c, groups, path, notes), **meta), gamma, beta, s)
    if method == "evonorm-b0":
        if isinstance(s, EvoNormB0):
            return s
        if rank is None or rank < 3:
            raise ValueError(f"{_show(path)}: cannot swap {name} to 'evonorm-b0': it needs (N, C, *) input with "
                             f"positions, this layer sees {rank}-D input")
        return _fill(EvoNormB0(c, **meta), gamma, beta, s)
    cls = DynamicTanh if method == "dyt" else DynamicErf
    if type(s) is cls:
        return s
    return _fill(cls(c, channels_last=False, elementwise_affine=gamma is not None or beta is not None, **meta),
                 gamma, beta, s)


def _standardize_convs(model: nn.Module, rep: ConversionReport) -> None:
    from normlab.nn.utils.weight_standardization import is_weight_standardized, weight_standardization

    for path, m in model.named_modules():
        if type(m).__name__ == "StdConv2d" or not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        if not is_weight_standardized(m):
            weight_standardization(m)
            rep.standardized.append(path)


# ----------------------------------------------------------------------------- entry point


def _check_method(method):
    if method is None or method in METHODS:
        return method, None
    for prefix in ("gn:", "gbn:"):
        if isinstance(method, str) and method.startswith(prefix):
            g = method[len(prefix):]
            if g.isdigit() and int(g) > 0:
                return prefix[:-1], int(g)
    raise ValueError(f"method: expected one of {[None, *METHODS]}, 'gn:G', 'gbn:G' or 'ws+NAME', got {method!r}")


def _record_ranks(model: nn.Module, example_input) -> dict[int, int]:
    ranks: dict[int, set] = {}
    handles = []
    for m in model.modules():
        if isinstance(m, _NORMLAB + _TORCH_NORMS) or _looks_like_norm(m):
            def hook(mod, args, _ranks=ranks):
                if args and isinstance(args[0], torch.Tensor):
                    _ranks.setdefault(id(mod), set()).add(args[0].dim())
            handles.append(m.register_forward_pre_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, dict):
                model(**example_input)
            elif isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes.items():
            m.training = t
    out = {}
    for k, v in ranks.items():
        out[k] = v.pop() if len(v) == 1 else -1  # -1: seen with several ranks
    return out


def convert(model: nn.Module, method: str | None = None, *, inplace: bool = False, report: bool = False, **options):
    """Replace a model's normalization layers with normlab's, or swap the normalization method.

    See the module docstring (:mod:`normlab.nn.utils.convert`) for exactly what is recognised and
    the swap rules.

    Args:
        model: any ``nn.Module`` (a norm layer itself is fine: the converted layer is returned).
        method: ``None`` (normlab twins, outputs unchanged) or a method name from :data:`METHODS`
            (``"bn"``, ``"gn"``, ``"ln"``, ``"ln2d"``, ``"in"``, ``"rms"``, ``"mobn"``, ``"none"``)
            or ``"gn:G"``.
        inplace: convert ``model`` itself (its Parameters move into the new layers, so an
            optimizer built on them keeps working); default: a deep copy.
        report: also return a :class:`ConversionReport`. Without it, one ``UserWarning`` lists the
            layers left alone and the notes, if there are any.
        **options: ``groups`` (int, for "gn"; default 32), ``backend`` (for the new layers),
            ``example_input`` (to detect input ranks, see the module docstring).

    Returns:
        The converted model, or ``(model, report)`` with ``report=True``.

    Raises:
        TypeError: ``model`` is not a module, or an unknown option.
        ValueError: an unknown method, or a swap that is impossible for some layer (the message
            names the layer's path); nothing has been modified then.

    Example::

        >>> import torch, normlab
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        >>> type(normlab.convert(net)[1]).__name__, type(normlab.convert(net, "gn:4")[1]).__name__
        ('BatchNorm2d', 'GroupNorm')
        >>> _, rep = normlab.convert(net, report=True)
        >>> rep.converted[0][0]
        '1'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"convert: unexpected option {unknown[0]!r}; expected one of {list(_OPTIONS)}")
    standardize = isinstance(method, str) and method.startswith("ws+")
    method, groups = _check_method(method[3:] if standardize else method)
    if "groups" in options:
        g = options["groups"]
        check_positive_int(g, "groups")
        groups = g
    backend = options.get("backend")
    target = model if inplace else copy.deepcopy(model)
    ranks = _record_ranks(target, options["example_input"]) if "example_input" in options else {}
    rep = ConversionReport()
    plans: dict[int, nn.Module | None] = {}
    sites: list[tuple[nn.Module | None, str, nn.Module]] = []

    def decide(m: nn.Module, path: str) -> nn.Module | None | bool:
        """A replacement, None (leave it), or True (not a norm: look inside)."""
        if isinstance(m, _NORMLAB) or (isinstance(m, _TORCH_NORMS) or _looks_like_norm(m)):
            pass
        else:
            return True
        try:
            src = m if isinstance(m, _NORMLAB) else _to_normlab(m)
            if method is None:
                new = src
            else:
                rank = ranks.get(id(m))
                if rank == -1:
                    raise ValueError(f"{_show(path)}: {type(m).__name__} sees inputs of several ranks; cannot swap")
                new = _swap(src, path, method, groups, rank, rep.notes)
        except _Leave as exc:
            rep.left_alone.append((path, type(m), str(exc)))
            return None
        if new is m:
            return None
        if backend is not None:
            for sub in new.modules():
                if isinstance(sub, _NORMLAB):
                    sub.backend = backend
        rep.converted.append((path, type(m), type(new)))
        return new

    def visit(parent: nn.Module | None, name: str, m: nn.Module, path: str) -> None:
        if id(m) not in plans:
            plans[id(m)] = decide(m, path)
        plan = plans[id(m)]
        if plan is True:
            for child_name, child in m._modules.items():
                if child is not None:
                    visit(m, child_name, child, f"{path}.{child_name}" if path else child_name)
        elif plan is not None:
            sites.append((parent, name, plan))

    visit(None, "", target, "")
    result = target
    for parent, name, new in sites:  # every decision made (and every error raised) before this
        if parent is None:
            result = new
        else:
            parent._modules[name] = new
    if standardize:  # ws+X: after every swap decision (and error)
        _standardize_convs(result, rep)
    if not report and (rep.left_alone or rep.notes):
        lines = [f"{_show(p)} ({_name(c)}): {r}" for p, c, r in rep.left_alone]
        lines += [f"{_show(p)}: {msg}" for p, msg in rep.notes]
        head = f"normlab.convert: left {len(rep.left_alone)} layer(s) alone" + (", notes" if rep.notes else "")
        warnings.warn(head + ":\n  " + "\n  ".join(lines), UserWarning, stacklevel=2)
    return (result, rep) if report else result
