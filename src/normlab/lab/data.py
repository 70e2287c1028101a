"""Data sets for the lab: built-in ones that need no download, and the user's own files.

``load_dataset(spec, seed=..., val_fraction=..., **options)`` returns a :class:`DataBundle`: a train
and a validation :class:`~torch.utils.data.TensorDataset` (float32 inputs; int64 labels, or float32
targets for regression), the per-sample input shape, the number of classes and the kind of input.

Specs
-----
Built-in (see :func:`dataset_names`; more with :func:`register_dataset`):

* ``digits``: scikit-learn's 8×8 digits (ships with scikit-learn), images ``(1, 8, 8)`` in [0, 1]
  (pixel / 16). The train/validation split is stratified and FIXED (split seed 0): it does not
  change with ``seed``, so runs with different seeds see the same data.
* ``digits-rows``: the same images as sequences of 8 rows, ``(T=8, F=8)``.
* ``chars``: next-character prediction on a text that ships with Python itself, the source of a
  fixed list of standard-library modules (:data:`CHARS_MODULES`; SHA-256 recorded per Python
  version in :data:`CHARS_SHA256` and part of the data identity), 128 ASCII classes, inputs
  ``(context, 1)``. Options ``size`` (``tiny``/``small``/``large``: 8 K, 64 K, 512 K training
  characters) and ``context`` (64). The split is by contiguous 1024-character blocks and fixed.
  Language models use :func:`char_corpus` (every position predicts the next character).
* ``digits-pixels``: sequences of 64 pixels, ``(T=64, F=1)``; option ``permute=True`` (or spec
  ``digits-pixels-permuted``) reorders the 64 steps by a fixed permutation (NumPy seed 0).
* ``synthetic2d`` / ``synthetic2d-cls``: the article's two-feature example. ``x1`` uniform in
  ``[-200, 200]`` and ``x2`` uniform in ``[-10, 10]`` (deliberately NOT standardized: the point is
  the difference of scales). ``t = w1·x1 + w2·x2 + b + noise``. ``synthetic2d`` is regression on
  ``t`` (``num_classes == 0``, float32 targets of shape ``(N,)``); ``synthetic2d-cls`` is binary
  classification of ``t > 0`` (``num_classes == 2``). Options: ``n`` (1000), ``x1_range``,
  ``x2_range``, ``weights`` ((0.05, 1.0): both features move ``t`` by about ±10), ``bias`` (0),
  ``noise`` (std, 1.0), ``task`` ("regression" | "classification"). Draws use ``seed``.
* ``tiles4``: procedural 4×4 images ``(1, 4, 4)``, 10 classes of fixed binary prototypes under a
  random one-pixel cyclic shift, gain, offset and pixel noise (:func:`load_tiles4`; options
  ``n_train`` 4000, ``n_val`` 1000, ``noise`` 0.3); small enough that a CNN's BN statistics pool
  fewer than 16 values at batch size 2. Draws use ``seed``.

The user's data (a path; ``~`` is expanded):

* ``.npz`` file with keys ``x``/``X`` and ``y`` (split here, stratified for classification, with
  ``seed``), or ``x_train``, ``y_train``, ``x_val``, ``y_val`` (``x_test``/``y_test`` accepted for
  the validation part; ``X_...`` accepted too). Per-sample shape gives the kind: 1-D tabular,
  2-D sequence ``(T, F)``, 3-D image ``(C, H, W)``; a 4-D array whose last dim is 1, 3 or 4 and
  smaller than its second dim is taken as channels-last ``(N, H, W, C)`` and moved to
  ``(N, C, H, W)``. Option ``kind="image"`` makes 2-D samples one-channel images. ``uint8`` inputs are divided by 255. Integer labels mean classification
  (``num_classes`` = max label + 1, or option ``num_classes``); float labels mean regression
  (option ``task`` overrides).
* MNIST-style idx files (MNIST, Fashion-MNIST, KMNIST...): a directory with
  ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (``.gz`` or not, ``-`` or ``.``
  before ``idx``), and optionally ``t10k-...`` files, which then form the validation set; or an
  images file (its labels file is found by name), or ``"IMAGES,LABELS"``. Images ``(1, H, W)``/255.
* CIFAR-10/100 "python version" directory: ``data_batch_1..5`` + ``test_batch`` (labels
  ``b'labels'``, 10 classes) or ``train`` + ``test`` (``b'fine_labels'``, 100 classes; option
  ``coarse=True`` for the 20 ``b'coarse_labels'``). The test batch is the validation set. These
  files are pickles; they are read by a restricted unpickler that rebuilds only builtin
  containers and NumPy arrays and refuses any other global (a crafted pickle cannot run code).
* A folder of images per class, ``root/<class>/*.png`` (png, jpg, jpeg, bmp, gif, webp, tif),
  or ``root/train/<class>/...`` with ``root/val/`` (or ``valid``/``test``). Class indices follow
  the sorted class names. Images are converted to 1 channel when all are grayscale, else to RGB
  (option ``channels`` forces 1 or 3), and resized to option ``image_size`` (int or (H, W));
  without it all images must have the same size.
* ``package.module:function``: ``function(**options)`` returns a torch ``Dataset`` (split here),
  a ``(train, val)`` pair of datasets, or a :class:`DataBundle`. Items must be ``(x, y)`` pairs.
  A dataset attribute ``classes`` gives the number of classes. The options ``kind``, ``task`` and
  ``num_classes`` are read by the loader (as for ``.npz``); all others go to ``function``.

Options for every spec: ``limit`` (at most this many training samples, for quick profiles; a
deterministic stratified subset for classification, the first ``limit`` otherwise) and
``val_limit`` (the same for the validation set).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import pickle
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from normlab._checks import check_int, check_positive_int
from normlab.lab.util import add_entry, import_object

__all__ = [
    "CHARS_MODULES",
    "CHARS_SIZES",
    "CharCorpus",
    "DataBundle",
    "char_corpus",
    "chars_sha256",
    "data_identity",
    "dataset_names",
    "load_dataset",
    "read_idx",
    "register_dataset",
]

KINDS: tuple[str, ...] = ("image", "sequence", "tabular")
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)


@dataclass
class DataBundle:
    """A train/validation pair of tensor datasets and what a model needs to know about them.

    Attributes:
        train, val: ``TensorDataset(inputs, labels)``; inputs float32 of shape
            ``(N, *input_shape)``; labels int64 ``(N,)`` (classification) or float32 ``(N,)``
            (regression, ``num_classes == 0``).
        input_shape: per-sample input shape: ``(C, H, W)`` for images, ``(T, F)`` for sequences,
            ``(F,)`` for tabular data.
        num_classes: number of classes; 0 means regression.
        kind: ``"image"``, ``"sequence"`` or ``"tabular"``.
        name: short description of where the data came from.
        classes: class names when the source has them (image folders), else ``None``.
    """

    train: TensorDataset
    val: TensorDataset
    input_shape: tuple[int, ...]
    num_classes: int
    kind: str
    name: str
    classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {list(KINDS)}, got {self.kind!r}")
        self.input_shape = tuple(int(d) for d in self.input_shape)

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"`` (``num_classes == 0``)."""
        return "regression" if self.num_classes == 0 else "classification"

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return len(self.train)

    @property
    def n_val(self) -> int:
        """Number of validation samples."""
        return len(self.val)


# --------------------------------------------------------------------------------------------
# Small shared helpers
# --------------------------------------------------------------------------------------------
def _as_inputs(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """float32 tensor; uint8 data is scaled to [0, 1] (the usual storage of images)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_complex():
            raise TypeError(f"inputs: expected real numbers, got dtype {x.dtype}")
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        return x.float().contiguous()
    arr = np.asarray(x)
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"inputs: expected numeric data, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise TypeError(f"inputs: expected real numbers, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


#: Largest number of classes inferred from the labels (max label + 1); more needs an explicit
#: ``num_classes`` option (a stray label of 10⁹ would otherwise build a 10⁹-way output layer).
MAX_INFERRED_CLASSES = 100_000


def _infer_num_classes(where: str, *labels: torch.Tensor) -> int:
    """``max label + 1`` over ``labels``, refused above :data:`MAX_INFERRED_CLASSES`."""
    top = max(int(y.max()) for y in labels if len(y))
    if top + 1 > MAX_INFERRED_CLASSES:
        raise ValueError(
            f"{where}: labels: expected class indices in [0, {MAX_INFERRED_CLASSES}), got maximum "
            f"label {top}; pass num_classes (--num-classes) if there really are {top + 1} classes"
        )
    return top + 1


def _first_bad(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def _check_values(arr: np.ndarray | torch.Tensor, where: str, array: str) -> None:
    """Numeric arrays must hold finite real numbers: complex, NaN and Inf are errors.

    The message names the file (``where``), the array and the index of the first bad value.
    """
    if isinstance(arr, torch.Tensor):
        if arr.is_complex():
            raise ValueError(f"{where}: array {array!r} holds complex numbers ({arr.dtype}); "
                             "expected real numbers")
        if arr.is_floating_point() and not bool(torch.isfinite(arr).all()):
            arr = arr.detach().cpu().numpy()
        else:
            return
    if np.iscomplexobj(arr):
        raise ValueError(f"{where}: array {array!r} holds complex numbers ({arr.dtype}); "
                         "expected real numbers")
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.all():
            idx = _first_bad(~finite)
            raise ValueError(
                f"{where}: array {array!r} has a non-finite value ({arr[idx]}) at index {idx}; "
                "expected finite real numbers"
            )


def _is_integral(y: np.ndarray) -> bool:
    return bool(np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_)


def _labels(y: np.ndarray, task: str, where: str) -> torch.Tensor:
    """int64 labels (classification) or float32 targets (regression) as a 1-D tensor."""
    if y.ndim != 1:
        raise ValueError(f"{where}: labels must be 1-D (one per sample), got shape {y.shape}")
    if task == "regression":
        return torch.from_numpy(np.array(y, dtype=np.float32))  # copy: y may be read-only
    if not _is_integral(y):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{where}: classification labels must be integers, got {y.dtype} values")
    if y.size and y.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got minimum {y.min()}")
    return torch.from_numpy(np.array(y, dtype=np.int64))


def _infer_kind(sample_shape: tuple[int, ...], where: str) -> str:
    kinds = {1: "tabular", 2: "sequence", 3: "image"}
    if len(sample_shape) not in kinds:
        raise ValueError(
            f"{where}: cannot tell the kind of samples of shape {sample_shape}: expected "
            "(F,) tabular, (T, F) sequence or (C, H, W) image"
        )
    return kinds[len(sample_shape)]


def _split(
    n: int, y: np.ndarray | None, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and validation indices; stratified by ``y`` when given.

    Stratified: each class gives ``round(n_c * val_fraction)`` samples to validation (largest
    remainders settle the rounding so that the total is ``round(n * val_fraction)``), chosen by a
    NumPy generator seeded with ``seed``. Written with NumPy rather than scikit-learn's
    ``train_test_split`` so that loading data does not import scikit-learn (seconds per process).
    """
    n_val = int(round(n * val_fraction))
    if n_val < 1 or n - n_val < 1:
        raise ValueError(
            f"val_fraction: {val_fraction} of {n} samples leaves an empty train or validation set"
        )
    rng = np.random.default_rng(seed)
    if y is None:
        val = rng.permutation(n)[:n_val]
    else:
        classes, counts = np.unique(y, return_counts=True)
        quota = counts * n_val / n
        take = np.floor(quota).astype(np.int64)
        extra = np.argsort(-(quota - take), kind="stable")[: n_val - int(take.sum())]
        take[extra] += 1
        val = np.concatenate(
            [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take)]
        )
    is_val = np.zeros(n, dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _subset_order(y: torch.Tensor, classification: bool) -> torch.Tensor:
    """A deterministic order whose every prefix is (nearly) stratified for classification.

    Sample ``r`` of a class of size ``n_c`` gets the key ``(r + 0.5) / n_c``; sorting by that key
    interleaves the classes in proportion to their sizes (systematic sampling). Without classes
    the order is the data order.
    """
    n = len(y)
    if not classification:
        return torch.arange(n)
    keys = np.empty(n, dtype=np.float64)
    labels = y.numpy()
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        keys[where] = (np.arange(len(where)) + 0.5) / len(where)
    return torch.from_numpy(np.argsort(keys, kind="stable"))


def _limit(ds: TensorDataset, limit: int | None, classification: bool, name: str) -> TensorDataset:
    check_positive_int(limit, name, allow_none=True)
    if limit is None:
        return ds
    x, y = ds.tensors
    if limit >= len(y):
        return ds
    keep = torch.sort(_subset_order(y, classification)[:limit]).values
    return TensorDataset(x[keep], y[keep])


def _bundle(
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_va: torch.Tensor,
    y_va: torch.Tensor,
    *,
    kind: str,
    name: str,
    num_classes: int,
    classes: Sequence[str] | None = None,
) -> DataBundle:
    if x_tr.shape[1:] != x_va.shape[1:]:
        raise ValueError(
            f"{name}: train samples have shape {tuple(x_tr.shape[1:])} but validation samples "
            f"{tuple(x_va.shape[1:])}"
        )
    for part, x, y in (("train", x_tr, y_tr), ("validation", x_va, y_va)):
        _check_values(x, name, f"{part} inputs")
        _check_values(y, name, f"{part} labels")
        if len(x) != len(y):
            raise ValueError(f"{name}: {part} part has {len(x)} inputs but {len(y)} labels")
        if num_classes and len(y) and int(y.max()) >= num_classes:
            raise ValueError(
                f"{name}: {part} label {int(y.max())} is out of range for {num_classes} classes"
            )
    return DataBundle(
        train=TensorDataset(x_tr, y_tr),
        val=TensorDataset(x_va, y_va),
        input_shape=tuple(x_tr.shape[1:]),
        num_classes=num_classes,
        kind=kind,
        name=name,
        classes=tuple(classes) if classes is not None else None,
    )


def _from_arrays(
    x: torch.Tensor,
    y: np.ndarray,
    *,
    task: str,
    kind: str,
    name: str,
    seed: int,
    val_fraction: float,
    num_classes: int | None = None,
    fixed_split_seed: int | None = None,
) -> DataBundle:
    """Split one (x, y) set into train/validation and bundle it."""
    labels = _labels(y, task, name)
    split_seed = seed if fixed_split_seed is None else fixed_split_seed
    tr, va = _split(len(labels), y if task == "classification" else None, val_fraction, split_seed)
    if task == "classification" and num_classes is None:
        num_classes = _infer_num_classes(name, labels) if len(labels) else 0
    return _bundle(
        x[tr],
        labels[tr],
        x[va],
        labels[va],
        kind=kind,
        name=name,
        num_classes=num_classes if task == "classification" else 0,
    )


# --------------------------------------------------------------------------------------------
# Built-in data sets
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images (1797, 8, 8) in [0, 1], labels), read-only arrays.

    Read straight from the CSV that ships inside scikit-learn (what ``load_digits`` reads), found
    without importing scikit-learn, whose import costs seconds per process; ``load_digits`` is
    the fallback if the file is not where expected.
    """
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:  # pragma: no cover - depends on the scikit-learn install
        from sklearn.datasets import load_digits

        digits = load_digits()
        images, target = digits.images, digits.target
    x = (images / 16.0).astype(np.float32)
    y = target.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False  # cached: nobody may modify them
    return x, y


def _digits_split(layout: str, x: np.ndarray, y: np.ndarray, val_fraction: float) -> DataBundle:
    # The split never depends on the run seed: seeds then vary only model init and batch order.
    kind = "image" if layout == "digits" else "sequence"
    return _from_arrays(
        torch.tensor(x),  # a copy: the cached arrays are read-only
        y,
        task="classification",
        kind=kind,
        name=layout,
        seed=0,
        val_fraction=val_fraction,
        num_classes=10,
        fixed_split_seed=0,
    )


def load_digits_images(*, seed: int, val_fraction: float) -> DataBundle:
    """``digits``: 8×8 digit images ``(1, 8, 8)`` in [0, 1], fixed stratified split."""
    x, y = _digits_arrays()
    return _digits_split("digits", x[:, None], y, val_fraction)


def load_digits_rows(*, seed: int, val_fraction: float) -> DataBundle:
    """``digits-rows``: each image as 8 steps of 8 features (its rows)."""
    x, y = _digits_arrays()
    return _digits_split("digits-rows", x, y, val_fraction)


def load_digits_pixels(*, seed: int, val_fraction: float, permute: bool = False) -> DataBundle:
    """``digits-pixels``: each image as 64 steps of 1 pixel; ``permute`` fixes a shuffled order."""
    x, y = _digits_arrays()
    x = x.reshape(len(x), 64, 1)
    name = "digits-pixels"
    if permute:
        x = x[:, np.random.default_rng(0).permutation(64)]
        name = "digits-pixels-permuted"
    return _digits_split(name, x, y, val_fraction)


def load_digits_pixels_permuted(*, seed: int, val_fraction: float) -> DataBundle:
    """``digits-pixels-permuted``: ``digits-pixels`` with a fixed permutation of the steps."""
    return load_digits_pixels(seed=seed, val_fraction=val_fraction, permute=True)


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a pair of numbers, got {value!r}") from None
    return a, b


def load_synthetic2d(
    *,
    seed: int,
    val_fraction: float,
    n: int = 1000,
    x1_range: Sequence[float] = (-200.0, 200.0),
    x2_range: Sequence[float] = (-10.0, 10.0),
    weights: Sequence[float] = (0.05, 1.0),
    bias: float = 0.0,
    noise: float = 1.0,
    task: str = "regression",
) -> DataBundle:
    """The article's two-feature example (see the module docstring); draws use ``seed``."""
    check_int(n, "n", low=2)
    if task not in ("regression", "classification"):
        raise ValueError(f"task: expected 'regression' or 'classification', got {task!r}")
    if noise < 0:
        raise ValueError(f"noise: expected a standard deviation >= 0, got {noise}")
    lo1, hi1 = _pair(x1_range, "x1_range")
    lo2, hi2 = _pair(x2_range, "x2_range")
    w1, w2 = _pair(weights, "weights")
    rng = np.random.default_rng(seed)
    x = np.stack([rng.uniform(lo1, hi1, n), rng.uniform(lo2, hi2, n)], axis=1)
    t = w1 * x[:, 0] + w2 * x[:, 1] + bias + noise * rng.standard_normal(n)
    y = (t > 0).astype(np.int64) if task == "classification" else t
    suffix = "-cls" if task == "classification" else ""
    return _from_arrays(
        torch.from_numpy(x.astype(np.float32)),
        y,
        task=task,
        kind="tabular",
        name=f"synthetic2d{suffix}",
        seed=seed,
        val_fraction=val_fraction,
        num_classes=2 if task == "classification" else None,
    )


def load_synthetic2d_cls(*, seed: int, val_fraction: float, **options: Any) -> DataBundle:
    """``synthetic2d-cls``: :func:`load_synthetic2d` with ``task="classification"``."""
    if "task" in options:
        raise ValueError("task: 'synthetic2d-cls' is the classification task; do not pass task")
    _check_options(load_synthetic2d, options, "synthetic2d-cls")
    return load_synthetic2d(seed=seed, val_fraction=val_fraction, task="classification", **options)


def _cache_dir() -> Path:
    root = os.environ.get("NORMLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "normlab"
    )
    return Path(root)


def load_mnist1d(*, seed: int, val_fraction: float) -> DataBundle:
    """``mnist1d``: MNIST-1D (Greydanus 2020), 4000 + 1000 signals of 40 steps, 10 classes.

    Generated procedurally by the ``mnist1d`` package with its default arguments (no download:
    its ``get_dataset`` would fetch a file, ``make_dataset`` builds it); the package's own test
    split is the validation set. Generation takes seconds, so the arrays are cached under
    ``$NORMLAB_CACHE`` (default ``~/.cache/normlab``). Harder than digits: the pilots show the
    normalization methods separate on it.
    """
    cache = _cache_dir() / "mnist1d-default.npz"
    if cache.is_file():
        with np.load(cache) as z:
            arrays = {k: z[k] for k in z.files}
    else:
        try:
            import matplotlib

            matplotlib.use("Agg")  # mnist1d imports pyplot at import time
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError as exc:
            raise ValueError(
                "mnist1d: the built-in MNIST-1D data needs the 'mnist1d' package (pip install 'normlab[lab]')"
            ) from exc
        state = np.random.get_state()  # make_dataset reseeds numpy's global generator
        try:
            made = make_dataset(get_dataset_args())
        finally:
            np.random.set_state(state)
        arrays = {k: np.asarray(made[k]) for k in ("x", "y", "x_test", "y_test")}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cache)  # atomic: parallel workers never read a half-written file
    x, xv = (torch.from_numpy(arrays[k].astype(np.float32))[:, :, None] for k in ("x", "x_test"))
    return _bundle(
        x,
        torch.from_numpy(arrays["y"].astype(np.int64)),
        xv,
        torch.from_numpy(arrays["y_test"].astype(np.int64)),
        kind="sequence",
        name="mnist1d",
        num_classes=10,
    )


# --------------------------------------------------------------------------------------------
# chars: a character-level language-modelling corpus that ships with Python itself
# --------------------------------------------------------------------------------------------
#: The standard-library modules whose source, in this order, is the ``chars`` corpus. Pure-Python
#: modules of long standing (their files change rarely between releases); every interpreter has
#: them, so the corpus needs no download. The text's SHA-256 is in :data:`CHARS_SHA256`.
CHARS_MODULES: tuple[str, ...] = (
    "textwrap", "argparse", "difflib", "calendar", "shlex", "fnmatch", "heapq", "bisect",
    "colorsys", "string", "cmd", "glob", "fractions", "statistics", "dataclasses", "functools",
    "pprint", "csv", "configparser", "optparse", "getopt",
)
#: Vocabulary: the 128 ASCII codes (a character outside ASCII becomes ``"?"``), fixed whatever
#: the text, so that two corpora give models of the same shape.
CHARS_VOCAB = 128
#: Characters per block of the contiguous split: every ``CHARS_VAL_EVERY``-th block is validation.
CHARS_BLOCK = 1024
CHARS_VAL_EVERY = 10
#: Training characters of the named corpus sizes (the validation blocks are the same for all);
#: consecutive sizes differ by 8×, so that a cheap profile can compare tiny with small as the
#: full grid compares small with large, at the same number of passes over the smaller one.
CHARS_SIZES: dict[str, int] = {"tiny": 8 * 1024, "small": 64 * 1024, "large": 512 * 1024}
#: SHA-256 of the corpus text (UTF-8, before the ASCII mapping) on the Python versions it was
#: checked on. Another version may ship other files: the loader then warns, and the digest it
#: finds is part of every run's ``data_identity``, so runs on different texts never mix.
CHARS_SHA256: dict[str, str] = {
    "3.11": "de54e081c59902560ed321ba7ec483d0b00c6467a5493b43ccf75cee5d352d5e",  # 3.11.7
}


@dataclass(frozen=True)
class CharCorpus:
    """The ``chars`` corpus as token blocks.

    Attributes:
        train: int64 ``(n_train_blocks, CHARS_BLOCK)`` ASCII codes of the training blocks.
        val: int64 ``(n_val_blocks, CHARS_BLOCK)``, the validation blocks (the same for every size).
        sha256: SHA-256 of the whole source text (UTF-8).
        python: ``"major.minor.micro"`` of the interpreter whose standard library was read.
        size: the corpus size name (``"small"``, ``"large"``) or ``"all"``.
    """

    train: torch.Tensor
    val: torch.Tensor
    sha256: str
    python: str
    size: str

    @property
    def vocab_size(self) -> int:
        return CHARS_VOCAB

    @property
    def n_train_chars(self) -> int:
        return int(self.train.numel())


def _stdlib_source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    origin = getattr(spec, "origin", None)
    if spec is None or not origin or not origin.endswith(".py") or not os.path.isfile(origin):
        raise ValueError(
            f"chars: the standard-library module {module!r} has no .py source file here "
            f"(got {origin!r}); the chars corpus needs a Python installed with its sources"
        )
    with open(origin, encoding="utf-8") as fh:
        return fh.read()


@functools.lru_cache(maxsize=1)
def _chars_text() -> tuple[str, str]:
    """The corpus text (module sources, each headed by its name) and its SHA-256."""
    text = "".join(f"# ==== {m}.py ====\n{_stdlib_source(m)}\n" for m in CHARS_MODULES)
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def chars_sha256() -> str:
    """SHA-256 of the ``chars`` corpus text on this interpreter."""
    return _chars_text()[1]


def _python_version() -> str:
    import sys

    return ".".join(map(str, sys.version_info[:3]))


@functools.lru_cache(maxsize=4)
def char_corpus(size: str = "large") -> CharCorpus:
    """The ``chars`` corpus split into contiguous blocks of :data:`CHARS_BLOCK` characters.

    Block ``i`` is validation when ``i % CHARS_VAL_EVERY == CHARS_VAL_EVERY − 1``, training
    otherwise, so both parts sample every module. ``size`` picks ``CHARS_SIZES[size]`` training
    characters as blocks evenly spaced over the training blocks (``"all"``: every training
    block), so the small corpus has the same mix of modules as the large one. Deterministic: no
    random choice is made.
    """
    if size != "all" and size not in CHARS_SIZES:
        raise ValueError(f"size: expected one of {sorted(CHARS_SIZES) + ['all']}, got {size!r}")
    text, digest = _chars_text()
    version = _python_version()
    known = CHARS_SHA256.get(".".join(version.split(".")[:2]))
    if known is not None and known != digest:
        import warnings

        warnings.warn(
            f"chars: the standard-library text on Python {version} has SHA-256 {digest[:12]}…, "
            f"not the {known[:12]}… it was checked with: results are not comparable across them",
            stacklevel=2,
        )
    codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
    n_blocks = len(codes) // CHARS_BLOCK
    blocks = torch.from_numpy(codes[: n_blocks * CHARS_BLOCK].astype(np.int64)).reshape(n_blocks, CHARS_BLOCK)
    is_val = torch.arange(n_blocks) % CHARS_VAL_EVERY == CHARS_VAL_EVERY - 1
    train, val = blocks[~is_val], blocks[is_val]
    if size != "all":
        want = CHARS_SIZES[size] // CHARS_BLOCK
        if want > len(train):
            raise ValueError(
                f"size: {size!r} needs {want} training blocks, the corpus has {len(train)}"
            )
        train = train[(torch.arange(want) * len(train)) // want]
    return CharCorpus(train.clone(), val.clone(), digest, version, size)


def load_chars(*, seed: int, val_fraction: float, size: str = "large", context: int = 64) -> DataBundle:
    """``chars``: next-character prediction on the :func:`char_corpus` (a classification view).

    Each sample is a window of ``context`` characters (inputs ``(context, 1)``, the ASCII codes
    as float32) and its label the character that follows (128 classes). Windows do not overlap
    and never cross a block boundary. The split is the corpus's (fixed: ``seed`` and
    ``val_fraction`` are not used). A language model trained on every position uses
    :func:`char_corpus` directly (:mod:`normlab.lab.lm`).
    """
    check_positive_int(context, "context")
    if context + 1 > CHARS_BLOCK:
        raise ValueError(f"context: expected at most {CHARS_BLOCK - 1}, got {context}")
    corpus = char_corpus(size)

    def windows(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per = CHARS_BLOCK // (context + 1)
        w = blocks[:, : per * (context + 1)].reshape(-1, context + 1)
        return w[:, :context, None].to(torch.float32), w[:, context].clone()

    x_tr, y_tr = windows(corpus.train)
    x_va, y_va = windows(corpus.val)
    return _bundle(x_tr, y_tr, x_va, y_va, kind="sequence", name=f"chars-{size}", num_classes=CHARS_VOCAB)


#: Prototype seed of ``tiles4`` (fixed: the classes are the same for every ``seed``).
TILES4_PROTOTYPE_SEED = 20260
TILES4_SIZE = 4


@functools.lru_cache(maxsize=4)
def _tiles4_prototypes(num_classes: int) -> np.ndarray:
    """The ``tiles4`` class prototypes: ``(num_classes, 4, 4)`` binary patterns of 8 lit pixels.

    Drawn once from a fixed seed, rejecting a pattern closer than Hamming distance 6 to an
    earlier one, or to any earlier one's cyclic shift by one pixel, so that no two classes can be
    confused by shifting.
    """
    check_int(num_classes, "num_classes", low=2)
    rng = np.random.default_rng(TILES4_PROTOTYPE_SEED)
    n = TILES4_SIZE * TILES4_SIZE
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    chosen: list[np.ndarray] = []
    for _ in range(100_000):
        if len(chosen) == num_classes:
            break
        p = np.zeros(n)
        p[rng.choice(n, n // 2, replace=False)] = 1.0
        p = p.reshape(TILES4_SIZE, TILES4_SIZE)
        if all(np.abs(np.roll(q, s, (0, 1)) - p).sum() >= 6 for q in chosen for s in shifts):
            chosen.append(p)
    if len(chosen) < num_classes:
        raise ValueError(f"num_classes: at most {len(chosen)} separable 4x4 prototypes, got {num_classes}")
    return np.stack(chosen).astype(np.float32)


def tiles4_prototypes(num_classes: int = 10) -> np.ndarray:
    """The ``tiles4`` class prototypes (a copy; see :func:`_tiles4_prototypes`)."""
    return _tiles4_prototypes(num_classes).copy()


def load_tiles4(
    *,
    seed: int,
    val_fraction: float,
    n_train: int = 4000,
    n_val: int = 1000,
    noise: float = 0.3,
    num_classes: int = 10,
) -> DataBundle:
    r"""``tiles4``: a procedural 4×4 image task on which a CNN's BatchNorm statistics starve.

    Sample of class ``k``: ``x = g · roll(P_k, (dy, dx)) + o + noise · ε`` with ``P_k`` the class
    prototype (:func:`tiles4_prototypes`), a cyclic shift ``dy, dx ∈ {-1, 0, 1}``, gain
    ``g ~ U(0.5, 1.5)``, offset ``o ~ U(-0.5, 0.5)`` and ``ε`` standard normal per pixel; images
    ``(1, 4, 4)``. Every class has exactly ``n / num_classes`` samples in each split (``n_train``
    and ``n_val`` must be multiples of ``num_classes``). Draws use ``seed``; the prototypes do not.

    Why it exists: the lab's CNN pools after its second block, so on 4×4 input its last conv
    layer's BN statistic pools ``N · 2 · 2`` values: 8 at batch size 2, fewer than the ~16 below
    which batch statistics become unusable (digits' 8×8 images give 32). The shifts make it a
    translation task a linear model solves only partly; ``val_fraction`` is unused (the
    validation part is drawn separately).
    """
    check_positive_int(n_train, "n_train")
    check_positive_int(n_val, "n_val")
    for name, n in (("n_train", n_train), ("n_val", n_val)):
        if n % num_classes:
            raise ValueError(f"{name}: expected a multiple of num_classes ({num_classes}), got {n}")
    if not (isinstance(noise, (int, float)) and math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise: expected a finite standard deviation >= 0, got {noise!r}")
    protos = tiles4_prototypes(num_classes)
    rng = np.random.default_rng([seed, TILES4_PROTOTYPE_SEED])
    parts = []
    for n in (n_train, n_val):
        y = rng.permutation(np.arange(n) % num_classes)
        x = protos[y]
        dy, dx = rng.integers(-1, 2, n), rng.integers(-1, 2, n)
        x = np.stack([np.roll(img, (a, b), (0, 1)) for img, a, b in zip(x, dy, dx)])
        gain = rng.uniform(0.5, 1.5, (n, 1, 1))
        offset = rng.uniform(-0.5, 0.5, (n, 1, 1))
        x = gain * x + offset + noise * rng.standard_normal(x.shape)
        parts.append((torch.from_numpy(x[:, None].astype(np.float32)), torch.from_numpy(y.astype(np.int64))))
    (x_tr, y_tr), (x_va, y_va) = parts
    return _bundle(x_tr, y_tr, x_va, y_va, kind="image", name="tiles4", num_classes=num_classes)


Loader = Callable[..., DataBundle]
_REGISTRY: dict[str, Loader] = {
    "mnist1d": load_mnist1d,
    "chars": load_chars,
    "digits": load_digits_images,
    "digits-rows": load_digits_rows,
    "digits-pixels": load_digits_pixels,
    "digits-pixels-permuted": load_digits_pixels_permuted,
    "synthetic2d": load_synthetic2d,
    "synthetic2d-cls": load_synthetic2d_cls,
    "tiles4": load_tiles4,
}


def register_dataset(name: str, loader: Loader, *, overwrite: bool = False) -> None:
    """Register ``loader(*, seed, val_fraction, **options) -> DataBundle`` under ``name``.

    Raises:
        TypeError: ``loader`` is not callable.
        ValueError: empty name, a name with ``:``, ``/`` or ``,`` (those mean paths and
            ``module:function``), or an existing name without ``overwrite=True``.
    """
    if not isinstance(name, str) or not name or any(ch in name for ch in ":/,\\"):
        raise ValueError(f"name: expected a non-empty name without ':', '/', ',', got {name!r}")
    if not callable(loader):
        raise TypeError(f"loader: expected a callable, got {type(loader).__name__}")
    add_entry(_REGISTRY, name, loader, kind="data set", overwrite=overwrite)


def dataset_names() -> list[str]:
    """Names of the registered (built-in) data sets."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------
# .npz
# --------------------------------------------------------------------------------------------
def _npz_get(arrays: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray | None:
    for key in names:
        if key in arrays:
            return arrays[key]
    return None


def _npz_inputs(x: np.ndarray, kind: str | None, where: str) -> tuple[torch.Tensor, str]:
    if x.ndim < 2:
        raise ValueError(f"{where}: inputs must have a sample axis and features, got shape {x.shape}")
    if kind == "image" and x.ndim == 3:
        x = x[:, None]  # (N, H, W) -> one-channel images
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[-1] < x.shape[1]:
        x = np.moveaxis(x, -1, 1)  # channels-last (N, H, W, C) -> (N, C, H, W)
    inferred = _infer_kind(x.shape[1:], where)
    if kind is not None and kind != inferred:
        raise ValueError(
            f"kind: {where} has samples of shape {x.shape[1:]}, which cannot be {kind!r} data"
        )
    return _as_inputs(x), inferred


def _load_npz(
    path: Path,
    *,
    seed: int,
    val_fraction: float,
    kind: str | None = None,
    task: str | None = None,
    num_classes: int | None = None,
) -> DataBundle:
    import zipfile

    where = str(path)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
    if task is not None and task not in ("classification", "regression"):
        raise ValueError(f"task: expected 'classification' or 'regression', got {task!r}")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04" and magic != b"PK\x05\x06":
        raise ValueError(f"{where}: not a readable .npz archive (expected a zip file of .npy arrays)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for k in npz.files:
                try:
                    arrays[k] = npz[k]
                except ValueError as exc:
                    if "pickle" not in str(exc):
                        raise
                    # NumPy's message would suggest allow_pickle=True, which runs code.
                    raise ValueError(
                        f"{where}: array {k!r} holds Python objects; normlab loads only numeric "
                        "arrays (save it with a numeric dtype)"
                    ) from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{where}: not a readable .npz archive ({exc})") from exc
    except ValueError as exc:
        if str(exc).startswith(where):
            raise
        raise ValueError(f"{where}: not a readable .npz archive ({exc})") from exc
    for key, arr in arrays.items():
        _check_values(arr, where, key)

    x_tr = _npz_get(arrays, ("x_train", "X_train"))
    y_tr = _npz_get(arrays, ("y_train",))
    x_va = _npz_get(arrays, ("x_val", "X_val", "x_test", "X_test"))
    y_va = _npz_get(arrays, ("y_val", "y_test"))
    x_all = _npz_get(arrays, ("x", "X"))
    y_all = _npz_get(arrays, ("y",))
    explicit = all(a is not None for a in (x_tr, y_tr, x_va, y_va))
    if not explicit and (x_all is None or y_all is None):
        raise ValueError(
            f"{where}: expected arrays 'x' and 'y' (or 'x_train', 'y_train', 'x_val', 'y_val'), "
            f"found {sorted(arrays)}"
        )
    y_ref = np.concatenate([y_tr, y_va]) if explicit else y_all
    if task is None:
        task = "classification" if _is_integral(y_ref) else "regression"
    name = f"npz:{path.name}"

    if not explicit:
        if len(x_all) != len(y_all):
            raise ValueError(f"{where}: 'x' has {len(x_all)} samples but 'y' has {len(y_all)}")
        x, inferred = _npz_inputs(x_all, kind, where)
        return _from_arrays(
            x,
            y_all,
            task=task,
            kind=inferred,
            name=name,
            seed=seed,
            val_fraction=val_fraction,
            num_classes=num_classes,
        )
    xt, inferred = _npz_inputs(x_tr, kind, where)
    xv, _ = _npz_inputs(x_va, kind, where)
    yt, yv = _labels(y_tr, task, where), _labels(y_va, task, where)
    if task == "classification" and num_classes is None:
        num_classes = _infer_num_classes(where, yt, yv)
    return _bundle(
        xt, yt, xv, yv, kind=inferred, name=name, num_classes=num_classes if task == "classification" else 0
    )


# --------------------------------------------------------------------------------------------
# MNIST idx files
# --------------------------------------------------------------------------------------------
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (N, H, W)
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (N,)


def read_idx(path: str | Path, *, expected_magic: int | None = None) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not.

    Header: a big-endian magic number ``0x0000TTDD`` (``TT`` the data type, ``DD`` the number of
    dimensions), then ``DD`` big-endian int32 sizes, then the data in row-major order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: bad magic number, unknown type code, truncated or oversized data; the
            message names the file.
    """
    path = Path(path)
    name = path.name
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such idx file") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{name}: cannot read ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{name}: truncated header ({len(raw)} bytes, expected at least 4)")
    (magic,) = struct.unpack(">I", raw[:4])
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{name}: bad magic number 0x{magic:08X} (expected 0x{expected_magic:08X})")
    if magic >> 16 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{name}: bad magic number 0x{magic:08X} (expected 0x0000TTDD with type TT in "
            f"{[hex(t) for t in _IDX_DTYPES]} and DD >= 1 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: truncated header ({len(raw)} bytes, expected {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[type_code]
    expected = math.prod(dims) * dtype.itemsize  # Python ints: huge headers cannot overflow
    found = len(raw) - header
    if found != expected:
        raise ValueError(
            f"{path}: expected {expected} bytes of data for shape {tuple(dims)}, found {found}"
            + (" (truncated)" if found < expected else "")
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, split: str, what: str) -> Path | None:
    idx = "idx3" if what == "images" else "idx1"
    for sep in ("-", "."):
        for gz in ("", ".gz"):
            candidate = root / f"{split}-{what}{sep}{idx}-ubyte{gz}"
            if candidate.is_file():
                return candidate
    return None


def _idx_pair(images: Path, labels: Path) -> tuple[torch.Tensor, np.ndarray]:
    x = read_idx(images, expected_magic=IDX_IMAGES_MAGIC)
    y = read_idx(labels, expected_magic=IDX_LABELS_MAGIC)
    if len(x) != len(y):
        raise ValueError(f"{images.name}: {len(x)} images but {labels.name} has {len(y)} labels")
    return _as_inputs(x[:, None]), y.astype(np.int64)  # (N, 1, H, W) in [0, 1]


def _companion_labels(images: Path) -> Path:
    name = images.name.replace("images", "labels").replace("idx3", "idx1")
    labels = images.with_name(name)
    if name == images.name or not labels.is_file():
        raise FileNotFoundError(
            f"{images}: no labels file next to it (looked for {labels.name}); pass 'IMAGES,LABELS'"
        )
    return labels


def _load_mnist(
    images: Path,
    labels: Path,
    *,
    seed: int,
    val_fraction: float,
    val_images: Path | None = None,
    val_labels: Path | None = None,
    num_classes: int | None = None,
) -> DataBundle:
    x, y = _idx_pair(images, labels)
    name = f"idx:{images.parent.name or images.name}"
    if val_images is None or val_labels is None:
        return _from_arrays(
            x, y, task="classification", kind="image", name=name, seed=seed,
            val_fraction=val_fraction, num_classes=num_classes,
        )
    xv, yv = _idx_pair(val_images, val_labels)
    yt, yvt = _labels(y, "classification", images.name), _labels(yv, "classification", val_labels.name)
    if num_classes is None:
        num_classes = _infer_num_classes(str(images), yt, yvt)
    return _bundle(x, yt, xv, yvt, kind="image", name=name, num_classes=num_classes)


def _load_mnist_dir(root: Path, **kw: Any) -> DataBundle:
    images, labels = _find_idx(root, "train", "images"), _find_idx(root, "train", "labels")
    if images is None or labels is None:
        missing = "train-images-idx3-ubyte" if images is None else "train-labels-idx1-ubyte"
        raise FileNotFoundError(f"{root}: missing {missing}[.gz]")
    val_images, val_labels = _find_idx(root, "t10k", "images"), _find_idx(root, "t10k", "labels")
    if (val_images is None) != (val_labels is None):
        missing = "t10k-images-idx3-ubyte" if val_images is None else "t10k-labels-idx1-ubyte"
        raise FileNotFoundError(f"{root}: has only half of the test pair, missing {missing}[.gz]")
    return _load_mnist(images, labels, val_images=val_images, val_labels=val_labels, **kw)


# --------------------------------------------------------------------------------------------
# CIFAR python batches
# --------------------------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only builtin containers and NumPy arrays (data, never code).

    A pickle names the callables that rebuild its objects (``GLOBAL``/``STACK_GLOBAL``), and the
    plain unpickler imports and calls whatever it names: a crafted file runs arbitrary code.
    Here every global is looked up in :data:`SAFE_GLOBALS` (NumPy's array reconstruction, dtype
    and scalar constructors, ``collections.OrderedDict``) and anything else is refused.
    """

    SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("collections", "OrderedDict"),
            ("builtins", "bytearray"),
        }
    )

    def __init__(self, file: Any, where: str) -> None:
        super().__init__(file, encoding="bytes")
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 spells a bytes object
            return _latin1_encode
        if (module, name) not in self.SAFE_GLOBALS:
            raise _ForbiddenGlobal(
                f"{self._where}: refusing to unpickle the global {module}.{name}: a CIFAR batch "
                "holds only dicts, lists, bytes and NumPy arrays (this file would run code)"
            )
        return super().find_class(module, name)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it (latin-1 only)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin-1")


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle names a callable outside :attr:`_ArrayUnpickler.SAFE_GLOBALS`."""


def _unpickle(path: Path) -> dict[bytes, Any]:
    """Read a CIFAR python batch with :class:`_ArrayUnpickler` (never plain ``pickle.load``)."""
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, str(path)).load()
    except _ForbiddenGlobal as exc:
        raise ValueError(str(exc)) from None
    except Exception as exc:  # pickle raises many types for malformed input
        raise ValueError(f"{path}: not a CIFAR python batch (unpickling failed: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path.name}: expected a pickled dict, got {type(obj).__name__}")
    # Files pickled by Python 3 have str keys: use bytes keys throughout.
    return {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if b"data" not in batch or label_key not in batch:
        raise ValueError(
            f"{path.name}: expected keys b'data' and {label_key!r}, found {sorted(batch)}"
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path.name}: b'data' must have shape (N, 3072), got {data.shape}")
    if len(data) != len(labels):
        raise ValueError(f"{path.name}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels  # rows are 1024 R, 1024 G, 1024 B values


def _is_cifar_dir(root: Path) -> bool:
    return (root / "data_batch_1").is_file() or ((root / "train").is_file() and (root / "test").is_file())


def _load_cifar(root: Path, *, seed: int, val_fraction: float, coarse: bool = False) -> DataBundle:
    if (root / "data_batch_1").is_file():
        train_files = sorted(root.glob("data_batch_*"), key=lambda p: p.name)
        val_file, label_key, num_classes, name = root / "test_batch", b"labels", 10, "cifar10"
        if coarse:
            raise ValueError(f"coarse: only CIFAR-100 has coarse labels, {root} holds CIFAR-10")
    else:
        train_files, val_file = [root / "train"], root / "test"
        label_key = b"coarse_labels" if coarse else b"fine_labels"
        num_classes, name = (20, "cifar100-coarse") if coarse else (100, "cifar100")
    parts = [_cifar_batch(p, label_key) for p in train_files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    if not val_file.is_file():
        return _from_arrays(
            _as_inputs(x), y, task="classification", kind="image", name=name, seed=seed,
            val_fraction=val_fraction, num_classes=num_classes,
        )
    xv, yv = _cifar_batch(val_file, label_key)
    return _bundle(
        _as_inputs(x),
        _labels(y, "classification", train_files[0].name),
        _as_inputs(xv),
        _labels(yv, "classification", val_file.name),
        kind="image",
        name=name,
        num_classes=num_classes,
    )


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_dirs(root: Path) -> list[Path]:
    dirs = (p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return sorted(dirs, key=lambda p: p.name)


def _is_image_folder(root: Path) -> bool:
    return any(_image_files(d) for d in _class_dirs(root)) or any(
        (root / s).is_dir() and _is_image_folder(root / s) for s in ("train",)
    )


def _read_images(
    files: list[Path], channels: int | None, size: tuple[int, int] | None
) -> tuple[list[Any], int, tuple[int, int]]:
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
                images.append(img.copy())
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise ValueError(f"{path}: not a readable image ({exc})") from exc
    if channels is None:
        gray = all(img.mode in ("1", "L", "LA", "I", "I;16", "F") for img in images)
        channels = 1 if gray else 3
    if size is None:
        sizes = {img.size for img in images}
        if len(sizes) > 1:
            (w1, h1), (w2, h2) = sorted(sizes)[:2]
            raise ValueError(
                f"image_size: images differ in size ({h1}x{w1} and {h2}x{w2}, H x W); pass "
                "image_size=(H, W) to resize them"
            )
        w, h = sizes.pop()
        size = (h, w)
    return images, channels, size


def _to_array(img: Any, channels: int, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _collect_classes(root: Path) -> tuple[list[str], list[Path], list[int]]:
    classes = [d.name for d in _class_dirs(root)]
    files: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        found = _image_files(root / name)
        if not found:
            raise ValueError(f"{root / name}: class folder has no image files ({sorted(IMAGE_SUFFIXES)})")
        files += found
        labels += [i] * len(found)
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder of images per class, found none")
    return classes, files, labels


def _load_image_folder(
    root: Path,
    *,
    seed: int,
    val_fraction: float,
    image_size: int | Sequence[int] | None = None,
    channels: int | None = None,
) -> DataBundle:
    if channels not in (None, 1, 3):
        raise ValueError(f"channels: expected 1, 3 or None (detect), got {channels!r}")
    size: tuple[int, int] | None
    if image_size is None:
        size = None
    elif isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    else:
        try:
            h, w = (int(v) for v in image_size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"image_size: expected an int or (H, W), got {image_size!r}") from None
        size = (h, w)
    if size is not None and min(size) < 1:
        raise ValueError(f"image_size: sizes must be >= 1, got {image_size!r}")

    val_root = next((root / s for s in ("val", "valid", "test") if (root / s).is_dir()), None)
    split_dirs = (root / "train").is_dir() and val_root is not None
    train_root = root / "train" if split_dirs else root
    classes, files, labels = _collect_classes(train_root)
    val_files: list[Path] = []
    val_labels: list[int] = []
    if split_dirs:
        assert val_root is not None
        for d in _class_dirs(val_root):
            if d.name not in classes:
                raise ValueError(f"{d}: class {d.name!r} does not exist in {train_root}")
            found = _image_files(d)
            val_files += found
            val_labels += [classes.index(d.name)] * len(found)
    images, channels, size = _read_images(files + val_files, channels, size)
    x = torch.from_numpy(np.stack([_to_array(img, channels, size) for img in images]))
    name = f"images:{root.name}"
    if not split_dirs:
        bundle = _from_arrays(
            x, np.asarray(labels, dtype=np.int64), task="classification", kind="image", name=name,
            seed=seed, val_fraction=val_fraction, num_classes=len(classes),
        )
        bundle.classes = tuple(classes)
        return bundle
    n = len(files)
    return _bundle(
        x[:n],
        torch.tensor(labels, dtype=torch.int64),
        x[n:],
        torch.tensor(val_labels, dtype=torch.int64),
        kind="image",
        name=name,
        num_classes=len(classes),
        classes=classes,
    )


# --------------------------------------------------------------------------------------------
# module:function
# --------------------------------------------------------------------------------------------
_MODULE_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _dataset_tensors(ds: Any, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        x, y = ds.tensors
        return x, y
    if not isinstance(ds, Dataset) and not hasattr(ds, "__getitem__"):
        raise TypeError(f"{where}: expected a torch Dataset, got {type(ds).__name__}")
    xs, ys = [], []
    for i in range(len(ds)):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"{where}: item {i} must be an (x, y) pair, got {type(item).__name__}")
        x = item[0]
        xs.append(x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)))
        ys.append(torch.as_tensor(item[1]))
    if not xs:
        raise ValueError(f"{where}: the dataset is empty")
    try:
        return torch.stack(xs), torch.stack(ys).reshape(-1)
    except RuntimeError as exc:
        raise ValueError(f"{where}: samples must all have the same shape ({exc})") from exc


def _load_function(
    spec: str,
    *,
    seed: int,
    val_fraction: float,
    kind: str | None = None,
    task: str | None = None,
    num_classes: int | None = None,
    **fn_options: Any,
) -> DataBundle:
    fn = import_object(spec, "data")
    result = fn(**fn_options)
    if isinstance(result, DataBundle):
        return result
    if isinstance(result, (tuple, list)) and len(result) == 2:
        (xt, yt), (xv, yv) = _dataset_tensors(result[0], spec), _dataset_tensors(result[1], spec)
        classes = getattr(result[0], "classes", None)
    else:
        xt, yt = _dataset_tensors(result, spec)
        xv = yv = None
        classes = getattr(result, "classes", None)
    y_all = yt if yv is None else torch.cat([yt, yv])
    if task is None:
        task = "regression" if y_all.is_floating_point() else "classification"
    if num_classes is None and classes is not None and task == "classification":
        num_classes = len(classes)
    xt = _as_inputs(xt)
    inferred = _infer_kind(tuple(xt.shape[1:]), spec)
    if kind is not None and kind != inferred:
        raise ValueError(f"kind: samples of shape {tuple(xt.shape[1:])} from {spec} cannot be {kind!r}")
    if xv is None:
        return _from_arrays(
            xt, yt.numpy(), task=task, kind=inferred, name=spec, seed=seed,
            val_fraction=val_fraction, num_classes=num_classes,
        )
    ytl, yvl = _labels(yt.numpy(), task, spec), _labels(yv.numpy(), task, spec)
    if task == "classification" and num_classes is None:
        num_classes = _infer_num_classes(spec, ytl, yvl)
    return _bundle(
        xt, ytl, _as_inputs(xv), yvl, kind=inferred, name=spec,
        num_classes=num_classes if task == "classification" else 0,
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def _check_options(fn: Callable[..., Any], options: dict[str, Any], spec: str) -> None:
    """Reject options the loader does not take, naming them and the accepted ones."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    accepted = [n for n in accepted if n not in ("seed", "val_fraction")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"options: {unknown} not accepted for data {spec!r}; accepted: "
            f"{sorted(accepted) + ['limit', 'val_limit']}"
        )


def _resolve(spec: str) -> tuple[Callable[..., DataBundle], str]:
    """The loader for ``spec`` and a label for messages."""
    if spec in _REGISTRY:
        return _REGISTRY[spec], spec
    if "," in spec:
        images, labels = (Path(p.strip()).expanduser() for p in spec.split(",", 1))
        for p in (images, labels):
            if not p.is_file():
                raise FileNotFoundError(f"data: idx file {p} does not exist")

        def idx_pair(*, seed: int, val_fraction: float, num_classes: int | None = None) -> DataBundle:
            return _load_mnist(images, labels, seed=seed, val_fraction=val_fraction, num_classes=num_classes)

        return idx_pair, spec
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix == ".npz":
            return functools.partial(_load_npz, path), spec
        if "idx3" in path.name:
            labels = _companion_labels(path)

            def idx_file(
                *, seed: int, val_fraction: float, num_classes: int | None = None
            ) -> DataBundle:
                return _load_mnist(
                    path, labels, seed=seed, val_fraction=val_fraction, num_classes=num_classes
                )

            return idx_file, spec
        raise ValueError(
            f"data: {path} is not a supported file (expected a .npz archive or an "
            "'...-images-idx3-ubyte[.gz]' file)"
        )
    if path.is_dir():
        if _find_idx(path, "train", "images") or _find_idx(path, "train", "labels"):

            def idx_dir(*, seed: int, val_fraction: float, num_classes: int | None = None) -> DataBundle:
                return _load_mnist_dir(path, seed=seed, val_fraction=val_fraction, num_classes=num_classes)

            return idx_dir, spec
        if _is_cifar_dir(path):

            def cifar(*, seed: int, val_fraction: float, coarse: bool = False) -> DataBundle:
                return _load_cifar(path, seed=seed, val_fraction=val_fraction, coarse=coarse)

            return cifar, spec
        if _is_image_folder(path):

            def folder(
                *,
                seed: int,
                val_fraction: float,
                image_size: int | Sequence[int] | None = None,
                channels: int | None = None,
            ) -> DataBundle:
                return _load_image_folder(
                    path, seed=seed, val_fraction=val_fraction, image_size=image_size, channels=channels
                )

            return folder, spec
        raise ValueError(
            f"data: directory {path} holds no recognised data set: expected MNIST idx files "
            "(train-images-idx3-ubyte...), CIFAR python batches (data_batch_1... or train/test) "
            "or one sub-folder of images per class"
        )
    if _MODULE_FUNCTION.match(spec):
        return (lambda **kw: _load_function(spec, **kw)), spec  # noqa: E731
    if "/" in spec or "\\" in spec or spec.endswith((".npz", ".gz", "-ubyte")):
        raise FileNotFoundError(f"data: {spec} does not exist")
    raise ValueError(
        f"data: unknown data set {spec!r}; expected one of {dataset_names()}, a path (.npz, MNIST "
        "idx files, CIFAR batches directory, image folder) or 'package.module:function'"
    )


def load_dataset(
    spec: str, *, seed: int = 0, val_fraction: float = 0.2, **options: Any
) -> DataBundle:
    """Load the data set named by ``spec`` (see the module docstring for specs and options).

    Args:
        spec: a built-in name, a path, or ``"package.module:function"``.
        seed: seed of every random choice the data makes (synthetic draws, the split of user
            data that comes without a validation part). Built-in digits ignore it.
        val_fraction: fraction of samples held out when the source has no validation part.
        **options: loader options, plus ``limit``/``val_limit`` (max train/val samples).

    Raises:
        TypeError: ``spec`` is not a str.
        ValueError: unknown spec or option, malformed file (the message names it).
        FileNotFoundError: a path that does not exist, or a missing companion file.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"data: expected a non-empty str spec, got {spec!r}")
    is_number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not is_number or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    limit = options.pop("limit", None)
    val_limit = options.pop("val_limit", None)
    spec = spec.strip()
    loader, label = _resolve(spec)
    _check_options(loader, options, label)
    bundle = loader(seed=seed, val_fraction=float(val_fraction), **options)
    if not isinstance(bundle, DataBundle):
        raise TypeError(f"data: loader for {label!r} returned {type(bundle).__name__}, expected DataBundle")
    classification = bundle.num_classes > 0
    bundle.train = _limit(bundle.train, limit, classification, "limit")
    bundle.val = _limit(bundle.val, val_limit, classification, "val_limit")
    return bundle


# --------------------------------------------------------------------------------------------
# Content identity (part of every run's config, so changed data means new runs)
# --------------------------------------------------------------------------------------------
#: Version of each built-in data set's generator: bump it when a loader's output changes.
BUILTIN_VERSIONS: dict[str, int] = {}
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> tuple[int, str]:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    digest = _FILE_HASHES.get(key)
    if digest is None:
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digest = _FILE_HASHES[key] = h.hexdigest()
    return st.st_size, digest


def _files_identity(files: Sequence[Path], root: Path | None) -> dict[str, Any]:
    h = hashlib.sha256()
    total = 0
    for f in files:
        size, digest = _file_sha256(f)
        total += size
        rel = f.relative_to(root).as_posix() if root is not None else f.name
        h.update(f"{rel}\0{size}\0{digest}\n".encode())
    return {"files": len(files), "size": total, "sha256": h.hexdigest()}


def data_identity(spec: str) -> dict[str, Any] | None:
    """What the data named by ``spec`` *is*, for run ids: content for files, version for built-ins.

    * a file or ``IMAGES,LABELS`` pair: number of files, total size and a SHA-256 over the files'
      SHA-256 digests; a directory: the same over every file below it (hidden ones excepted);
    * a built-in data set: its name and generator version (``mnist1d``: the package's version);
    * ``module:function``: the spec and the SHA-256 of the module's source file, when found.

    ``None`` when ``spec`` names nothing loadable (loading it will report the error).
    """
    if not isinstance(spec, str) or not spec.strip():
        return None
    spec = spec.strip()
    if spec in _REGISTRY:
        ident: dict[str, Any] = {"builtin": spec, "version": BUILTIN_VERSIONS.get(spec, 1)}
        if spec == "chars":
            # the text read from this interpreter's standard library: another text, other runs
            with contextlib.suppress(ValueError):
                ident["sha256"] = chars_sha256()
        if spec == "mnist1d":
            try:
                from importlib.metadata import version

                ident["mnist1d"] = version("mnist1d")
            except Exception:  # not installed: loading reports it
                pass
        return ident
    if "," in spec:
        files = [Path(p.strip()).expanduser() for p in spec.split(",", 1)]
        if all(f.is_file() for f in files):
            return _files_identity(files, None)
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
        if "idx3" in path.name:
            with contextlib.suppress(FileNotFoundError):
                files.append(_companion_labels(path))
        return _files_identity(files, None)
    if path.is_dir():
        files = sorted(
            (f for f in path.rglob("*") if f.is_file()
             and not any(part.startswith(".") for part in f.relative_to(path).parts)),
            key=lambda f: f.relative_to(path).as_posix(),
        )
        return _files_identity(files, path)
    if _MODULE_FUNCTION.match(spec):
        ident = {"function": spec}
        try:
            found = importlib.util.find_spec(spec.partition(":")[0])
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin and os.path.isfile(found.origin):
            ident["source_sha256"] = _file_sha256(Path(found.origin))[1]
        return ident
    return None
