"""Issue 14: the lab under hostile input (data is data, the store trusts nothing it reads, CSV
cells cannot become formulas, the kernel cache folder cannot be planted by another user)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from normlab.lab.data import load_dataset, read_idx


# --------------------------------------------------------------------------------------------
# case 1: a CIFAR batch cannot run code
# --------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a hostile data_batch_1 would contain
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    root.mkdir()
    marker = tmp_path / "pwned"
    (root / "data_batch_1").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ValueError) as info:
        load_dataset(str(root))
    assert not marker.exists()
    msg = str(info.value)
    assert str(root / "data_batch_1") in msg
    assert "refusing to unpickle the global posix.system" in msg or "os.system" in msg


def test_cifar_pickle_forbids_other_globals_inside_a_dict(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    root.mkdir()
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": Path("/")}
    (root / "data_batch_1").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match=r"refusing to unpickle the global pathlib\.\w*Path"):
        load_dataset(str(root))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_real_batches_still_load(tmp_path: Path, protocol: int) -> None:
    root = tmp_path / "cifar"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 6), ("test_batch", 4)):
        batch = {
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"labels": list(np.arange(n) % 10),  # numpy scalars, as in the real files
            "batch_label": "training batch 1 of 5",
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    b = load_dataset(str(root))
    assert b.num_classes == 10 and b.n_train == 6 and b.n_val == 4


# --------------------------------------------------------------------------------------------
# case 12: random bytes, huge idx headers
# --------------------------------------------------------------------------------------------
def test_random_bytes_npz_gets_our_message(tmp_path: Path) -> None:
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError) as info:
        load_dataset(str(path))
    msg = str(info.value)
    assert msg == f"{path}: not a readable .npz archive (expected a zip file of .npy arrays)"
    assert "allow_pickle" not in msg


def test_npz_with_object_array_is_refused_without_allow_pickle_hint(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(ValueError) as info:
        load_dataset(str(path))
    assert "array 'x' holds Python objects" in str(info.value)
    assert "allow_pickle" not in str(info.value)


def test_idx_header_with_huge_sizes_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">IIII", 0x803, 2**31, 2**31, 2**31) + b"\0" * 64)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: expected \d+ bytes of data "
                                         r"for shape \(2147483648, 2147483648, 2147483648\), found 64"):
        read_idx(path)
    gz = tmp_path / "g" / "train-images-idx3-ubyte.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(struct.pack(">IIII", 0x803, 2**32 - 1, 2**32 - 1, 2**32 - 1)))
    with pytest.raises(ValueError, match=str(gz)):
        read_idx(gz)


# --------------------------------------------------------------------------------------------
# case 9: NaN / Inf / complex inputs, absurd labels
# --------------------------------------------------------------------------------------------
def test_nan_inputs_name_file_array_and_index(tmp_path: Path) -> None:
    x = np.ones((20, 4), np.float32)
    x[7, 2] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, x=x, y=np.arange(20) % 2)
    with pytest.raises(ValueError) as info:
        load_dataset(str(path))
    assert str(info.value) == (f"{path}: array 'x' has a non-finite value (nan) at index (7, 2); "
                               "expected finite real numbers")
    x[7, 2] = np.inf
    np.savez(path, x_train=x, y_train=np.arange(20) % 2, x_val=x[:4], y_val=np.arange(4) % 2)
    with pytest.raises(ValueError, match=r"array 'x_train' has a non-finite value \(inf\) at index \(7, 2\)"):
        load_dataset(str(path))


def test_complex_inputs_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez(path, x=np.ones((10, 3), np.complex64), y=np.arange(10) % 2)
    with pytest.raises(ValueError, match=r"c.npz: array 'x' holds complex numbers \(complex64\)"):
        load_dataset(str(path))


def test_nan_from_a_user_function_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "nanfn_mod.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make():\n    x = torch.ones(10, 3)\n    x[4, 1] = float('nan')\n"
        "    return TensorDataset(x, torch.arange(10) % 2)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"nanfn_mod:make: array '(train|validation) inputs' has a non-finite value \(nan\)"):
        load_dataset("nanfn_mod:make")


def test_huge_label_is_refused_unless_num_classes(tmp_path: Path) -> None:
    y = np.arange(40) % 3
    y[5] = 10**9
    path = tmp_path / "big.npz"
    np.savez(path, x=np.ones((40, 2), np.float32), y=y)
    with pytest.raises(ValueError, match=r"labels: expected class indices in \[0, 100000\), got "
                                         r"maximum label 1000000000; pass num_classes"):
        load_dataset(str(path))
    y[5] = 2
    np.savez(path, x=np.ones((40, 2), np.float32), y=y)
    assert load_dataset(str(path), num_classes=5).num_classes == 5


def test_missing_module_says_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no module named 'mymodels_nowhere' in the .*current "
                                         r"folder " + str(tmp_path)):
        load_dataset("mymodels_nowhere:build")


# --------------------------------------------------------------------------------------------
# case 2: the store trusts nothing it reads
# --------------------------------------------------------------------------------------------
import io  # noqa: E402
import json  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import lab_fake_runners  # noqa: E402,F401  (registers the fake-* runners)
from normlab.lab.store import DB_NAME, Store, StoreError  # noqa: E402
from normlab.lab.sweep import prepare_configs, run_sweep  # noqa: E402


def test_tampered_row_is_never_executed(tmp_path: Path) -> None:
    legit = {"runner": "fake-echo", "value": 3, "epochs": 1}
    (first,) = run_sweep("s", [legit], tmp_path, workers=1, progress=False)
    marker = tmp_path / "pwned"
    evil = {"runner": "train", "data": "os:system", "data_options": {"command": f"touch {marker}"}}
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute("UPDATE runs SET config = ?, status = 'pending' WHERE run_id = ?",
                 (json.dumps(evil), first.run_id))
    conn.commit()
    conn.close()
    with Store(tmp_path) as s:
        with pytest.raises(StoreError, match="does not hash to its id"):
            s.config(first.run_id)
        assert s.results() == [] and s.corrupt == {first.run_id}  # never reported as a result
    err = io.StringIO()
    from normlab.lab.sweep import run_many

    (again,) = run_many([("s", legit)], tmp_path, workers=1, progress=False, stream=err)
    assert not marker.exists()
    assert again.run_id == first.run_id and again.status == "done" and again.final["value"] == 3
    assert "1 run row(s) did not match their id" in err.getvalue()


def test_resume_executes_only_the_current_commands_configs(tmp_path: Path) -> None:
    marker = tmp_path / "other-ran"
    with Store(tmp_path) as s:  # a pending row some earlier (or hostile) writer left
        s.add_runs("s", [{"runner": "fake-sleepy", "index": 0, "epochs": 1, "sleep": 0,
                          "marker_dir": str(tmp_path), "x": str(marker)}])
    (r,) = run_sweep("s", [{"runner": "fake-echo", "value": 1}], tmp_path, workers=1, progress=False)
    assert r.done and not (tmp_path / "0.log").exists()


def test_foreign_sqlite_file_is_left_byte_identical(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE runs (name TEXT, km REAL)")
    conn.execute("INSERT INTO runs VALUES ('sunday', 12.5)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(StoreError) as info:
        Store(tmp_path)
    assert str(info.value).startswith(f"{db}: not a normlab results store (SQLite tables: runs)")
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME]  # no -wal, no -shm


@pytest.mark.parametrize("damage", ["random", "truncated", "zeroed"])
def test_corrupt_store_is_one_line_with_recovery(tmp_path: Path, damage: str) -> None:
    run_sweep("s", [{"runner": "fake-echo", "value": i} for i in range(50)], tmp_path / "ok",
              workers=1, progress=False)
    good = (tmp_path / "ok" / DB_NAME)
    with Store(good):
        pass  # checkpoint the WAL into the main file
    raw = good.read_bytes()
    if damage == "random":
        data = np.random.default_rng(0).bytes(len(raw))
    elif damage == "truncated":
        data = raw[: len(raw) // 3]
    else:
        data = raw[:100] + b"\0" * (len(raw) - 100)
    bad = tmp_path / "bad" / DB_NAME
    bad.parent.mkdir()
    bad.write_bytes(data)
    with pytest.raises(StoreError) as info:
        Store(bad.parent)
    msg = str(info.value)
    assert msg.startswith(str(bad)) and "\n" not in msg
    assert "move it away" in msg or "not a normlab results store" in msg
    assert bad.read_bytes() == data


def test_new_store_has_application_id(tmp_path: Path) -> None:
    from normlab.lab.store import APPLICATION_ID

    Store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


# --------------------------------------------------------------------------------------------
# case 4: CSV formula injection
# --------------------------------------------------------------------------------------------
def test_csv_cells_cannot_be_formulas(tmp_path: Path) -> None:
    import csv

    cfgs = [{"runner": "fake-echo", "value": v, "note": v}
            for v in ("=HYPERLINK(\"http://x\",\"y\")", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "ok")]
    cfgs.append({"runner": "fake-echo", "value": -3.5, "note": "neg number stays a number"})
    with Store(tmp_path) as s:
        ids = s.add_runs("s", cfgs)
        for rid in ids:
            a = s.claim(rid)
            s.finish_run(rid, {"loss": float("-inf"), "delta": -0.25}, attempt=a)
        path = s.to_csv(tmp_path / "results.csv")
    rows = list(csv.DictReader(path.open(newline="")))
    notes = [r["config.note"] for r in rows]
    assert notes[:7] == ["'=HYPERLINK(\"http://x\",\"y\")", "'+1", "'-2", "'@SUM(A1)", "'\tx", "'\rx", "ok"]
    assert rows[7]["config.value"] == "-3.5"
    assert rows[0]["final.loss"] == "-inf" and rows[0]["final.delta"] == "-0.25"


# --------------------------------------------------------------------------------------------
# case 7: results are a function of the data's content
# --------------------------------------------------------------------------------------------
TINY = {"runner": "train", "model": "mlp", "norm": "bn", "epochs": 1, "batch_size": 16,
        "max_steps": 4, "seed": 0}


def _npz(path: Path, n: int, classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.standard_normal((n, 6)).astype(np.float32), y=np.arange(n) % classes)


def test_changed_data_file_is_a_new_run(tmp_path: Path) -> None:
    data = tmp_path / "mine.npz"
    _npz(data, 200, 2, 0)
    cfg = {**TINY, "data": str(data)}
    (a,) = run_sweep("s", [cfg], tmp_path / "run", workers=1, progress=False)
    assert a.done and a.final["n_train"] == 160
    assert a.config["data_identity"]["size"] == data.stat().st_size
    _npz(data, 1000, 7, 1)  # same path, new content
    (b,) = run_sweep("s", [cfg], tmp_path / "run", workers=1, progress=False)
    assert b.run_id != a.run_id and b.done and b.final["n_train"] == 800
    assert prepare_configs([{"data": "digits"}])[0]["data_identity"] == {"builtin": "digits", "version": 1}


# --------------------------------------------------------------------------------------------
# case 8: results do not depend on --workers; a run is reproducible bit for bit
# --------------------------------------------------------------------------------------------
# Batches of 128 make torch split BN's reductions over threads: on main this config's BN run gave
# val loss 1.6749141767 with --workers 1 (2 threads) and 1.6749140067 with --workers 2 (1 each).
CNN = {"runner": "train", "data": "digits", "model": "cnn", "norm": "gn:16", "epochs": 1,
       "batch_size": 128, "max_steps": 8, "seed": 0, "data_options": {"limit": 1024}}
_TIMING = ("time", "peak_rss")


def _metrics(r) -> dict:
    return {k: v for k, v in r.final.items() if not any(t in k for t in _TIMING)}


_SWEEP = (
    "import json, sys\n"
    "from normlab.lab.sweep import run_sweep\n"
    "if __name__ == '__main__':\n"
    "    rs = run_sweep('w', json.loads(sys.argv[1]), sys.argv[2], workers=int(sys.argv[3]),\n"
    "                   progress=False)\n"
    "    print(json.dumps([[r.run_id, r.status, r.error, r.final, r.epochs] for r in rs]))\n"
)


def _fresh_sweep(configs: list, run_dir: Path, workers: int) -> list:
    """A sweep as a user starts it: a fresh Python process (no state left by other tests)."""
    script = run_dir.parent / "sweep_script.py"
    script.write_text(_SWEEP)
    proc = subprocess.run([sys.executable, str(script), json.dumps(configs), str(run_dir),
                           str(workers)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _strip_timing(d: dict) -> dict:
    return {k: v for k, v in d.items() if not any(t in k for t in _TIMING)}


@pytest.mark.slow
def test_workers_do_not_change_results(tmp_path: Path) -> None:
    cfgs = [CNN, {**CNN, "norm": "bn"}]
    one = _fresh_sweep(cfgs, tmp_path / "w1", 1)
    two = _fresh_sweep(cfgs, tmp_path / "w2", 2)
    assert [r[0] for r in one] == [r[0] for r in two]
    assert all(r[1] == "done" for r in one + two), [r[2] for r in one + two]
    assert [_strip_timing(r[3]) for r in one] == [_strip_timing(r[3]) for r in two]
    assert [[_strip_timing(e) for e in r[4]] for r in one] == [[_strip_timing(e) for e in r[4]]
                                                              for r in two]


@pytest.mark.slow
def test_run_is_bitwise_reproducible_in_a_fresh_process(tmp_path: Path) -> None:
    (a,) = _fresh_sweep([CNN], tmp_path / "a", 1)
    (b,) = _fresh_sweep([CNN], tmp_path / "b", 1)
    assert a[1] == b[1] == "done"
    assert _strip_timing(a[3]) == _strip_timing(b[3])
    assert float(a[3]["final_val_loss"]).hex() == float(b[3]["final_val_loss"]).hex()


# --------------------------------------------------------------------------------------------
# case 3: the numba cache folder cannot be planted by another local user
# --------------------------------------------------------------------------------------------
def test_numba_cache_folder_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stat
    import tempfile

    ckc = pytest.importorskip("normlab.core.cpu.jit")
    import numba

    monkeypatch.setattr(numba.config, "CACHE_DIR", "")  # no NUMBA_CACHE_DIR
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("NORMLAB_NUMBA_CACHE_DIR", str(shared))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    # the documented order, skipping the group/other-writable folder; never the package's
    # __pycache__ (writable here, and used first before)
    assert ckc._choose_cache_dir() == (True, str(tmp_path / "xdg" / "numba"))
    assert stat.S_IMODE(os.stat(tmp_path / "xdg" / "numba").st_mode) == 0o700
    (tmp_path / "xdg" / "numba").chmod(0o777)
    fallback = tmp_path / "tmp" / f"normlab-numba-cache-{os.getuid()}"
    assert ckc._choose_cache_dir() == (True, str(fallback))
    assert stat.S_IMODE(os.stat(fallback).st_mode) == 0o700
    # another user pre-created the last-resort folder world-writable: caching is off
    fallback.chmod(0o777)
    assert ckc._choose_cache_dir() == (False, None)
    if os.geteuid() == 0:  # a folder owned by someone else, however private, is refused too
        fallback.chmod(0o700)
        os.chown(fallback, 65534, 65534)
        assert ckc._choose_cache_dir() == (False, None)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "xdg")
    monkeypatch.setenv("NORMLAB_NUMBA_CACHE_DIR", str(link))
    assert ckc._choose_cache_dir() == (False, None)
