"""Datasets as arrays: official raw files offline, tensorflow-datasets, or MNIST-1D generated locally.

``load_dataset(name, data_dir=..., source=...)`` returns images ``[N, H, W, C]`` (uint8; MNIST-1D:
float32 ``[N, 40, 1]``) and int32 labels for the train and test splits. Sources:

* ``"raw"`` — the official files: MNIST/Fashion-MNIST IDX (``.gz`` or not), CIFAR-10
  ``cifar-10-python.tar.gz``, its extracted ``cifar-10-batches-py/``, or ``cifar-10-batches-bin/``.
  Counts come from the headers. CIFAR pickles go through a restricted unpickler.
* ``"tfds"`` — a dataset prepared by tensorflow-datasets in ``data_dir``, read with
  ``tfds.data_source`` (no TensorFlow needed to read; preparing needs it).
* ``"generate"`` — MNIST-1D from the ``mnist1d`` package.
* ``"auto"`` — the above in that order, looking only on local disk: it never waits on a network.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import Callable

import numpy as np


class DataError(RuntimeError):
    """A dataset could not be found or read; the message says where and what to do."""


@dataclass(frozen=True)
class RawFormat:
    """A dataset's official file format: ``find(folder)`` says where in a folder its files are (or ``None``),
    ``read(location)`` gives ``(train, test)``; ``files`` names them for the message when none are found."""
    files: str
    find: Callable
    read: Callable


@dataclass(frozen=True)
class DatasetInfo:
    input_shape: tuple
    num_classes: int
    mean: tuple  # per channel, of pixel / 255 (or of the raw values for float data)
    std: tuple
    raw: RawFormat | None = None  # the official files' format (source "raw")
    search: tuple = ()  # extra folders searched by "auto" besides --data-dir and the cache
    subfolders: tuple = ()  # subfolders of each searched folder that may hold the files (torchvision's layout)
    generate: Callable | None = None  # a dataset made locally: generate() -> (train, test) (source "generate")
    base: str | None = None  # a dataset read from another one's files, its labels `derive(images, labels)`
    derive: Callable | None = None
    per_pixel: bool = False  # labels [N, *spatial]: one class per position
    classes: tuple = tuple(str(d) for d in range(10))  # the name of each class index
    pixels: bool = True  # uint8 pixels (normalised from x / 255); False: float values used as they are


def segment_digits(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-pixel labels for digit images: 0 where a pixel is background (< 128), else 1 + the digit.
    ``[N, H, W, 1]`` uint8 and ``[N]`` -> ``[N, H, W]`` int32: semantic segmentation with 11 classes."""
    return np.where(images[..., 0] >= 128, labels[:, None, None] + 1, 0).astype(np.int32)


SOURCES = ("auto", "raw", "tfds", "generate")


@dataclass
class Split:
    images: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train rows, validation rows)`` of ``n`` examples: ``round(fraction * n)`` drawn by ``seed`` are held
    out; both lists are in increasing order. ``ValueError`` when either part would be empty."""
    n_val = int(round(fraction * n))
    if not 1 <= n_val < n:
        raise ValueError(f"--val-split {fraction} of {n} training examples leaves {n_val} for validation and "
                         f"{n - n_val} for training; both need at least one")
    held = np.zeros(n, bool)
    held[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def split_validation(split: "Split", fraction: float, seed: int) -> tuple["Split", "Split"]:
    """``(train, validation)`` as :func:`split_indices` draws them; both keep the original order."""
    train, held = split_indices(len(split), fraction, seed)
    return Split(split.images[train], split.labels[train]), Split(split.images[held], split.labels[held])


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    source: str

    @property
    def info(self) -> DatasetInfo:
        return DATASETS[self.name]


def cache_dir() -> str:
    return os.environ.get("JAXCONV_DATA", os.path.join(os.path.expanduser("~"), ".cache", "jaxconv"))


# --------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str, *, expect_ndim: int) -> np.ndarray:
    """Parse an IDX file (gzip or plain): magic ``00 00 08 ndim``, big-endian int32 dims, uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"read_idx: cannot read {path}: {err} (a corrupt or truncated download? fetch it again)")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"read_idx: {path} is not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise DataError(f"read_idx: {path} has data type 0x{raw[2]:02x}; only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    if ndim != expect_ndim:
        raise DataError(f"read_idx: {path} has {ndim} dimensions in its header, expected {expect_ndim} "
                        f"(magic 0x{raw[:4].hex()}; images are 0x00000803, labels 0x00000801)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"read_idx: {path} is truncated inside its header")
    dims = tuple(int(v) for v in np.frombuffer(raw[4:header], ">i4"))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"read_idx: {path} holds {len(raw) - header} data bytes but its header {dims} "
                        f"promises {expected} (truncated or corrupt file)")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find(folder: str, stem: str):
    for candidate in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        path = os.path.join(folder, candidate)
        if os.path.exists(path):
            return path
    return None


def _idx_folder(folder: str):
    stems = [s for pair in _IDX_FILES.values() for s in pair]
    return all(_find(folder, s) for s in stems)


def load_idx_dataset(folder: str) -> tuple[Split, Split]:
    splits = []
    for split in ("train", "test"):
        img_stem, lbl_stem = _IDX_FILES[split]
        images = read_idx(_find(folder, img_stem), expect_ndim=3)
        labels = read_idx(_find(folder, lbl_stem), expect_ndim=1)
        if len(images) != len(labels):
            raise DataError(f"load_idx_dataset: {folder}: {split} has {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise DataError(f"load_idx_dataset: {folder}: {split} labels reach {labels.max()}, expected 0..9")
        splits.append(Split(images[..., None].copy(), labels.astype(np.int32)))
    return tuple(splits)


# --------------------------------------------------------------------------- CIFAR-10

class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only plain containers, bytes and NumPy arrays: a pickle from the internet can run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"CIFAR-10 pickle wants to load {module}.{name}, which a data file never needs; refused")


def _cifar_batch(blob: bytes, where: str) -> Split:
    try:
        batch = _RestrictedUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except DataError:
        raise
    except Exception as err:  # truncated or not a pickle at all
        raise DataError(f"cannot read CIFAR-10 batch {where}: {err}")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"CIFAR-10 batch {where} lacks b'data'/b'labels'")
    data = np.asarray(batch[b"data"], np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"CIFAR-10 batch {where}: data has shape {data.shape}, expected [N, 3072]")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return Split(np.ascontiguousarray(images), np.asarray(batch[b"labels"], np.int32))


def _concat(splits):
    return Split(np.concatenate([s.images for s in splits]), np.concatenate([s.labels for s in splits]))


_CIFAR_NAMES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def load_cifar10_raw(path: str) -> tuple[Split, Split]:
    """From ``cifar-10-batches-py/``, ``cifar-10-python.tar.gz`` or ``cifar-10-batches-bin/``."""
    if path.endswith((".tar.gz", ".tgz")):
        try:
            with tarfile.open(path) as tar:
                blobs = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                read = lambda n: tar.extractfile(blobs[n]).read()
                missing = [n for names in _CIFAR_NAMES.values() for n in names if n not in blobs]
                if missing:
                    raise DataError(f"{path} lacks {', '.join(missing)}")
                return tuple(_concat([_cifar_batch(read(n), f"{path}:{n}") for n in _CIFAR_NAMES[s]])
                             for s in ("train", "test"))
        except (tarfile.TarError, OSError, EOFError) as err:
            reason = " ".join(str(err).split())  # tarfile's reasons span lines; the message is one
            raise DataError(f"cannot read {path}: {reason} (a corrupt or truncated archive?)")
    if os.path.basename(path.rstrip("/")) == "cifar-10-batches-bin":
        out = []
        for split, names in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
            parts = []
            for n in names:
                raw = np.fromfile(os.path.join(path, n), np.uint8)
                if raw.size % 3073:
                    raise DataError(f"{os.path.join(path, n)}: {raw.size} bytes is not a whole number of 3073-byte records")
                rec = raw.reshape(-1, 3073)
                parts.append(Split(np.ascontiguousarray(rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)),
                                   rec[:, 0].astype(np.int32)))
            out.append(_concat(parts))
        return tuple(out)
    splits = []
    for split in ("train", "test"):
        batches = []
        for n in _CIFAR_NAMES[split]:
            with open(os.path.join(path, n), "rb") as f:
                batches.append(_cifar_batch(f.read(), os.path.join(path, n)))
        splits.append(_concat(batches))
    return tuple(splits)


def _cifar_location(folder: str):
    for name in ("cifar-10-batches-py", "cifar-10-batches-bin"):
        candidate = os.path.join(folder, name)
        if os.path.isdir(candidate):
            return candidate
    if os.path.basename(folder.rstrip("/")) in ("cifar-10-batches-py", "cifar-10-batches-bin") and os.path.isdir(folder):
        return folder
    archive = os.path.join(folder, "cifar-10-python.tar.gz")
    return archive if os.path.exists(archive) else None


# --------------------------------------------------------------------------- MNIST-1D

def generate_mnist1d(cache: str | None = None) -> tuple[Split, Split]:
    """MNIST-1D with the package's default arguments (4,000 train / 1,000 test, length 40), cached."""
    path = os.path.join(cache or cache_dir(), "mnist1d.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as z:
                return Split(z["x"], z["y"]), Split(z["x_test"], z["y_test"])
        except Exception as err:  # a truncated or foreign file: it is only a cache, made again below
            import warnings
            warnings.warn(f"mnist1d: the cache {path} is unreadable ({type(err).__name__}: {err}); generating "
                          f"the dataset again and replacing it")
    try:
        import mnist1d.data
    except ImportError as err:
        raise DataError("mnist1d: the `mnist1d` package is missing: pip install mnist1d") from err
    raw = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    arrays = {k: np.asarray(raw[k], np.float32)[..., None] if k.startswith("x") else np.asarray(raw[k], np.int32)
              for k in ("x", "y", "x_test", "y_test")}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp", "wb") as f:  # a kill mid-write must not leave a torn cache
            np.savez(f, **arrays)
        os.replace(f"{path}.tmp", path)
    except OSError:
        pass  # a read-only home only costs the 2 s of regeneration next time
    return Split(arrays["x"], arrays["y"]), Split(arrays["x_test"], arrays["y_test"])


# --------------------------------------------------------------------------- tensorflow-datasets

def _tfds_prepared(name: str, data_dir: str | None) -> bool:
    root = data_dir or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    return os.path.isdir(os.path.join(root, name))


def load_tfds(name: str, data_dir: str | None) -> tuple[Split, Split]:
    """Read a prepared tensorflow-datasets copy with ``tfds.data_source`` (random access, no TensorFlow)."""
    import tensorflow_datasets as tfds
    try:
        sources = {s: tfds.data_source(name, split=s, data_dir=data_dir, download=False) for s in ("train", "test")}
    except Exception as err:
        try:
            import tensorflow  # noqa: F401
            hint = f"prepare it once with `python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}').download_and_prepare()\"`"
        except ImportError:
            hint = "preparing it needs TensorFlow: pip install 'jaxconv[tfds]'"
        raise DataError(f"tensorflow-datasets has no prepared {name} in {data_dir or '~/tensorflow_datasets'} "
                        f"({type(err).__name__}); {hint}, or give the official files with --data-dir") from err
    splits = []
    for s in ("train", "test"):
        source = sources[s]
        examples = [source[i] for i in range(len(source))]
        images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
        splits.append(Split(images, np.asarray([e["label"] for e in examples], np.int32)))
    return tuple(splits)


# --------------------------------------------------------------------------- the datasets

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IDX = RawFormat("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                "t10k-labels-idx1-ubyte.gz", lambda folder: folder if _idx_folder(folder) else None, load_idx_dataset)
CIFAR10 = RawFormat("cifar-10-python.tar.gz, cifar-10-batches-py/ or cifar-10-batches-bin/", _cifar_location,
                    load_cifar10_raw)
DATASETS = {
    "mnist": DatasetInfo((28, 28, 1), 10, (0.1307,), (0.3081,), IDX, subfolders=("MNIST", "MNIST/raw")),
    "fashion_mnist": DatasetInfo((28, 28, 1), 10, (0.2860,), (0.3530,), IDX, ("/usr/share/datasets/fashion-mnist",),
                                 subfolders=("FashionMNIST", "FashionMNIST/raw"), classes=FASHION_CLASSES),
    "cifar10": DatasetInfo((32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), CIFAR10,
                           classes=CIFAR10_CLASSES),
    "mnist1d": DatasetInfo((40, 1), 10, (0.0,), (1.0,), generate=lambda: generate_mnist1d(), pixels=False),
    # MNIST's files, each pixel labelled background or its digit (segment_digits)
    "mnist_seg": DatasetInfo((28, 28, 1), 11, (0.1307,), (0.3081,), base="mnist", derive=segment_digits,
                             per_pixel=True, classes=("background",) + tuple(str(d) for d in range(10))),
}

# --------------------------------------------------------------------------- entry point

def _raw_candidates(name: str, data_dir: str | None):
    info = DATASETS[name]
    roots = [data_dir] if data_dir else []
    roots += [os.path.join(cache_dir(), name)] + list(info.search)
    subs = ("", name, name.upper()) + info.subfolders  # the folder itself, a per-dataset subfolder, torchvision's
    return list(dict.fromkeys(os.path.join(root, sub) if sub else root for root in roots for sub in subs))


def _load_raw(name: str, data_dir: str | None):
    raw = DATASETS[name].raw
    for folder in _raw_candidates(name, data_dir):
        location = raw.find(folder) if os.path.isdir(folder) else None
        if location:
            return raw.read(location), location
    return None, None


def _not_found(name: str, data_dir: str | None) -> DataError:
    looked = ", ".join(_raw_candidates(name, data_dir))
    return DataError(
        f"no {name} data on this machine (nothing is downloaded). Looked for {DATASETS[name].raw.files} in: {looked}; "
        f"and for a prepared tensorflow-datasets copy in {data_dir or '~/tensorflow_datasets'}. "
        f"Put the official files in a folder and pass --data-dir FOLDER, or use --source tfds with a prepared copy."
    )


def load_dataset(name: str, *, data_dir: str | None = None, source: str = "auto") -> Dataset:
    """Load both splits of ``name`` (see the module docstring for the sources)."""
    if name not in DATASETS:
        raise ValueError(f"load_dataset: unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    if source not in SOURCES:
        raise ValueError(f"load_dataset: unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"load_dataset: --data-dir {data_dir} does not exist or is not a folder")
    info = DATASETS[name]
    if info.base is not None:
        data = load_dataset(info.base, data_dir=data_dir, source=source)
        splits = [Split(s.images, info.derive(s.images, s.labels)) for s in (data.train, data.test)]
        return Dataset(name, *splits, f"{data.source}, labels by {info.derive.__name__}")
    if info.generate is not None:
        if source not in ("auto", "generate"):
            raise ValueError(f"load_dataset: {name} is generated locally; source {source!r} does not apply")
        return Dataset(name, *info.generate(), f"generated by the {name} package")
    if source == "generate":
        made = [d for d, i in DATASETS.items() if i.generate is not None]
        raise ValueError(f"load_dataset: only {', '.join(made)} can be generated; {name} needs source 'raw' or 'tfds'")
    if source in ("auto", "raw"):
        splits, location = _load_raw(name, data_dir)
        if splits:
            return Dataset(name, *splits, f"raw files in {location}")
        if source == "raw":
            raise _not_found(name, data_dir)
    if source == "tfds" or _tfds_prepared(name, data_dir):
        return Dataset(name, *load_tfds(name, data_dir), "tensorflow-datasets")
    raise _not_found(name, data_dir)
