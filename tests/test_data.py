"""Loaders on tiny real data (slices of ../shared/data) and tfds.testing.mock_data; nothing downloads."""
import gzip
import os
import pickle
import struct
import tarfile
import time

import numpy as np
import pytest

from jaxconv.data import DataError, load_dataset, read_idx
from tests.conftest import SHARED_DATA

MNIST_DIR = os.path.join(SHARED_DATA, "mnist")
needs_mnist = pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason="../shared/data/mnist not present")


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def real_mnist_slice(folder, n_train=300, n_test=200, gz=True):
    """The first digits of the real MNIST files, written as official IDX files."""
    os.makedirs(folder, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = read_idx(os.path.join(MNIST_DIR, f"{split}-images-idx3-ubyte.gz"), expect_ndim=3)[:n]
        labels = read_idx(os.path.join(MNIST_DIR, f"{split}-labels-idx1-ubyte.gz"), expect_ndim=1)[:n]
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte{ext}"), images)
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte{ext}"), labels)
    return folder


@needs_mnist
def test_real_mnist_counts_come_from_the_header():
    data = load_dataset("mnist", data_dir=MNIST_DIR)
    assert len(data.train) == 10_000 and len(data.test) == 10_000  # not the 60,000 of the full set
    assert data.train.images.shape == (10_000, 28, 28, 1) and data.train.images.dtype == np.uint8
    assert data.train.labels.dtype == np.int32
    assert set(np.unique(data.test.labels)) == set(range(10))


@needs_mnist
@pytest.mark.parametrize("gz", [True, False])
def test_idx_slices_plain_and_gzip(tmp_path, gz):
    folder = real_mnist_slice(str(tmp_path / "m"), gz=gz)
    data = load_dataset("fashion_mnist", data_dir=folder)  # the same format serves Fashion-MNIST
    assert (len(data.train), len(data.test)) == (300, 200)
    assert data.train.images.max() == 255 and data.train.labels.max() <= 9


def test_idx_errors(tmp_path):
    good = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    path = str(tmp_path / "x-idx3-ubyte")
    write_idx(path, good)
    np.testing.assert_array_equal(read_idx(path, expect_ndim=3), good)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:-5])
    with pytest.raises(DataError, match=r"holds 13 data bytes but its header \(2, 3, 3\) promises 18 \(truncated"):
        read_idx(path, expect_ndim=3)
    with open(path, "wb") as f:
        f.write(b"\x12\x34\x08\x03" + raw[4:])
    with pytest.raises(DataError, match="is not an IDX file \\(bad magic number 12340803\\)"):
        read_idx(path, expect_ndim=3)
    with open(path, "wb") as f:
        f.write(raw)
    with pytest.raises(DataError, match="has 3 dimensions in its header, expected 1"):
        read_idx(path, expect_ndim=1)
    gz = str(tmp_path / "y-idx1-ubyte.gz")
    with open(gz, "wb") as f:
        f.write(gzip.compress(raw)[:20])
    with pytest.raises(DataError, match="cannot read .*y-idx1-ubyte.gz.*corrupt or truncated"):
        read_idx(gz, expect_ndim=1)


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"test", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"filenames": [b"x"] * n}


def write_cifar(folder):
    os.makedirs(folder, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(cifar_batch(7, i), f)
    return names


def test_cifar_python_folder_archive_and_binary(tmp_path):
    folder = str(tmp_path / "cifar-10-batches-py")
    write_cifar(folder)
    data = load_dataset("cifar10", data_dir=str(tmp_path))
    assert data.train.images.shape == (35, 32, 32, 3) and len(data.test) == 7
    # channel-first rows of 1024 values: red plane first
    raw = cifar_batch(7, 0)[b"data"]
    np.testing.assert_array_equal(data.train.images[0, :, :, 0].ravel(), raw[0, :1024])
    np.testing.assert_array_equal(data.train.images[0, :, :, 2].ravel(), raw[0, 2048:])

    archive_dir = tmp_path / "archived"
    archive_dir.mkdir()
    with tarfile.open(archive_dir / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_archive = load_dataset("cifar10", data_dir=str(archive_dir))
    np.testing.assert_array_equal(from_archive.train.images, data.train.images)

    binary = tmp_path / "bin" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.zeros((3, 3073), np.uint8)
        records[:, 0] = [1, 2, 3]
        records.tofile(binary / name)
    from_bin = load_dataset("cifar10", data_dir=str(tmp_path / "bin"))
    assert from_bin.train.labels.tolist()[:3] == [1, 2, 3] and len(from_bin.train) == 15


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder = str(tmp_path / "cifar-10-batches-py")
    write_cifar(folder)
    batch = cifar_batch(7, 0)
    batch[b"evil"] = _Evil()
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(DataError, match="wants to load posix.system.*refused"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_truncated_cifar_batch(tmp_path):
    folder = str(tmp_path / "cifar-10-batches-py")
    write_cifar(folder)
    path = os.path.join(folder, "test_batch")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cannot read CIFAR-10 batch .*test_batch"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_missing_data_fails_fast_and_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCONV_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_dataset("cifar10")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "nothing is downloaded" in message and "cifar-10-python.tar.gz" in message
    assert str(tmp_path / "cache" / "cifar10") in message and "--data-dir" in message
    with pytest.raises(DataError, match="--data-dir /nonexistent does not exist"):
        load_dataset("mnist", data_dir="/nonexistent")


def test_bad_names():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown source 'web'"):
        load_dataset("mnist", source="web")
    with pytest.raises(ValueError, match="only mnist1d can be generated"):
        load_dataset("mnist", source="generate")


def test_mnist1d_generated_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCONV_DATA", str(tmp_path))
    data = load_dataset("mnist1d")
    assert data.train.images.shape == (4000, 40, 1) and data.test.images.shape == (1000, 40, 1)
    assert data.train.images.dtype == np.float32 and set(np.unique(data.train.labels)) == set(range(10))
    assert (tmp_path / "mnist1d.npz").exists()
    again = load_dataset("mnist1d")
    np.testing.assert_array_equal(again.test.images, data.test.images)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_source_under_mock_data(name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        data = load_dataset(name, source="tfds")
    assert data.train.images.shape == (12, *shape) and data.train.images.dtype == np.uint8
    assert data.train.labels.dtype == np.int32 and data.source == "tensorflow-datasets"


def test_tfds_source_without_prepared_data_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="tensorflow-datasets has no prepared mnist in .*jaxconv\\[tfds\\]|prepare it once"):
        load_dataset("mnist", source="tfds", data_dir=str(tmp_path))
