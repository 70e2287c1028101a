"""Table 1 of Ba, Kiros & Hinton (2016), "Layer Normalization", as 18 executable checks.

A linear layer a = W x feeds a normalization; h = f(g/sigma * (a - mu) + b) with
f = tanh.  For each method (BatchNorm, WeightNorm, LayerNorm) and each of the six
transformations of the weights or the data we assert the table's cell: either
h is unchanged (to float64 rounding) or h changes clearly.

                      weight matrix  weight matrix  weight vector  dataset    dataset      single case
                      re-scaling     re-centering   re-scaling     re-scaling re-centering re-scaling
    Batch norm        invariant      no             invariant      invariant  invariant    no
    Weight norm       invariant      no             invariant      no         no           no
    Layer norm        invariant      invariant      no             invariant  no           invariant
"""
from __future__ import annotations

import copy

import pytest
import torch

import normlab.nn as nlnn
from normlab.nn.utils import weight_norm

pytestmark = pytest.mark.usefixtures("single_thread", "deterministic_seed")

D = torch.float64
N, D_IN, H = 16, 5, 6
EPS = 1e-12  # negligible against every variance below, so invariances are exact to rounding
INV_ATOL = 1e-9
CHANGE_MIN = 5e-2  # a "no" cell must move some output by at least this much

TRANSFORMS = [
    "weight_matrix_rescaling",
    "weight_matrix_recentering",
    "weight_vector_rescaling",
    "dataset_rescaling",
    "dataset_recentering",
    "single_case_rescaling",
]
TABLE = {
    "batch_norm": [True, False, True, True, True, False],
    "weight_norm": [True, False, True, False, False, False],
    "layer_norm": [True, True, False, True, False, True],
}
CELLS = [
    pytest.param(method, t, inv, id=f"{method}-{t}-{'invariant' if inv else 'not_invariant'}")
    for method, row in TABLE.items()
    for t, inv in zip(TRANSFORMS, row)
]

DELTA = 3.0  # re-scaling factor (positive: a negative one flips signs under every method)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _data():
    g = _gen(0)
    # non-zero per-feature means so that re-centering the data is a real change
    x = torch.randn(N, D_IN, generator=g, dtype=D) + torch.linspace(-1.0, 2.0, D_IN, dtype=D)
    W = torch.randn(H, D_IN, generator=g, dtype=D)
    gamma_w = 0.8 * torch.randn(D_IN, generator=g, dtype=D)  # weight re-centering vector
    gamma_x = 1.5 * torch.randn(D_IN, generator=g, dtype=D)  # data re-centering vector
    gain = 0.5 + torch.rand(H, generator=g, dtype=D)
    bias = 0.3 * torch.randn(H, generator=g, dtype=D)
    return x, W, gamma_w, gamma_x, gain, bias


def transform(name, W, x, gamma_w, gamma_x):
    """Apply one of the table's transformations; returns new (W, x)."""
    W, x = W.clone(), x.clone()
    if name == "weight_matrix_rescaling":
        W = DELTA * W
    elif name == "weight_matrix_recentering":
        W = W + torch.ones(H, 1, dtype=D) @ gamma_w.view(1, -1)  # add gamma^T to every row
    elif name == "weight_vector_rescaling":
        W[2] = DELTA * W[2]
    elif name == "dataset_rescaling":
        x = DELTA * x
    elif name == "dataset_recentering":
        x = x + gamma_x  # the same vector added to every case
    elif name == "single_case_rescaling":
        x[3] = DELTA * x[3]
    else:  # pragma: no cover
        raise ValueError(name)
    return W, x


def _wn_g_v(module):
    """(g, v) parameters of a weight-normed module, whatever the storage scheme."""
    if hasattr(module, "weight_g") and hasattr(module, "weight_v"):
        return module.weight_g, module.weight_v
    par = getattr(getattr(module, "parametrizations", None), "weight", None)
    if par is not None and hasattr(par, "original0"):
        return par.original0, par.original1
    raise AssertionError("weight_norm(module) exposes neither weight_g/weight_v nor parametrizations.weight")


def make_forward(method, gain, bias):
    """Returns h(W, x) for ``method``; gain/bias are the normalization's g and b."""
    if method == "batch_norm":
        bn = nlnn.BatchNorm1d(H, eps=EPS).to(D).train()
        with torch.no_grad():
            bn.weight.copy_(gain)
            bn.bias.copy_(bias)

        def fwd(W, x):
            return torch.tanh(copy.deepcopy(bn)(x @ W.t()))  # fresh copy: running stats untouched

        return fwd
    if method == "layer_norm":
        ln = nlnn.LayerNorm(H, eps=EPS).to(D)
        with torch.no_grad():
            ln.weight.copy_(gain)
            ln.bias.copy_(bias)

        def fwd(W, x):
            return torch.tanh(ln(x @ W.t()))

        return fwd
    if method == "weight_norm":
        def fwd(W, x):
            lin = torch.nn.Linear(D_IN, H).to(D)
            with torch.no_grad():
                lin.weight.copy_(W)
            lin = weight_norm(lin, name="weight", dim=0)
            g, v = _wn_g_v(lin)
            with torch.no_grad():
                v.copy_(W)  # direction: the (transformed) weight matrix
                g.copy_(gain.view(g.shape))  # length: the fixed gain
                lin.bias.copy_(bias)
            # sanity: w = g * v / ||v|| row-wise
            w_expected = gain.view(-1, 1) * W / W.norm(dim=1, keepdim=True)
            torch.testing.assert_close(lin.weight, w_expected, rtol=1e-12, atol=1e-12)
            return torch.tanh(lin(x))

        return fwd
    raise ValueError(method)


@pytest.mark.parametrize("method,transformation,invariant", CELLS)
def test_ba_kiros_hinton_table1(backend, method, transformation, invariant):
    x, W, gamma_w, gamma_x, gain, bias = _data()
    fwd = make_forward(method, gain, bias)
    h0 = fwd(W, x)
    W1, x1 = transform(transformation, W, x, gamma_w, gamma_x)
    h1 = fwd(W1, x1)
    assert h0.shape == h1.shape == (N, H)
    assert torch.isfinite(h0).all() and torch.isfinite(h1).all()
    diff = float((h1 - h0).detach().abs().max())
    if invariant:
        assert diff <= INV_ATOL, f"{method} should be invariant to {transformation}; max |dh| = {diff:.3e}"
    else:
        assert diff >= CHANGE_MIN, f"{method} should NOT be invariant to {transformation}; max |dh| = {diff:.3e}"


def test_table_has_18_cells():
    assert len(CELLS) == 18
