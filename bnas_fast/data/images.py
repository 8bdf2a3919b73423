"""Small image datasets, offline: Fashion-MNIST from the Debian package, else scikit-learn's digits.

Fashion-MNIST comes from ``apt-get install dataset-fashion-mnist``, which installs the idx files
``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` in ``/usr/share/datasets/fashion-mnist``.
Debian re-gzipped them, so loaders that check upstream MD5 sums reject them; they are read here with
numpy and gzip (nothing is ever downloaded). When they are absent, :func:`load_images` falls back to
``sklearn.datasets.load_digits()`` (1797 8x8 digits shipped inside scikit-learn) and says so in
``Splits.source`` and in a warning.

Images are float32 [N, 1, H, W], normalised per channel to mean 0 and standard deviation 1 with the
statistics of the training images that are returned (appendix B of seed 000); targets int64 [N].
"""

from __future__ import annotations

import gzip
import os
import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from bnas_fast.data.common import Splits

__all__ = [
    "FASHION_MNIST_DIR",
    "read_idx",
    "fashion_mnist_available",
    "load_fashion_mnist",
    "load_digits",
    "load_images",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (gzipped when the name ends in ``.gz``) into a uint8 array.

    Format: a big-endian int32 magic ``0x000008nn`` (two zero bytes, the type code 0x08 = unsigned
    byte, then the number of dimensions nn), nn big-endian int32 sizes, then the data.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise ValueError(f"read_idx: {path} is too short to be an idx file ({len(data)} bytes)")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or type_code != _IDX_UBYTE:
        raise ValueError(
            f"read_idx: {path} does not start with an unsigned-byte idx magic 0x000008nn "
            f"(got 0x{int.from_bytes(data[:4], 'big'):08x})"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"read_idx: {path} ends inside its header ({ndim} dimensions announced)")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape)) if shape else 1
    if len(data) - header != expected:
        raise ValueError(
            f"read_idx: {path} holds {len(data) - header} data bytes but its header announces shape {shape} "
            f"({expected} bytes)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


def fashion_mnist_available(root: str = FASHION_MNIST_DIR) -> bool:
    return all(_find(root, stem) is not None for stem in _FASHION_FILES.values())


def _check_size(name: str, value: Optional[int]) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be None (all) or a positive int, got {value!r}")


def _subset(
    x: np.ndarray, y: np.ndarray, size: Optional[int], rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    """A uniformly random subset of ``size`` examples (all of them, in order, when size is None)."""
    if size is None or size >= len(y):
        return x, y
    idx = np.sort(rng.choice(len(y), size=size, replace=False))
    return x[idx], y[idx]


def _to_splits(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    source: str,
    normalize: bool,
) -> Splits:
    """uint8/float [N, H, W] images -> normalised float32 [N, 1, H, W] TensorDatasets."""
    xtr = torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)).unsqueeze(1)
    xte = torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)).unsqueeze(1)
    if normalize:
        # Per-channel statistics of the training images actually returned (appendix B).
        mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
        std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-12)
        xtr = (xtr - mean) / std
        xte = (xte - mean) / std
    return Splits(
        train=TensorDataset(xtr, torch.from_numpy(y_train.astype(np.int64))),
        test=TensorDataset(xte, torch.from_numpy(y_test.astype(np.int64))),
        source=source,
        num_classes=num_classes,
        input_shape=tuple(xtr.shape[1:]),
    )


def load_fashion_mnist(
    root: str = FASHION_MNIST_DIR,
    *,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    seed: int = 0,
    normalize: bool = True,
) -> Splits:
    """Fashion-MNIST (60,000 / 10,000 images of 28x28, 10 classes) from the idx files in ``root``.

    Args:
        root: directory with the four idx files (``.gz`` or not).
        n_train, n_test: random subsets of these sizes (drawn with ``numpy.random.default_rng(seed)``),
            for CPU budgets; None keeps everything.
        seed: seed of the subsets.
        normalize: per-channel mean 0 / std 1 with the training statistics.

    Raises:
        FileNotFoundError: naming the missing file and how to install it.
    """
    _check_size("n_train", n_train)
    _check_size("n_test", n_test)
    paths = {}
    for key, stem in _FASHION_FILES.items():
        path = _find(root, stem)
        if path is None:
            raise FileNotFoundError(
                f"load_fashion_mnist: {os.path.join(root, stem)}(.gz) not found; install the Debian package "
                "with `apt-get install dataset-fashion-mnist`, or use load_images(..., fallback=True) for "
                "sklearn digits"
            )
        paths[key] = path
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"load_fashion_mnist: {split} images {images.shape} and labels {labels.shape} do not match"
            )
    rng = np.random.default_rng(seed)
    x_train, y_train = _subset(arrays["train_images"], arrays["train_labels"], n_train, rng)
    x_test, y_test = _subset(arrays["test_images"], arrays["test_labels"], n_test, rng)
    return _to_splits(x_train, y_train, x_test, y_test, 10, f"fashion-mnist ({root})", normalize)


def load_digits(
    *,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    seed: int = 0,
    normalize: bool = True,
    test_fraction: float = 0.2,
) -> Splits:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), split once into train and test.

    The train/test partition is fixed (a permutation from ``default_rng(0)``; 1438 / 359 with the
    default ``test_fraction``) so that runs with different seeds are scored on the same test set;
    ``seed`` only draws the optional subsets.
    """
    _check_size("n_train", n_train)
    _check_size("n_test", n_test)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"load_digits: test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("load_digits needs scikit-learn: `pip install scikit-learn`") from exc
    bunch = sklearn_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # [1797, 8, 8], values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    n_test_all = int(round(test_fraction * len(labels)))
    test_idx, train_idx = order[:n_test_all], order[n_test_all:]
    rng = np.random.default_rng(seed)
    x_train, y_train = _subset(images[train_idx], labels[train_idx], n_train, rng)
    x_test, y_test = _subset(images[test_idx], labels[test_idx], n_test, rng)
    return _to_splits(x_train, y_train, x_test, y_test, 10, "sklearn-digits", normalize)


def load_images(
    name: str = "fashion",
    root: Optional[str] = None,
    *,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    seed: int = 0,
    normalize: bool = True,
    fallback: bool = True,
) -> Splits:
    """Load ``"fashion"`` (Fashion-MNIST) or ``"digits"`` (sklearn digits) as :class:`Splits`.

    ``"fashion"`` reads the idx files from ``root`` (default :data:`FASHION_MNIST_DIR`); when they are
    absent and ``fallback`` is true, it warns and returns sklearn digits instead
    (``source == "sklearn-digits"``); with ``fallback=False`` it raises FileNotFoundError.
    ``n_train``/``n_test`` take random subsets (seeded by ``seed``) for CPU budgets.
    """
    if name not in ("fashion", "digits"):
        raise ValueError(f"load_images: name must be 'fashion' or 'digits', got {name!r}")
    kwargs = dict(n_train=n_train, n_test=n_test, seed=seed, normalize=normalize)
    if name == "fashion":
        root = FASHION_MNIST_DIR if root is None else root
        if fashion_mnist_available(root) or not fallback:
            return load_fashion_mnist(root, **kwargs)
        warnings.warn(
            f"load_images: Fashion-MNIST idx files not found in {root} (install them with "
            "`apt-get install dataset-fashion-mnist`); using sklearn digits instead",
            RuntimeWarning,
            stacklevel=2,
        )
    return load_digits(**kwargs)
