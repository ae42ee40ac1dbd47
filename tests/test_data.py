"""Loaders on tiny real data (slices of ../shared/data) and tfds.testing.mock_data; nothing downloads."""
import gzip
import os
import pickle
import struct
import sys
import tarfile
import time
import warnings

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
    with pytest.raises(ValueError, match="^load_dataset: unknown dataset 'imagenet'; available: mnist, "
                                         "fashion_mnist, cifar10, mnist1d, mnist_seg$"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"^load_dataset: unknown source 'web'; expected one of auto, raw, tfds, "
                                         r"generate$"):
        load_dataset("mnist", source="web")
    with pytest.raises(ValueError, match="^load_dataset: only mnist1d can be generated; mnist needs source 'raw' "
                                         "or 'tfds'$"):
        load_dataset("mnist", source="generate")
    with pytest.raises(ValueError, match="^load_dataset: only mnist1d can be generated; mnist needs source 'raw' "):
        load_dataset("mnist_seg", source="generate")  # a derived dataset reads its base with the source given
    with pytest.raises(ValueError, match="^load_dataset: mnist1d is generated locally; source 'raw' does not apply$"):
        load_dataset("mnist1d", source="raw")


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


# ----------------------------------------------------------------- what each loader returns, exactly

def test_segment_digits_labels_every_pixel_by_a_direct_loop():
    from jaxconv.data import segment_digits
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 5, 4, 1)).astype(np.uint8)
    images[0, 0, 0, 0], images[0, 0, 1, 0] = 127, 128  # the threshold: 128 is foreground, 127 is not
    labels = np.array([0, 9, 4])
    out = segment_digits(images, labels)
    expected = np.zeros((3, 5, 4), np.int32)
    for n in range(3):
        for i in range(5):
            for j in range(4):
                expected[n, i, j] = labels[n] + 1 if images[n, i, j, 0] >= 128 else 0
    assert out.dtype == np.int32 and out[0, 0, 0] == 0 and out[0, 0, 1] == 1
    np.testing.assert_array_equal(out, expected)


@needs_mnist
def test_a_derived_dataset_keeps_the_images_labels_each_pixel_and_says_so(tmp_path):
    from jaxconv.data import segment_digits
    folder = real_mnist_slice(str(tmp_path / "m"), n_train=30, n_test=20)
    mnist, seg = load_dataset("mnist", data_dir=folder), load_dataset("mnist_seg", data_dir=folder, source="raw")
    assert (mnist.name, mnist.source) == ("mnist", f"raw files in {folder}")
    assert (seg.name, seg.source) == ("mnist_seg", f"raw files in {folder}, labels by segment_digits")
    for ours, theirs in ((seg.train, mnist.train), (seg.test, mnist.test)):
        np.testing.assert_array_equal(ours.images, theirs.images)
        np.testing.assert_array_equal(ours.labels, segment_digits(theirs.images, theirs.labels))
    os.makedirs(tmp_path / "nothing")
    with pytest.raises(DataError, match=f"Looked for .* in: {tmp_path / 'nothing'},"):
        load_dataset("mnist_seg", data_dir=str(tmp_path / "nothing"), source="raw")


def test_validation_split_is_disjoint_seeded_and_complete():
    from jaxconv.data import Split, split_indices, split_validation
    images = np.arange(100)[:, None, None] * np.ones((1, 4, 1))
    train, val = split_validation(Split(images, np.arange(100)), 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert sorted(np.concatenate([train.labels, val.labels]).tolist()) == list(range(100))
    np.testing.assert_array_equal(val.images[:, 0, 0], val.labels)  # images stay with their labels
    np.testing.assert_array_equal(train.images[:, 0, 0], train.labels)
    assert np.all(np.diff(train.labels) > 0) and np.all(np.diff(val.labels) > 0)  # the original order is kept
    # the held-out rows are the seed's permutation's first round(fraction * n), as documented
    np.testing.assert_array_equal(val.labels, np.sort(np.random.default_rng(3).permutation(100)[:20]))
    other = split_validation(Split(images, np.arange(100)), 0.2, seed=4)[1]
    assert set(other.labels) != set(val.labels)
    assert [len(part) for part in split_indices(10, 0.25, 0)] == [8, 2]  # round(2.5) = 2
    assert [len(part) for part in split_indices(10, 0.9, 0)] == [1, 9]
    assert [len(part) for part in split_indices(10, 0.1, 0)] == [9, 1]  # one row is enough either side
    with pytest.raises(ValueError, match=r"^--val-split 0.001 of 100 training examples leaves 0 for validation and "
                                         r"100 for training; both need at least one$"):
        split_validation(Split(images, np.arange(100)), 0.001, seed=0)
    with pytest.raises(ValueError, match="--val-split 0.99 of 10 training examples leaves 10 for validation and 0 "):
        split_indices(10, 0.99, 0)


@needs_mnist
@pytest.mark.parametrize("names", ["gz", "plain", "dotted_gz", "dotted"])
def test_idx_files_under_each_of_their_names_and_in_torchvision_folders(tmp_path, names):
    """``train-images-idx3-ubyte[.gz]`` or ``train-images.idx3-ubyte[.gz]``, in the folder, in ``MNIST/raw``."""
    folder = real_mnist_slice(str(tmp_path / "root" / "MNIST" / "raw"), n_train=12, n_test=8,
                              gz=names.endswith("gz"))
    if names.startswith("dotted"):
        for name in os.listdir(folder):
            os.rename(os.path.join(folder, name), os.path.join(folder, name.replace("-idx", ".idx")))
    data = load_dataset("mnist", data_dir=str(tmp_path / "root"))
    assert data.source == f"raw files in {folder}"
    images = read_idx(os.path.join(MNIST_DIR, "train-images-idx3-ubyte.gz"), expect_ndim=3)[:12]
    labels = read_idx(os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz"), expect_ndim=1)[:8]
    np.testing.assert_array_equal(data.train.images[..., 0], images)
    np.testing.assert_array_equal(data.test.labels, labels)
    assert data.train.images.shape == (12, 28, 28, 1) and data.test.labels.dtype == np.int32


def test_idx_sets_that_do_not_fit_together_are_refused(tmp_path):
    from jaxconv.data import load_idx_dataset
    images, labels = np.zeros((4, 2, 2), np.uint8), np.array([0, 1, 2, 3])
    for stem, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels[:3]),
                        ("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        write_idx(str(tmp_path / stem), array)
    with pytest.raises(DataError, match=f"^load_idx_dataset: {tmp_path}: train has 4 images but 3 labels$"):
        load_idx_dataset(str(tmp_path))
    write_idx(str(tmp_path / "train-labels-idx1-ubyte"), labels)
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.array([0, 10, 2, 3]))
    with pytest.raises(DataError, match=f"^load_idx_dataset: {tmp_path}: test labels reach 10, expected 0..9$"):
        load_idx_dataset(str(tmp_path))
    write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.array([0, 9, 2, 3]))
    train, test = load_idx_dataset(str(tmp_path))
    assert test.labels.tolist() == [0, 9, 2, 3] and train.images.shape == (4, 2, 2, 1)


def test_idx_header_errors_word_for_word(tmp_path):
    path = str(tmp_path / "f")
    for raw, message in [
        (b"", "is not an IDX file (bad magic number empty)"),
        (b"\x00\x00\x08", "is not an IDX file (bad magic number 000008)"),
        (b"\x00\x01\x08\x01\x00\x00\x00\x01\x05", "is not an IDX file (bad magic number 00010801)"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x05", "is not an IDX file (bad magic number 01000801)"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01\x05", "has data type 0x0d; only unsigned bytes (0x08) are supported"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01", "has 3 dimensions in its header, expected 1 (magic 0x00000803; "
                                              "images are 0x00000803, labels 0x00000801)"),
        (b"\x00\x00\x08\x01\x00\x00\x00", "is truncated inside its header"),
        (b"\x00\x00\x08\x01", "is truncated inside its header"),
    ]:
        with open(path, "wb") as f:
            f.write(raw)
        with pytest.raises(DataError) as err:
            read_idx(path, expect_ndim=1)
        assert str(err.value) == f"read_idx: {path} {message}"
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x00")  # a header alone: zero items, not an error
    assert read_idx(path, expect_ndim=1).shape == (0,)


def test_cifar_labels_images_and_order_of_every_format(tmp_path):
    """Batches 1..5 in order, then the test batch; the binary format's label byte and pixel planes."""
    folder = str(tmp_path / "cifar-10-batches-py")
    write_cifar(folder)
    data = load_dataset("cifar10", data_dir=folder)  # the batches folder itself as --data-dir
    assert (data.name, data.source) == ("cifar10", f"raw files in {folder}")
    batches = [cifar_batch(7, i) for i in range(6)]
    assert data.train.labels.tolist() == sum((b[b"labels"] for b in batches[:5]), [])
    assert data.test.labels.tolist() == batches[5][b"labels"] and data.test.labels.dtype == np.int32
    expected = np.stack([b[b"data"] for b in batches[:5]]).reshape(35, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(data.train.images, expected)
    assert data.train.images.dtype == np.uint8 and data.train.images.flags["C_CONTIGUOUS"]

    binary = tmp_path / "b" / "cifar-10-batches-bin"
    binary.mkdir(parents=True)
    rng = np.random.default_rng(1)
    records = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records[name] = rng.integers(0, 256, (2, 3073)).astype(np.uint8)
        records[name][:, 0] %= 10
        records[name].tofile(binary / name)
    from_bin = load_dataset("cifar10", data_dir=str(binary) + "/")
    test = records["test_batch.bin"]
    assert from_bin.test.labels.tolist() == test[:, 0].tolist() and from_bin.test.labels.dtype == np.int32
    np.testing.assert_array_equal(from_bin.test.images[1, :, :, 1].ravel(), test[1, 1 + 1024:1 + 2048])
    assert from_bin.train.labels.tolist() == np.concatenate(
        [records[f"data_batch_{i}.bin"][:, 0] for i in range(1, 6)]).tolist()
    with open(binary / "test_batch.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(DataError, match=f"^{binary / 'test_batch.bin'}: 6147 bytes is not a whole number of "
                                        f"3073-byte records$"):
        load_dataset("cifar10", data_dir=str(tmp_path / "b"))


def test_cifar_archives_and_batches_that_are_not_whole(tmp_path):
    folder = str(tmp_path / "cifar-10-batches-py")
    names = write_cifar(folder)
    archive = tmp_path / "a" / "cifar-10-python.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name in names[:-1]:  # no test_batch
            tar.add(os.path.join(folder, name), arcname=f"cifar-10-batches-py/{name}")
    from jaxconv.data import load_cifar10_raw
    with pytest.raises(DataError, match=f"^{archive} lacks test_batch$"):
        load_cifar10_raw(str(archive))
    archive.write_bytes(b"not a tar archive")
    with pytest.raises(DataError, match=f"^cannot read {archive}: file could not be opened successfully: "
                                        f"- method gz: .*\\(a corrupt or truncated archive\\?\\)$"):
        load_cifar10_raw(str(archive))
    where = f"CIFAR-10 batch {os.path.join(folder, 'data_batch_2')}"
    for batch, message in [({b"labels": [1]}, f"{where} lacks b'data'/b'labels'"),
                           ({b"data": np.zeros((1, 3072))}, f"{where} lacks b'data'/b'labels'"),
                           ([1, 2], f"{where} lacks b'data'/b'labels'"),
                           ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [1, 2]},
                            f"{where}: data has shape (2, 3071), expected [N, 3072]"),
                           ({b"data": np.zeros((2, 32, 96), np.uint8), b"labels": [1, 2]},
                            f"{where}: data has shape (2, 32, 96), expected [N, 3072]")]:
        with open(os.path.join(folder, "data_batch_2"), "wb") as f:
            pickle.dump(batch, f)
        with pytest.raises(DataError) as err:
            load_dataset("cifar10", data_dir=str(tmp_path))
        assert str(err.value) == message
    with open(os.path.join(folder, "data_batch_2"), "wb") as f:  # a Python 2 pickle: str keys read as bytes
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [4]}, f, protocol=2)
    with pytest.raises(DataError, match="lacks b'data'/b'labels'"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_where_a_missing_dataset_was_looked_for_word_for_word(tmp_path, monkeypatch):
    from jaxconv.data import cache_dir
    monkeypatch.delenv("JAXCONV_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == os.path.join(str(tmp_path), ".cache", "jaxconv")
    given = tmp_path / "given"
    given.mkdir()
    cache = os.path.join(str(tmp_path), ".cache", "jaxconv", "cifar10")
    looked = ", ".join([str(given), f"{given}/cifar10", f"{given}/CIFAR10", cache, f"{cache}/cifar10",
                        f"{cache}/CIFAR10"])
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", data_dir=str(given))
    assert str(err.value) == (
        "no cifar10 data on this machine (nothing is downloaded). Looked for cifar-10-python.tar.gz, "
        f"cifar-10-batches-py/ or cifar-10-batches-bin/ in: {looked}; and for a prepared tensorflow-datasets "
        f"copy in {given}. Put the official files in a folder and pass --data-dir FOLDER, or use --source tfds "
        "with a prepared copy.")
    with pytest.raises(DataError, match=r"in: .*\.cache/jaxconv/cifar10,.*tensorflow-datasets copy in "
                                        r"~/tensorflow_datasets\. "):
        load_dataset("cifar10", source="raw")
    os.makedirs(os.path.join(cache, "cifar-10-batches-py"))  # the cache is searched without --data-dir
    write_cifar(os.path.join(cache, "cifar-10-batches-py"))
    assert load_dataset("cifar10").source == f"raw files in {os.path.join(cache, 'cifar-10-batches-py')}"


def test_mnist1d_is_the_packages_dataset_and_its_cache_is_made_again_when_torn(tmp_path, monkeypatch):
    import mnist1d.data
    monkeypatch.setenv("JAXCONV_DATA", str(tmp_path))
    raw = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    for attempt in ("generated", "cached"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the cache is read as it is, not made again with a warning
            data = load_dataset("mnist1d", source="generate" if attempt == "cached" else "auto")
        assert (data.name, data.source) == ("mnist1d", "generated by the mnist1d package"), attempt
        for split, x, y in ((data.train, "x", "y"), (data.test, "x_test", "y_test")):
            np.testing.assert_array_equal(split.images[..., 0], np.asarray(raw[x], np.float32))
            np.testing.assert_array_equal(split.labels, raw[y])
            assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    (tmp_path / "mnist1d.npz").write_bytes(b"PK\x03\x04torn")  # a zip's first bytes, then nothing
    with pytest.warns(UserWarning, match=f"^mnist1d: the cache {tmp_path / 'mnist1d.npz'} is unreadable "
                                         r"\(BadZipFile: .*\); generating the dataset again and replacing it$"):
        again = load_dataset("mnist1d")
    np.testing.assert_array_equal(again.test.labels, raw["y_test"])
    with np.load(tmp_path / "mnist1d.npz") as z:  # replaced by a whole one
        np.testing.assert_array_equal(z["y"], raw["y"])
    os.remove(tmp_path / "mnist1d.npz")
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # the package missing
    with pytest.raises(DataError, match="^mnist1d: the `mnist1d` package is missing: pip install mnist1d$"):
        load_dataset("mnist1d")


def test_a_prepared_tfds_copy_is_found_without_asking_and_read_as_tfds_gives_it(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    monkeypatch.setenv("JAXCONV_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tensorflow_datasets" / "mnist").mkdir(parents=True)  # where tfds prepares mnist by default
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        data = load_dataset("mnist")  # no raw files anywhere: the prepared copy, without --source tfds
        direct = {s: tfds.data_source("mnist", split=s) for s in ("train", "test")}
        expected = {s: (np.stack([np.asarray(direct[s][i]["image"]) for i in range(6)]),
                        [int(direct[s][i]["label"]) for i in range(6)]) for s in ("train", "test")}
    assert (data.name, data.source) == ("mnist", "tensorflow-datasets")
    with pytest.raises(DataError, match="^no mnist data on this machine"):
        load_dataset("mnist", source="raw")  # raw means the official files, even with a prepared tfds copy
    for split, name in ((data.train, "train"), (data.test, "test")):
        np.testing.assert_array_equal(split.images, expected[name][0])
        assert split.labels.tolist() == expected[name][1] and split.images.dtype == np.uint8
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match=f"^tensorflow-datasets has no prepared mnist in {tmp_path / 'x'} "
                                        r"\(\w+Error\); "):
        load_dataset("mnist", source="tfds", data_dir=str(tmp_path / "x"))
