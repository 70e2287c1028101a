"""In-process, interleaved A/B of the CPU backend's kernels between two checkouts.

    git worktree add --detach /tmp/old REV
    python bench/kernel_ab.py /tmp/old/src src [out.json]

Both versions of ``normlab.core.cpu`` are imported into one process (the old one's modules are
moved aside before the new one is imported), then every case alternates old/new calls (ABBA), so
load, frequency and cache state hit both alike. Cross-process A/B on this VM was dominated by the
order of the processes (±30 %); in one process the median paired ratio of a case is stable to ~2 %.
Reports new/old per case: < 1 means the new code is faster.
"""
import json
import statistics
import sys
import time

import torch

OLD, NEW = sys.argv[1], sys.argv[2]

def load(path, pop=True):
    sys.path.insert(0, path)
    import normlab.core.cpu as cpu
    for dt in (torch.float32, torch.float64):
        cpu.wait_ready("layer_norm", torch.zeros(2, 2, dtype=dt))
    sys.path.remove(path)
    if not pop: return cpu, {}
    mods = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "normlab" or k.startswith("normlab.")}
    return cpu, mods

old, old_mods = load(OLD)
new, _ = load(NEW, pop=False)
for k, v in old_mods.items():  # numba's cache imports kernel modules by name: keep old non-colliding ones
    sys.modules.setdefault(k, v)
assert old is not new and old.__file__ != new.__file__, (old.__file__, new.__file__)
print("old", old.__file__, "new", new.__file__, flush=True)
torch.manual_seed(0)
M = (True, True, True)
def cases():
    cnn = [(32, 64, 32, 32), (32, 256, 16, 16), (8, 64, 56, 56), (4, 16, 8, 8), (2, 32, 4, 4)]
    rows = [(4096, 1024), (1024, 4096), (8192, 256), (8, 64), (64, 768)]
    for s in cnn:
        for lay in ("nchw", "nhwc"):
            for norm in ("bn", "gn", "in", "bn_eval", "ln_channels"):
                yield norm, s, lay
    for s in rows:
        for norm in ("ln", "rms"):
            yield norm, s, "rows"

def make(norm, s, lay):
    x = torch.randn(*s)
    if lay == "nhwc": x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    c = s[1] if lay != "rows" else s[-1]
    w, b = torch.randn(c), torch.randn(c)
    eps = 1e-5
    def pair(cpu):
        if norm == "bn":
            f = lambda: cpu.batch_norm(x, w, b, eps)
            def fb():
                y, m, v, r = cpu.batch_norm(x, w, b, eps); cpu.batch_norm_backward(dy, x, w, m, r, eps, mask=M)
        elif norm == "bn_eval":
            rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + .5
            f = lambda: cpu.batch_norm_eval(x, rm, rv, w, b, eps); fb = None
        elif norm in ("gn", "in"):
            g = min(32, c // 2) if norm == "gn" else c
            f = lambda: cpu.group_norm(x, g, w, b, eps)
            def fb():
                y, m, v, r = cpu.group_norm(x, g, w, b, eps); cpu.group_norm_backward(dy, x, w, m, r, g, eps, mask=M)
        elif norm == "ln_channels":
            f = lambda: cpu.layer_norm_channels(x, w, b, eps)
            def fb():
                y, m, v, r = cpu.layer_norm_channels(x, w, b, eps); cpu.layer_norm_channels_backward(dy, x, w, m, r, eps, mask=M)
        else:
            rms = norm == "rms"
            f = lambda: cpu.layer_norm(x, 1, w, b if not rms else None, eps, rms=rms)
            def fb():
                y, m, v, r = cpu.layer_norm(x, 1, w, b if not rms else None, eps, rms=rms)
                cpu.layer_norm_backward(dy, x, w, m, r, 1, eps, rms=rms, mask=(True, True, not rms))
        return f, fb
    return pair(old), pair(new)

def t(fn):
    t0 = time.perf_counter(); fn(); return time.perf_counter() - t0

out = []
for norm, s, lay in cases():
    (fo, fbo), (fn, fbn) = make(norm, s, lay)
    for kind, a, b in (("fwd", fo, fn), ("fwd+bwd", fbo, fbn)):
        if a is None: continue
        # check results agree
        for _ in range(3): a(); b()
        ta, tb = [], []
        deadline = time.perf_counter() + 2.0
        i = 0
        while (time.perf_counter() < deadline and i < 400) or i < 20:
            if i % 2: ta.append(t(a)); tb.append(t(b))
            else: tb.append(t(b)); ta.append(t(a))
            i += 1
        ratios = [y / x for x, y in zip(ta, tb)]
        r = dict(norm=norm, shape=s, layout=lay, kind=kind, old_ms=statistics.median(ta)*1e3, new_ms=statistics.median(tb)*1e3,
                 ratio=statistics.median(tb)/statistics.median(ta), pair_ratio=statistics.median(ratios), n=len(ta))
        out.append(r)
        print(f"{norm:12s} {str(s):18s} {lay:5s} {kind:8s} old {r['old_ms']:8.3f} new {r['new_ms']:8.3f} ms  new/old {r['ratio']:.3f} (paired {r['pair_ratio']:.3f}, n={len(ta)})", flush=True)
if len(sys.argv) > 3:
    json.dump(out, open(sys.argv[3], "w"), indent=1)
rs = [r["pair_ratio"] for r in out]
print("median paired new/old", statistics.median(rs), "max", max(rs), "n>1.10:", sum(x > 1.10 for x in rs))
