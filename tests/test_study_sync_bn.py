"""The sync-bn study: simulated data-parallel replicas of BatchNorm, synced vs unsynced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import normlab
from normlab.lab.store import RunResult
from normlab.lab.studies import sync_bn
from normlab.lab.studies.sync_bn import Config, ReplicaBatchNorm


def _reference(x, bn, splits):
    """Each chunk batch-normalized on its own (torch's F.batch_norm, float64)."""
    return torch.cat([TF.batch_norm(c, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
                      for c in x.split(splits)])


@pytest.mark.parametrize("splits", [[4, 4, 4, 4], [2] * 8, [14, 2], [3, 5, 8]])
@pytest.mark.parametrize("shape", [(16, 5), (16, 3, 4, 4)])
def test_replica_bn_matches_per_chunk_bn(splits, shape):
    torch.manual_seed(0)
    bn_cls = normlab.BatchNorm1d if len(shape) == 2 else normlab.BatchNorm2d
    bn = bn_cls(shape[1]).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    layer = ReplicaBatchNorm(bn, splits).train()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref = _reference(x, bn, splits)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, bn.weight, bn.bias), g)
    want = torch.autograd.grad(ref, (x, bn.weight, bn.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # running statistics: replica 0's batch only (DDP broadcasts rank 0's buffers)
    dims = [0] + list(range(2, len(shape)))
    first = x.detach()[: splits[0]]
    mean, var = first.mean(dims), first.var(dims, unbiased=True)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var)
    assert int(bn.num_batches_tracked) == 1


def test_replica_bn_eval_and_errors():
    bn = normlab.BatchNorm1d(3)
    layer = ReplicaBatchNorm(bn, [2, 2])
    x = torch.randn(6, 3)
    layer.eval()
    torch.testing.assert_close(layer(x), bn.eval()(x))  # eval: any batch, running statistics
    layer.train()
    with pytest.raises(ValueError, match=r"^input: expected a batch of 4 \(splits \[2, 2\]\), got 6"):
        layer(x)


def test_replica_model_swaps_every_batchnorm():
    model = sync_bn.replica_model(norm="bn", input_shape=(64,), num_classes=10, splits=[8, 8])
    reps = [m for m in model.modules() if isinstance(m, ReplicaBatchNorm)]
    assert reps and all(r.splits == [8, 8] for r in reps)
    plain = sync_bn.replica_model(norm="bn", input_shape=(64,), num_classes=10)
    assert not any(isinstance(m, ReplicaBatchNorm) for m in plain.modules())


def test_runs_and_validate():
    cfg = Config.quick()
    configs = sync_bn.runs(cfg)
    n_seeds = len(cfg.seeds)
    splits = {tuple(c["model_options"].get("splits", ())) for c in configs if c["norm"] == "bn"}
    # synced (k=1), k=4, k=16, the uneven split and its even twin (2 replicas of 16)
    assert splits == {(), (8,) * 4, (2,) * 16, (30, 2), (16, 16)}
    assert len(configs) == n_seeds * (len(splits) + 1)
    assert all(c["batch_size"] == cfg.global_batch for c in configs)
    with pytest.raises(ValueError, match="replicas: 3 must divide global_batch 32"):
        sync_bn.validate(Config(replicas=(1, 3)))
    with pytest.raises(ValueError, match=r"uneven: \[30, 1\] must add up"):
        sync_bn.validate(Config(uneven=((30, 1),)))


def _fake(cfg, errors):
    """Finished runs with the given validation error (%) per (norm, splits) and seed."""
    out = []
    for c in sync_bn.runs(cfg):
        k = (c["norm"], tuple(c["model_options"].get("splits", ())))
        err = errors[k][c["seed"]]
        out.append(RunResult(run_id=f"{k}{c['seed']}", config=c, status="done",
                             final={"final_val_acc": 1 - err / 100}))
    return out


def test_cards_follow_the_data():
    cfg = Config(replicas=(1, 16), uneven=((30, 2),), seeds=(0, 1, 2))
    base = [3.0, 3.4, 2.8]
    errors = {("bn", ()): base, ("gn", ()): [5.0, 5.5, 4.8], ("bn", (2,) * 16): [28.0, 30.0, 27.0],
              ("bn", (30, 2)): [3.1, 3.3, 2.9], ("bn", (16, 16)): [3.0, 3.4, 2.9]}
    unsynced, synced, uneven, gn = sync_bn.analyze(_fake(cfg, errors), cfg)
    assert unsynced.verdict == "supported" and unsynced.effect.mean == pytest.approx(85 / 3 - 9.2 / 3)
    assert synced.verdict == "supported"
    assert uneven.verdict == "not supported"  # within 1 point of the even split: no harm measured
    assert "points" in uneven.measurement and gn.verdict == "answer"
    # the other way round: no degradation in the data -> not supported
    errors[("bn", (2,) * 16)] = [3.0, 3.3, 2.9]
    assert sync_bn.analyze(_fake(cfg, errors), cfg)[0].verdict == "not supported"
