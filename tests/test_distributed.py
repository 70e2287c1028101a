"""normlab.SyncBatchNorm across processes (gloo, CPU) against single-process BatchNorm.

Every check compares a rank's share with torch's own BatchNorm run in ONE process on the batch
concatenated over the group, in float64 (and float32 at float32 tolerance). Spawning is the
expensive part on a 2-core machine, so ONE set of 4 processes (groups with a 60 s timeout) runs
every phase, and each test asserts on its phase's outcome:

* ``sync_bn``: equal, uneven and empty shards; NCHW and channels_last; 1d (N, C) and (N, C, L),
  2d, 3d; momentum 0.1 and None; affine/bias off; track_running_stats=False (eval syncs batch
  stats); float32; 3 steps each; one collective per forward and per backward; eval without
  communication; outputs, input gradients, the sum over ranks of weight/bias gradients (an
  empty rank's are 0) and running statistics, the latter bitwise identical on every rank;
* ``subgroups``: the same within groups {0, 1} and {2, 3};
* ``ddp``: the lab's CNN through convert_sync_batchnorm and normlab.DistributedDataParallel in
  each subgroup, 3 SGD steps, equal to the same model trained in one process on the global
  batch; then revert_sync_batchnorm and eval;
* ``dead_peer``: the last rank dies while the others wait in a collective: they raise (gloo:
  "Connection reset by peer", well within the timeout) instead of hanging.
"""

from __future__ import annotations

import copy
import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab
from normlab.nn.utils import BatchNormAct2d

pytestmark = pytest.mark.slow

TIMEOUT = datetime.timedelta(seconds=60)
SPATIAL = {"1d": (), "1dL": (5,), "2d": (4, 3), "3d": (2, 3, 2)}
TORCH_BN = {"1d": nn.BatchNorm1d, "1dL": nn.BatchNorm1d, "2d": nn.BatchNorm2d, "3d": nn.BatchNorm3d}
LAYOUT = {"2d": torch.channels_last, "3d": torch.channels_last_3d}


def _init(rank: int, world: int, init_file: str, timeout=TIMEOUT) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)


class _Counter:
    """Counts the collectives SyncBatchNorm issues (patched into torch.distributed)."""

    def __init__(self):
        self.n = 0
        for name in ("all_gather_single", "all_gather_into_tensor", "all_reduce", "all_gather", "broadcast"):
            orig = getattr(dist, name)

            def wrapped(*a, _orig=orig, **k):
                self.n += 1
                return _orig(*a, **k)

            setattr(dist, name, wrapped)

    def take(self) -> int:
        n, self.n = self.n, 0
        return n


def _close(a, b, dtype, what):
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.numel():
        err = (a - b).abs().max().item()
        assert err <= tol * (1 + b.abs().max().item()), f"{what}: max |Δ| = {err:.3g}"


def _check_case(rank, group, members, shards, kind, *, cl=False, dtype=torch.float64, momentum=0.1,
                affine=True, bias=True, track=True, steps=3, seed=0, counter=None):
    what = f"{kind} shards={shards} cl={cl} {dtype} momentum={momentum} affine={affine} bias={bias} track={track}"
    c = 3
    me = members.index(rank)
    off, n = sum(shards[:me]), shards[me]
    torch.manual_seed(seed)
    ref = TORCH_BN[kind](c, momentum=momentum, affine=affine, bias=bias, track_running_stats=track,
                         dtype=torch.float64)
    mine = normlab.SyncBatchNorm(c, momentum=momentum, affine=affine, bias=bias, track_running_stats=track,
                                 process_group=group, dtype=dtype)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(c) + 0.5)
            mine.weight.copy_(ref.weight)
            if bias:
                ref.bias.copy_(torch.randn(c))
                mine.bias.copy_(ref.bias)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        shape = (sum(shards), c, *SPATIAL[kind])
        X = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + torch.arange(c).view(1, c, *[1] * len(SPATIAL[kind])) * 100
        DY = torch.randn(shape, generator=gen, dtype=torch.float64)
        xr = X.clone().requires_grad_()
        ref(xr).backward(DY)
        x = X[off:off + n].to(dtype)
        if cl:
            x = x.contiguous(memory_format=LAYOUT[kind])
        x.requires_grad_()
        if counter:
            counter.take()
        y = mine(x)
        if counter:
            assert counter.take() == 1, f"{what}: forward should issue one collective"
        y.backward(DY[off:off + n].to(dtype))
        if counter:
            assert counter.take() == 1, f"{what}: backward should issue one collective"
        with torch.no_grad():
            ref_y = nn.functional.batch_norm(X, None, None, ref.weight, ref.bias, True, 0.0, ref.eps)
        _close(y, ref_y[off:off + n], dtype, f"{what} step {step} output")
        assert y.shape == x.shape
        if cl and n:
            assert y.is_contiguous(memory_format=LAYOUT[kind]), f"{what}: channels_last lost"
        _close(x.grad, xr.grad[off:off + n], dtype, f"{what} step {step} input grad")
        if affine:
            for p, q, name in ((mine.weight, ref.weight, "weight"), (mine.bias, ref.bias, "bias")):
                if p is None:
                    continue
                share = p.grad.detach().double().clone()
                if n == 0:
                    assert torch.all(share == 0), f"{what}: an empty rank's {name}.grad must be 0"
                dist.all_reduce(share, group=group)
                _close(share, q.grad, dtype, f"{what} step {step} sum of {name}.grad")
                p.grad = None
                q.grad = None
        if track:
            _close(mine.running_mean, ref.running_mean, dtype, f"{what} step {step} running_mean")
            _close(mine.running_var, ref.running_var, dtype, f"{what} step {step} running_var")
            assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked)
            both = torch.cat([mine.running_mean, mine.running_var]).double()
            every = [torch.empty_like(both) for _ in members]
            dist.all_gather(every, both, group=group)
            assert all(torch.equal(e, both) for e in every), f"{what}: running stats differ between ranks"
        if counter:
            counter.take()
    # eval
    mine.eval()
    ref.eval()
    X = torch.randn((sum(shards), c, *SPATIAL[kind]), generator=gen, dtype=torch.float64)
    x = X[off:off + n].to(dtype)
    if counter:
        counter.take()
    with torch.no_grad():
        y = mine(x)
        expected = 0 if track else 1  # no running stats: synchronised batch statistics
        if counter:
            assert counter.take() == expected, f"{what}: eval should issue {expected} collectives"
        _close(y, ref(X)[off:off + n], dtype, f"{what} eval output")


def _worker_sync_bn(rank, world):
    counter = _Counter()
    world_ranks = list(range(world))
    cases = []
    for kind in ("1d", "1dL", "2d", "3d"):
        for shards in ((3, 3, 3, 3), (1, 5, 2, 4), (4, 0, 3, 0)):
            cases.append(dict(kind=kind, shards=shards))
            if kind in LAYOUT:
                cases.append(dict(kind=kind, shards=shards, cl=True))
    cases += [
        dict(kind="2d", shards=(2, 3, 0, 4), momentum=None, steps=4),
        dict(kind="1dL", shards=(1, 1, 0, 2), momentum=None),
        dict(kind="2d", shards=(2, 3, 0, 4), affine=False),
        dict(kind="2d", shards=(2, 3, 1, 4), bias=False),
        dict(kind="2d", shards=(2, 3, 0, 4), track=False),
        dict(kind="2d", shards=(3, 2, 0, 1), dtype=torch.float32),
        dict(kind="2d", shards=(3, 2, 0, 1), dtype=torch.float32, cl=True),
        dict(kind="1d", shards=(0, 0, 2, 0)),
    ]
    for i, case in enumerate(cases):
        _check_case(rank, None, world_ranks, seed=i, counter=counter, **case)


def _subgroup(rank):
    """{0, 1} and {2, 3}: every rank creates every group (torch's rule), returns its own."""
    groups = [dist.new_group(r, timeout=TIMEOUT) for r in ([0, 1], [2, 3])]
    return groups[rank // 2], ([0, 1] if rank < 2 else [2, 3])


def _worker_subgroups(rank, world):
    counter = _Counter()
    mine, members = _subgroup(rank)
    for i, (kind, shards, cl) in enumerate((("2d", (2, 5), False), ("2d", (0, 3), True), ("3d", (1, 2), False))):
        sub = shards if rank < 2 else shards[::-1]
        _check_case(rank, mine, members, sub, kind, cl=cl, seed=100 + i + 10 * (rank // 2), counter=counter)


# ------------------------------------------------------------------------------------------ DDP


def _lab_cnn():
    from normlab.lab.models import build_model

    torch.manual_seed(0)
    return build_model("cnn", norm="bn", input_shape=(3, 8, 8), num_classes=5, channels=(4, 6)).double()


def _worker_ddp(rank, world):
    """DDP over the subgroup of 2 ranks (SyncBatchNorm synchronised within it)."""
    group, members = _subgroup(rank)
    world, rank = len(members), members.index(rank)
    ref = _lab_cnn()
    model = normlab.convert_sync_batchnorm(copy.deepcopy(ref), process_group=group)
    assert sum(isinstance(m, normlab.SyncBatchNorm) for m in model.modules()) == 2
    ddp = normlab.DistributedDataParallel(model, process_group=group)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(7)
    per = 6
    for step in range(3):
        X = torch.randn(per * world, 3, 8, 8, generator=gen, dtype=torch.float64) + 1
        Y = torch.randint(0, 5, (per * world,), generator=gen)
        loss_ref = nn.functional.cross_entropy(ref(X), Y)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        sl = slice(rank * per, (rank + 1) * per)
        loss = nn.functional.cross_entropy(ddp(X[sl]), Y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
        glob = loss.detach().clone()
        dist.all_reduce(glob, group=group)
        _close(glob / world, loss_ref, torch.float64, f"DDP step {step} loss")
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            _close(p, q, torch.float64, f"DDP step {step} {name}")
        for (name, b), r in zip(model.named_buffers(), ref.buffers()):
            _close(b, r, torch.float64, f"DDP step {step} {name}")
    single = normlab.revert_sync_batchnorm(model).eval()
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in single.modules())
    assert sum(isinstance(m, normlab.BatchNorm2d) for m in single.modules()) == 2
    ref.eval()
    X = torch.randn(5, 3, 8, 8, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _close(single(X), ref(X), torch.float64, "reverted model, eval")


def _worker_dead_peer(rank, world):
    """Rank 3 dies while the others wait in a collective: they must raise, not hang."""
    layer = normlab.SyncBatchNorm(3)
    layer(torch.randn(4, 3, 2, 2))  # one collective that works
    if rank == world - 1:
        time.sleep(1.0)  # the others are inside the next all-gather by now
        os._exit(3)
    start = time.monotonic()
    try:
        layer(torch.randn(4, 3, 2, 2))
    except Exception as exc:  # noqa: BLE001 - any error is the expected outcome
        elapsed = time.monotonic() - start
        assert elapsed < TIMEOUT.total_seconds(), f"the error took {elapsed:.1f} s"
        print(f"rank {rank}: {type(exc).__name__} after {elapsed:.2f} s: {str(exc)[:200]}")
        return
    raise AssertionError("no error although a peer died")


# Every phase runs in the same 4 processes (spawning is the expensive part); a failing phase
# ends its process, so later phases are not reached and the peers error out (group timeout).
PHASES = {"sync_bn": _worker_sync_bn, "subgroups": _worker_subgroups, "ddp": _worker_ddp,
          "dead_peer": _worker_dead_peer}
WORLD = 4


def _child(rank, world, init_file, log):
    with open(log, "w", buffering=1) as f:
        try:
            _init(rank, world, init_file)
        except BaseException:  # noqa: BLE001
            f.write("FAIL init\n" + traceback.format_exc())
            os._exit(1)
        for name, fn in PHASES.items():
            t = time.monotonic()
            try:
                fn(rank, world)
            except BaseException:  # noqa: BLE001
                f.write(f"FAIL {name}\n" + traceback.format_exc())
                os._exit(1)
            f.write(f"PASS {name} {time.monotonic() - t:.1f}s\n")
    os._exit(0)  # no destroy_process_group: the dead-peer phase broke the group on purpose


@pytest.fixture(scope="module")
def phases(tmp_path_factory):
    """Runs every phase in WORLD spawned processes once: {phase: [None (pass) or message per rank]}."""
    tmp = tmp_path_factory.mktemp("dist")
    ctx = mp.get_context("spawn")
    logs = [tmp / f"rank{r}.log" for r in range(WORLD)]
    procs = [ctx.Process(target=_child, args=(r, WORLD, str(tmp / "init"), str(logs[r]))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    result = {name: [] for name in PHASES}
    for r, log in enumerate(logs):
        text = log.read_text() if log.exists() else ""
        for name in PHASES:
            if f"PASS {name}" in text:
                result[name].append(None)
            elif f"FAIL {name}" in text:
                result[name].append(f"rank {r}: " + text[text.index(f"FAIL {name}"):])
            else:
                result[name].append(f"rank {r}: not reached" + (" (hung, killed)" if r in hung else "")
                                    + f"; log:\n{text}")
    return result


def _assert_phase(phases, name, ranks=range(WORLD)):
    errors = [phases[name][r] for r in ranks if phases[name][r] is not None]
    assert not errors, "\n".join(errors)


def test_sync_bn_matches_concatenated_batch(phases):
    _assert_phase(phases, "sync_bn")


def test_sync_bn_in_subgroups(phases):
    _assert_phase(phases, "subgroups")


def test_ddp_training_matches_single_process(phases):
    _assert_phase(phases, "ddp")


def test_dead_peer_raises(phases):
    _assert_phase(phases, "dead_peer", range(WORLD - 1))  # the last rank is the one that dies


# ------------------------------------------------------------------------- single process / convert


def test_single_process_is_batchnorm():
    torch.manual_seed(0)
    ref, mine = nn.BatchNorm2d(3, dtype=torch.float64), normlab.SyncBatchNorm(3, dtype=torch.float64)
    assert isinstance(mine, nn.SyncBatchNorm)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    _close(mine(x), ref(x), torch.float64, "single-process output")
    _close(mine.running_var, ref.running_var, torch.float64, "single-process running_var")
    with pytest.raises(ValueError, match="input: expected 3 channels"):
        mine(torch.randn(4, 2, 5, 5, dtype=torch.float64))


def test_convert_and_revert_keep_state_and_behaviour():
    act = BatchNormAct2d(4, act=nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), normlab.BatchNorm1d(4), act)
    model[1].running_mean.fill_(0.5)
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(1))
    weight = model[1].weight
    out = normlab.convert_sync_batchnorm(model)
    assert out is model
    assert type(model[1]) is normlab.SyncBatchNorm and type(model[2]) is normlab.SyncBatchNorm
    assert type(model[3]) is normlab.nn.syncbatchnorm.SyncBatchNormAct2d and model[3].act is act.act
    assert model[1].weight is weight and float(model[1].running_mean[0]) == 0.5
    model[1](torch.randn(2, 4, 3, 3))
    assert seen == [1], "hooks move over"
    assert model[3](torch.randn(2, 4, 3, 3) - 10).min() >= 0, "the activation still runs"

    class OwnForward(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.warns(UserWarning, match="defines its own forward"):
        kept = normlab.convert_sync_batchnorm(nn.Sequential(OwnForward(4)))
    assert type(kept[0]) is OwnForward
    back = normlab.revert_sync_batchnorm(model)
    assert [type(m) for m in back] == [nn.Conv2d, normlab.BatchNorm2d, normlab.BatchNorm1d, BatchNormAct2d]
    assert back[1].weight is weight and back[3].act is act.act
    assert set(back.state_dict()) == set(model.state_dict())
