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
