"""torch.autograd.gradcheck / gradgradcheck (float64) of every functional op.

Weight and bias require grad wherever the op takes them; small shapes.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normlab.functional as NF
from conftest import randn

pytestmark = pytest.mark.usefixtures("single_thread", "deterministic_seed")

D = torch.float64


def _leaf(shape, seed, scale=1.0, offset=0.0):
    return randn(shape, seed, D, scale, offset).requires_grad_()


def _weight(shape, seed):
    return (1.0 + 0.5 * randn(shape, seed, D)).requires_grad_()


def _stats(c, seed):
    return 0.3 * randn((c,), seed, D), 0.5 + randn((c,), seed + 1, D).abs()


# Builders return fn(x, *params).  Running-stat buffers that the op updates are
# created fresh inside fn, so repeated evaluation by gradcheck is side-effect free.
def _bn_train(shape, with_stats):
    c = shape[1]

    def fn(x, w=None, b=None):
        rm, rv = (_stats(c, 3) if with_stats else (None, None))
        return NF.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)

    return fn


def _bn_eval(shape):
    c = shape[1]
    rm, rv = _stats(c, 3)

    def fn(x, w=None, b=None):
        return NF.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)

    return fn


def _in_train(shape, with_stats):
    c = shape[1]

    def fn(x, w=None, b=None):
        rm, rv = (_stats(c, 3) if with_stats else (None, None))
        return NF.instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=0.1, eps=1e-5)

    return fn


def _in_eval(shape):
    c = shape[1]
    rm, rv = _stats(c, 3)

    def fn(x, w=None, b=None):
        return NF.instance_norm(x, rm, rv, w, b, use_input_stats=False, eps=1e-5)

    return fn


def _gn(groups):
    def fn(x, w=None, b=None):
        return NF.group_norm(x, groups, w, b, eps=1e-5)

    return fn


def _ln(nshape):
    def fn(x, w=None, b=None):
        return NF.layer_norm(x, nshape, w, b, eps=1e-5)

    return fn


def _rms(nshape, eps):
    def fn(x, w=None):
        return NF.rms_norm(x, nshape, w, eps=eps)

    return fn


def _mean_only(c, training):
    def fn(x, b=None):
        rm = 0.3 * randn((c,), 3, D)
        return NF.mean_only_batch_norm(x, rm, b, training=training, momentum=0.1)

    return fn


# id, fn, x shape, param shapes: [weight, bias] | [weight] (rms_norm) | [bias] (mean-only)
CASES = []
for shape in [(5, 3), (3, 2, 4), (2, 3, 2, 2)]:
    c = shape[1]
    CASES.append((f"batch_norm-train-{len(shape)}d", _bn_train(shape, False), shape, [(c,), (c,)]))
    CASES.append((f"batch_norm-eval-{len(shape)}d", _bn_eval(shape), shape, [(c,), (c,)]))
CASES += [
    ("batch_norm-train-runningstats", _bn_train((4, 3, 2), True), (4, 3, 2), [(3,), (3,)]),
    ("batch_norm-train-5d", _bn_train((2, 2, 2, 1, 2), False), (2, 2, 2, 1, 2), [(2,), (2,)]),
    ("instance_norm-train-3d", _in_train((2, 3, 4), False), (2, 3, 4), [(3,), (3,)]),
    ("instance_norm-train-4d-runningstats", _in_train((2, 2, 2, 3), True), (2, 2, 2, 3), [(2,), (2,)]),
    ("instance_norm-eval-3d", _in_eval((2, 3, 4)), (2, 3, 4), [(3,), (3,)]),
    ("group_norm-G2", _gn(2), (2, 4, 3), [(4,), (4,)]),
    ("group_norm-G1", _gn(1), (2, 3, 2, 2), [(3,), (3,)]),
    ("group_norm-G=C", _gn(3), (2, 3, 4), [(3,), (3,)]),
    ("group_norm-NC", _gn(2), (3, 4), [(4,), (4,)]),
    ("layer_norm-last", _ln((4,)), (3, 4), [(4,), (4,)]),
    ("layer_norm-2dims", _ln((2, 3)), (2, 2, 3), [(2, 3), (2, 3)]),
    ("rms_norm-eps", _rms((4,), 1e-5), (3, 4), [(4,)]),
    ("rms_norm-epsNone", _rms((4,), None), (3, 4), [(4,)]),
    ("rms_norm-2dims", _rms((2, 3), 1e-5), (2, 2, 3), [(2, 3)]),
    ("mean_only-train-2d", _mean_only(3, True), (4, 3), [(3,)]),
    ("mean_only-train-4d", _mean_only(2, True), (2, 2, 2, 2), [(2,)]),
    ("mean_only-eval-3d", _mean_only(3, False), (2, 3, 2), [(3,)]),
]
IDS = [c[0] for c in CASES]


def _inputs_for(case, affine):
    cid, fn, shape, pshapes = case
    x = _leaf(shape, 0, scale=1.5, offset=0.25)
    if not affine:
        return fn, (x,)
    if cid.startswith("rms_norm"):
        return fn, (x, _weight(pshapes[0], 10))
    if cid.startswith("mean_only"):
        return fn, (x, randn(pshapes[0], 11, D).requires_grad_())
    return fn, (x, _weight(pshapes[0], 10), randn(pshapes[1], 11, D).requires_grad_())


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck(backend, case, affine):
    fn, inputs = _inputs_for(case, affine)
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradgradcheck(backend, case, affine):
    fn, inputs = _inputs_for(case, affine)
    assert gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("case", [c for c in CASES if "train" in c[0] and "batch_norm" in c[0]][:2],
                         ids=lambda c: c[0])
def test_gradcheck_through_module_with_running_stats(backend, case):
    """Module form, training mode: gradients are unaffected by running-stat updates."""
    import normlab.nn as nlnn

    shape = case[2]
    m = getattr(nlnn, {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)])(shape[1]).double()
    m.train()
    x = _leaf(shape, 1)
    assert gradcheck(lambda x: m(x), (x,), eps=1e-6, atol=1e-6, rtol=1e-4)
