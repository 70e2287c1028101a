"""Data-parallel training of the lab's CNN with normlab.SyncBatchNorm + DDP, on CPU (gloo).

    torchrun --nproc_per_node=2 examples/ddp_syncbn.py            # synced BatchNorm
    torchrun --nproc_per_node=2 examples/ddp_syncbn.py --no-sync  # local BatchNorm, for comparison
    python examples/ddp_syncbn.py                                 # one process (no torchrun)

The global batch (``--batch``) is split evenly over the processes, so every run sees the same
data; with SyncBatchNorm the statistics (and so the loss curve) are those of the global batch
whatever the number of processes. Prints per step the loss, the step time and the time spent
in SyncBatchNorm's collectives (one all-gather per layer forward, one all-reduce per layer
backward; DDP's gradient all-reduce is not included), then the medians after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import signal
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see the README's CPU section

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import normlab  # noqa: E402
from normlab.core.distributed import comm_stats  # noqa: E402
from normlab.lab.models import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the medians")
    ap.add_argument("--batch", type=int, default=64, help="global batch, split over the processes")
    ap.add_argument("--size", type=int, default=32, help="image side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--no-sync", action="store_true", help="plain (per-process) BatchNorm")
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack
    torch.set_num_threads(args.threads)

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.batch % world:
        raise SystemExit(f"--batch: {args.batch} is not divisible by the {world} processes")
    per = args.batch // world

    torch.manual_seed(0)  # the same initial model on every rank
    model = build_model("cnn", norm="bn", input_shape=(3, args.size, args.size), num_classes=10)
    if not args.no_sync:
        model = normlab.convert_sync_batchnorm(model)
    net = normlab.DistributedDataParallel(model) if distributed else model
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)

    gen = torch.Generator().manual_seed(1)  # the same global batches on every rank
    steps, comms = [], []
    for step in range(args.steps):
        x = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        comm_stats(reset=True)
        t = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t
        c = comm_stats()
        if distributed:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        if step >= args.warmup:
            steps.append(dt)
            comms.append(c["seconds"])
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}  step {dt * 1e3:7.1f} ms  "
                  f"syncbn comm {c['seconds'] * 1e3:6.2f} ms ({c['calls']} collectives)", flush=True)
    if rank == 0 and steps:
        mode = "local BN" if args.no_sync else "SyncBatchNorm"
        print(f"processes {world}  {mode}  per-process batch {per}  median step "
              f"{statistics.median(steps) * 1e3:.1f} ms  median syncbn comm {statistics.median(comms) * 1e3:.2f} ms")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
