"""Tests of normlab.lab.data: built-in data sets, every user file format, and their errors."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from normlab.lab.data import DataBundle, dataset_names, load_dataset, read_idx, register_dataset


# --------------------------------------------------------------------------------------------
# built-in data sets
# --------------------------------------------------------------------------------------------
def test_digits_images() -> None:
    b = load_dataset("digits")
    x, y = b.train.tensors
    assert b.kind == "image" and b.input_shape == (1, 8, 8) and b.num_classes == 10
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == (1, 8, 8)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert b.n_train + b.n_val == 1797
    assert b.n_val == round(1797 * 0.2)
    # Stratified: every class about 20 % in validation.
    counts = torch.bincount(b.val.tensors[1], minlength=10)
    assert counts.min() >= 33 and counts.max() <= 39


def test_digits_match_scikit_learn() -> None:
    # The loader reads scikit-learn's CSV itself (no scikit-learn import): same data as load_digits.
    from sklearn.datasets import load_digits

    from normlab.lab.data import _digits_arrays

    digits = load_digits()
    x, y = _digits_arrays()
    assert np.array_equal(x, (digits.images / 16.0).astype(np.float32))
    assert np.array_equal(y, digits.target)


def test_digits_split_is_fixed_whatever_the_seed() -> None:
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=123)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    assert torch.equal(a.val.tensors[1], b.val.tensors[1])


def test_digits_sequences() -> None:
    rows = load_dataset("digits-rows")
    pixels = load_dataset("digits-pixels")
    perm = load_dataset("digits-pixels-permuted")
    perm2 = load_dataset("digits-pixels", permute=True)
    img = load_dataset("digits")
    assert rows.kind == pixels.kind == "sequence"
    assert rows.input_shape == (8, 8) and pixels.input_shape == (64, 1)
    assert torch.equal(rows.train.tensors[0], img.train.tensors[0][:, 0])
    assert torch.equal(pixels.train.tensors[0][:, :, 0], img.train.tensors[0].reshape(-1, 64))
    # Fixed permutation: same every time, a reordering of the steps, not the identity.
    p, q = perm.train.tensors[0][:, :, 0], pixels.train.tensors[0][:, :, 0]
    assert torch.equal(p, perm2.train.tensors[0][:, :, 0])
    assert not torch.equal(p, q)
    assert torch.equal(torch.sort(p, dim=1).values, torch.sort(q, dim=1).values)
    assert torch.equal(perm.train.tensors[1], pixels.train.tensors[1])


def test_limit_is_deterministic_and_stratified() -> None:
    a = load_dataset("digits", limit=100, val_limit=50)
    b = load_dataset("digits", limit=100, val_limit=50)
    assert a.n_train == 100 and a.n_val == 50
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    counts = torch.bincount(a.train.tensors[1], minlength=10)
    assert counts.min() >= 9 and counts.max() <= 11
    assert load_dataset("digits", limit=10**6).n_train == 1438  # larger than the set: no-op
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit"):
            load_dataset("digits", limit=bad)


def test_synthetic2d_regression_and_classification() -> None:
    reg = load_dataset("synthetic2d", n=500)
    x, t = reg.train.tensors
    assert reg.kind == "tabular" and reg.input_shape == (2,) and reg.num_classes == 0
    assert reg.task == "regression" and t.dtype == torch.float32 and t.dim() == 1
    assert reg.n_train + reg.n_val == 500
    assert -200 <= float(x[:, 0].min()) and float(x[:, 0].max()) <= 200
    assert float(x[:, 0].abs().max()) > 100  # the wide feature really is wide
    assert float(x[:, 1].abs().max()) <= 10
    # Targets follow the linear model up to the noise.
    resid = t - (0.05 * x[:, 0] + 1.0 * x[:, 1])
    assert 0.8 < float(resid.std()) < 1.2

    cls = load_dataset("synthetic2d-cls", n=400)
    assert cls.num_classes == 2 and cls.task == "classification"
    assert set(cls.train.tensors[1].tolist()) == {0, 1}
    same = load_dataset("synthetic2d", n=400, task="classification")
    assert torch.equal(same.train.tensors[0], cls.train.tensors[0])

    custom = load_dataset("synthetic2d", n=100, x1_range=(0, 1), x2_range=(5, 6), noise=0.0)
    xc = torch.cat([custom.train.tensors[0], custom.val.tensors[0]])
    assert float(xc[:, 0].max()) <= 1 and float(xc[:, 1].min()) >= 5
    assert not torch.equal(load_dataset("synthetic2d", seed=1).train.tensors[0], x)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"n": 1}, "n: expected"),
        ({"task": "ranking"}, "task"),
        ({"noise": -1.0}, "noise"),
        ({"x1_range": 5}, "x1_range"),
        ({"colour": "red"}, r"options: \['colour'\]"),
    ],
)
def test_synthetic2d_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_dataset("synthetic2d", **options)
    if "task" not in options:
        with pytest.raises(ValueError, match=match):
            load_dataset("synthetic2d-cls", **options)


def test_bad_specs_and_arguments() -> None:
    with pytest.raises(ValueError, match="unknown data set 'nope'.*digits"):
        load_dataset("nope")
    with pytest.raises(TypeError, match="data"):
        load_dataset(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset("digits", val_fraction=1.5)
    with pytest.raises(ValueError, match=r"options: \['foo'\].*digits"):
        load_dataset("digits", foo=1)
    with pytest.raises(FileNotFoundError, match="missing/file.npz"):
        load_dataset("missing/file.npz")


def test_register_dataset() -> None:
    def tiny(*, seed: int, val_fraction: float, n: int = 10) -> DataBundle:
        x = torch.arange(2.0 * n).reshape(n, 2)
        y = torch.arange(n) % 2
        return DataBundle(TensorDataset(x, y), TensorDataset(x, y), (2,), 2, "tabular", "tiny")

    name = f"tiny-{uuid.uuid4().hex[:8]}"
    register_dataset(name, tiny)
    assert name in dataset_names()
    assert load_dataset(name, n=6, limit=4).n_train == 4
    with pytest.raises(ValueError, match="already registered"):
        register_dataset(name, tiny)
    with pytest.raises(ValueError, match="name"):
        register_dataset("a:b", tiny)
    with pytest.raises(TypeError, match="loader"):
        register_dataset(name + "x", 3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# .npz
# --------------------------------------------------------------------------------------------
def test_npz_single_array_pair_is_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=rng.normal(size=(50, 3)), y=np.arange(50) % 5)
    b = load_dataset(str(path), val_fraction=0.2)
    assert b.kind == "tabular" and b.input_shape == (3,) and b.num_classes == 5
    assert b.n_train == 40 and b.n_val == 10
    assert sorted(b.val.tensors[1].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # stratified
    assert not torch.equal(
        load_dataset(str(path), seed=1).val.tensors[0], b.val.tensors[0]
    )  # user data: the split follows the seed


def test_npz_explicit_split_regression_and_images(tmp_path: Path) -> None:
    path = tmp_path / "split.npz"
    np.savez(
        path,
        X_train=np.zeros((6, 4, 4, 3), np.uint8) + 255,  # channels-last images
        y_train=np.linspace(0, 1, 6),
        X_val=np.zeros((2, 4, 4, 3), np.uint8),
        y_val=np.array([0.5, 0.25]),
    )
    b = load_dataset(str(path))
    assert b.kind == "image" and b.input_shape == (3, 4, 4) and b.num_classes == 0
    assert b.train.tensors[1].dtype == torch.float32
    assert float(b.train.tensors[0].max()) == 1.0  # uint8 / 255
    assert b.n_train == 6 and b.n_val == 2

    gray = tmp_path / "gray.npz"
    np.savez(gray, x=np.zeros((10, 5, 5)), y=np.arange(10) % 2)
    assert load_dataset(str(gray)).kind == "sequence"
    assert load_dataset(str(gray), kind="image").input_shape == (1, 5, 5)
    forced = load_dataset(str(gray), task="regression")
    assert forced.num_classes == 0


def test_npz_errors(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, inputs=np.zeros((4, 2)), labels=np.zeros(4))
    with pytest.raises(ValueError, match=r"wrong.npz: expected arrays 'x' and 'y'.*\['inputs', 'labels'\]"):
        load_dataset(str(wrong))
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, x=np.zeros((4, 2)), y=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="mismatch.npz.*4 samples.*3"):
        load_dataset(str(mismatch))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="corrupt.npz: not a readable .npz"):
        load_dataset(str(corrupt))
    negative = tmp_path / "negative.npz"
    np.savez(negative, x=np.zeros((10, 2)), y=np.array([-1, 0] * 5))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        load_dataset(str(negative))
    with pytest.raises(ValueError, match="kind"):
        load_dataset(str(mismatch), kind="video")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not a supported file"):
        load_dataset(str(other))


# --------------------------------------------------------------------------------------------
# MNIST idx
# --------------------------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, magic: int | None = None, *, truncate: int = 0) -> Path:
    """Write ``array`` (uint8) in the idx format; ``magic`` overrides the header's magic."""
    if magic is None:
        magic = 0x0800 | array.ndim
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    if truncate:
        raw = raw[:-truncate]
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def mnist_dir(root: Path, n_train: int = 20, n_test: int = 10, test: bool = True, gz: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_train, 6, 5)))
    write_idx(root / f"train-labels-idx1-ubyte{ext}", np.arange(n_train) % 10)
    if test:
        write_idx(root / f"t10k-images-idx3-ubyte{ext}", rng.integers(0, 256, (n_test, 6, 5)))
        write_idx(root / f"t10k-labels-idx1-ubyte{ext}", np.arange(n_test) % 10)
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_directory_uses_test_files_as_validation(tmp_path: Path, gz: bool) -> None:
    b = load_dataset(str(mnist_dir(tmp_path / "mnist", gz=gz)))
    assert b.kind == "image" and b.input_shape == (1, 6, 5) and b.num_classes == 10
    assert b.n_train == 20 and b.n_val == 10
    x = b.train.tensors[0]
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1


def test_mnist_train_only_file_and_pair(tmp_path: Path) -> None:
    root = mnist_dir(tmp_path / "m", n_train=30, test=False)
    split = load_dataset(str(root), val_fraction=0.2)
    assert split.n_train == 24 and split.n_val == 6
    images = root / "train-images-idx3-ubyte"
    assert load_dataset(str(images)).n_train == 24  # labels file found by name
    pair = load_dataset(f"{images},{root / 'train-labels-idx1-ubyte'}")
    assert torch.equal(pair.train.tensors[0], split.train.tensors[0])


def test_mnist_bad_magic_number(tmp_path: Path) -> None:
    root = mnist_dir(tmp_path / "m")
    write_idx(root / "train-images-idx3-ubyte", np.zeros((20, 6, 5)), magic=0x00000801)
    with pytest.raises(
        ValueError,
        match=r"train-images-idx3-ubyte: bad magic number 0x00000801 \(expected 0x00000803\)",
    ):
        load_dataset(str(root))


def test_mnist_truncated_and_mismatched(tmp_path: Path) -> None:
    root = mnist_dir(tmp_path / "t")
    write_idx(root / "train-images-idx3-ubyte", np.zeros((20, 6, 5)), truncate=7)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: expected 600 bytes .* found 593 \(truncated\)"):
        load_dataset(str(root))
    root = mnist_dir(tmp_path / "c")
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(19))
    with pytest.raises(ValueError, match="20 images but train-labels-idx1-ubyte has 19 labels"):
        load_dataset(str(root))
    tiny = tmp_path / "x-images-idx3-ubyte"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="truncated header"):
        read_idx(tiny)
    bad_gz = tmp_path / "y-images-idx3-ubyte.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="y-images-idx3-ubyte.gz: cannot read"):
        read_idx(bad_gz)


def test_mnist_missing_files(tmp_path: Path) -> None:
    root = mnist_dir(tmp_path / "m")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset(str(root))
    (root / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing train-labels-idx1-ubyte"):
        load_dataset(str(root))
    with pytest.raises(FileNotFoundError, match="no labels file"):
        load_dataset(str(root / "train-images-idx3-ubyte"))


def test_read_idx_other_types(tmp_path: Path) -> None:
    path = tmp_path / "floats.idx"
    data = np.arange(6, dtype=">f4").reshape(2, 3)
    path.write_bytes(struct.pack(">I", 0x0D02) + struct.pack(">2I", 2, 3) + data.tobytes())
    out = read_idx(path)
    assert out.dtype == np.float32 and out.tolist() == [[0, 1, 2], [3, 4, 5]]
    path.write_bytes(struct.pack(">I", 0x0A02) + struct.pack(">2I", 2, 3))
    with pytest.raises(ValueError, match="floats.idx: bad magic number 0x00000A02"):
        read_idx(path)


# --------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------
def cifar_batch(path: Path, n: int, label_key: bytes = b"labels", n_classes: int = 10, **extra) -> None:
    rng = np.random.default_rng(len(path.name))
    batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), label_key: list(np.arange(n) % n_classes)}
    batch.update(extra)
    path.write_bytes(pickle.dumps(batch))


def test_cifar10_directory(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for i in (1, 2):
        cifar_batch(root / f"data_batch_{i}", 6)
    cifar_batch(root / "test_batch", 4)
    b = load_dataset(str(root))
    assert b.input_shape == (3, 32, 32) and b.num_classes == 10 and b.kind == "image"
    assert b.n_train == 12 and b.n_val == 4
    # Row layout: 1024 red values, then green, then blue.
    raw = pickle.loads((root / "data_batch_1").read_bytes())[b"data"]
    expected = torch.from_numpy(raw[0, 1024:2048].reshape(32, 32).astype(np.float32) / 255)
    assert torch.equal(b.train.tensors[0][0, 1], expected)


def test_cifar100_fine_and_coarse(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    for name, n in (("train", 8), ("test", 4)):
        rng = np.random.default_rng(n)
        batch = {
            "data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),  # str keys (Python 3 pickle)
            "fine_labels": list(range(90, 90 + n)),
            "coarse_labels": list(range(n)),
        }
        (root / name).write_bytes(pickle.dumps(batch))
    fine = load_dataset(str(root))
    assert fine.num_classes == 100 and fine.train.tensors[1].tolist()[:3] == [90, 91, 92]
    coarse = load_dataset(str(root), coarse=True)
    assert coarse.num_classes == 20 and coarse.train.tensors[1].tolist()[:3] == [0, 1, 2]


def test_cifar_errors(tmp_path: Path) -> None:
    root = tmp_path / "c"
    root.mkdir()
    (root / "data_batch_1").write_bytes(b"garbage, not a pickle")
    with pytest.raises(ValueError, match="data_batch_1: not a CIFAR python batch"):
        load_dataset(str(root))
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}))
    with pytest.raises(ValueError, match=r"data_batch_1: expected keys b'data' and b'labels'"):
        load_dataset(str(root))
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_1: b'data' must have shape \(N, 3072\)"):
        load_dataset(str(root))
    cifar_batch(root / "data_batch_1", 6)
    with pytest.raises(ValueError, match="coarse"):
        load_dataset(str(root), coarse=True)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------
def save_image(path: Path, size: tuple[int, int] = (6, 4), mode: str = "L", value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, color).save(path)


def test_image_folder_gray(tmp_path: Path) -> None:
    for cls, value in (("cat", 0), ("dog", 255)):
        for i in range(5):
            save_image(tmp_path / "pets" / cls / f"{i}.png", value=value)
    b = load_dataset(str(tmp_path / "pets"), val_fraction=0.2)
    assert b.input_shape == (1, 4, 6)  # PIL sizes are (W, H)
    assert b.classes == ("cat", "dog") and b.num_classes == 2
    assert b.n_train == 8 and b.n_val == 2
    x, y = b.train.tensors
    assert torch.all(x[y == 0] == 0) and torch.all(x[y == 1] == 1)


def test_image_folder_rgb_resize_and_split_dirs(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    save_image(root / "train" / "a" / "1.png", size=(8, 8))
    save_image(root / "train" / "a" / "2.jpg", size=(10, 6), mode="RGB")
    save_image(root / "train" / "b" / "1.bmp", size=(8, 8))
    save_image(root / "val" / "b" / "1.png", size=(4, 4))
    with pytest.raises(ValueError, match="image_size: images differ in size"):
        load_dataset(str(root))
    b = load_dataset(str(root), image_size=5)
    assert b.input_shape == (3, 5, 5) and b.kind == "image"  # one RGB image -> 3 channels
    assert b.n_train == 3 and b.n_val == 1 and b.val.tensors[1].tolist() == [1]
    assert load_dataset(str(root), image_size=(4, 6), channels=1).input_shape == (1, 4, 6)
    with pytest.raises(ValueError, match="channels"):
        load_dataset(str(root), image_size=4, channels=2)


def test_image_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "broken"
    save_image(root / "a" / "1.png")
    (root / "a" / "2.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"2.png: not a readable image"):
        load_dataset(str(root))
    (root / "a" / "2.png").unlink()
    (root / "b").mkdir()
    (root / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"broken/b: class folder has no image files"):
        load_dataset(str(root))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no recognised data set"):
        load_dataset(str(empty))


# --------------------------------------------------------------------------------------------
# module:function
# --------------------------------------------------------------------------------------------
@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a module into tmp_path and return its (unique) importable name."""

    def write(source: str) -> str:
        name = f"user_data_{uuid.uuid4().hex[:10]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(tmp_path))
        return name

    yield write
    for name in [m for m in sys.modules if m.startswith("user_data_")]:
        sys.modules.pop(name, None)


def test_module_function_dataset(user_module) -> None:
    name = user_module(
        """
        import torch
        from torch.utils.data import Dataset, TensorDataset

        class Pairs(Dataset):
            classes = ["a", "b", "c"]
            def __init__(self, n, offset=0):
                self.n, self.offset = n, offset
            def __len__(self):
                return self.n
            def __getitem__(self, i):
                return torch.full((4, 2), float(i + self.offset)), i % 2

        def whole(n=20):
            return TensorDataset(torch.randn(n, 5), torch.arange(n) % 4)

        def pair():
            return Pairs(8), Pairs(4, offset=100)
        """
    )
    whole = load_dataset(f"{name}:whole", n=30, val_fraction=0.2)
    assert whole.kind == "tabular" and whole.num_classes == 4
    assert whole.n_train == 24 and whole.n_val == 6
    pair = load_dataset(f"{name}:pair")
    assert pair.kind == "sequence" and pair.input_shape == (4, 2)
    assert pair.num_classes == 3  # from the dataset's `classes`
    assert pair.n_train == 8 and float(pair.val.tensors[0][0, 0, 0]) == 100.0


def test_module_function_errors(user_module) -> None:
    name = user_module(
        """
        value = 3
        def bad_items():
            return [1, 2, 3]
        """
    )
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_dataset("no_such_module_xyz:f")
    with pytest.raises(ValueError, match=f"module '{name}' has no attribute 'missing'"):
        load_dataset(f"{name}:missing")
    with pytest.raises(TypeError, match="expected a callable"):
        load_dataset(f"{name}:value")
    with pytest.raises(ValueError, match=r"item 0 must be an \(x, y\) pair"):
        load_dataset(f"{name}:bad_items")



def test_mnist1d_is_generated_once_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    first = load_dataset("mnist1d")
    assert (tmp_path / "mnist1d-default.npz").is_file()
    second = load_dataset("mnist1d")  # from the cache
    assert first.input_shape == (40, 1) and first.kind == "sequence" and first.num_classes == 10
    assert (first.n_train, first.n_val) == (4000, 1000)
    assert torch.equal(first.train.tensors[0], second.train.tensors[0])
    assert torch.equal(first.val.tensors[1], second.val.tensors[1])
    assert set(first.train.tensors[1].unique().tolist()) == set(range(10))
