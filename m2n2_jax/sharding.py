"""Placement of a run on devices: a Mesh with axes ("runs", "data", "model").

Runs (seeds) are split over the "runs" axis; the training datapoints over the "data"
axis, each device scoring its slice of every model and the per-datapoint scores
gathered (M floats per model). The "model" axis (size 1 unless asked for) splits every
model's leaves: the archive, the seeds, the parents, the child, the mutation noise and
the model a user's `score_fn` receives are sharded over it, and XLA partitions the
step (GSPMD): the slerp's reductions become global sums. `runs` and `data` are manual
axes (`shard_map`), `model` automatic. The same code runs on one device, many devices
of one host, and, after `jax.distributed.initialize()`, the devices of many processes
(`jax.devices()` is then global). Every process then runs the same program on its own
devices, so a mesh must hold devices of every process, and values leave the devices
gathered to every process.

Where even a sharded archive does not fit, `run(archive_memory="pinned_host")` keeps
the models of the state's `Archive` in host memory: a step brings the two parents to
the device (`on_device`, in `archive.get`), and writes the child back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("runs", "data", "model")
MEMORY_KINDS = ("device", "pinned_host")


def default_mesh(num_runs: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Runs over as many devices as there are runs (the largest divisor of the device
    count not above R); the remaining factor shares the datapoints; model axis 1."""
    devices = list(jax.devices() if devices is None else devices)
    runs = runs_axis_size(num_runs, len(devices))
    return Mesh(np.array(devices).reshape(runs, len(devices) // runs, 1), AXES)


def runs_axis_size(num_runs: int, num_devices: int) -> int:
    """The largest divisor of `num_devices` that is at most `num_runs`."""
    return max(d for d in range(1, num_devices + 1) if num_devices % d == 0 and d <= num_runs)


def check_mesh(mesh: Mesh) -> Mesh:
    """The mesh with axes AXES (a ("runs", "data") mesh gets a model axis of 1) and
    Auto axis types; ValueError unless it holds devices of every process (a process
    without one would wait forever in the others' collectives, or fail on arrays it
    cannot read)."""
    names = tuple(getattr(mesh, "axis_names", ()))
    if not isinstance(mesh, Mesh) or names not in (AXES, AXES[:2]):
        raise ValueError(f"mesh must be a jax.sharding.Mesh with axes {AXES} or {AXES[:2]}, e.g. "
                         f"jax.make_mesh((runs, data, model), {AXES}); got {mesh!r}")
    present = sorted({d.process_index for d in mesh.devices.flat})
    if len(present) != jax.process_count():
        raise ValueError(f"mesh holds devices of process(es) {present} only, but {jax.process_count()} processes run "
                         "this program: build the mesh over the global jax.devices(), not jax.local_devices()")
    # jax.make_mesh gives Explicit axes by default, under which shard_map refuses the
    # runner's unplaced inputs; the runner places its arrays itself (Auto axes).
    devices = mesh.devices if names == AXES else mesh.devices[..., None]
    return Mesh(devices, AXES)


def check_archive_memory(kind: str) -> None:
    """ValueError unless `kind` is one of MEMORY_KINDS (where an archive may live)."""
    if kind not in MEMORY_KINDS:
        raise ValueError(f"archive_memory must be one of {MEMORY_KINDS}, got {kind!r}")


def model_specs(model, size: int):
    """The default rule: a leaf of rank >= 2 is split over "model" on its largest
    dimension, other than the last, that `size` divides (the first of equal ones);
    vectors, scalars and leaves with no such dimension are replicated (biases and
    norms are small). Not the last dimension: in the (out, in) layout of Hugging Face
    checkpoints that splits a layer's outputs and keeps its inputs whole, so a matmul
    needs no sum of partial products across devices. A pytree of PartitionSpec over
    each leaf's own dimensions, like `model`."""

    def spec(leaf):
        shape = tuple(np.shape(leaf))
        dims = [i for i, n in enumerate(shape[:-1]) if n % size == 0 and n >= size]
        if size == 1 or not dims:
            return PartitionSpec()
        dim = max(dims, key=lambda i: (shape[i], -i))
        return PartitionSpec(*(["model" if i == dim else None for i in range(len(shape))]))

    return jax.tree.map(spec, model)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a run's models live (static, hashable: a compiled program depends on it).

    Any subtree of a state, of params or of seeds with the model's structure whose
    leaves end in the model's leaf shapes is a (stacked) model: its leaves are split
    over "model" by `specs`. Everything else is replicated over "model".
    """

    mesh: Mesh
    treedef: object
    shapes: tuple
    specs: tuple

    @classmethod
    def of(cls, mesh: Mesh, model, specs=None) -> Placement:
        """The placement of `model` (one model, unstacked) on `mesh`; `specs` a pytree
        of PartitionSpec like `model` (default `model_specs`)."""
        size = mesh.shape["model"]
        specs = model_specs(model, size) if specs is None else specs
        leaves, treedef = jax.tree.flatten(model)
        spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        if len(spec_leaves) != len(leaves) or not all(isinstance(s, PartitionSpec) for s in spec_leaves):
            raise ValueError(f"model_specs must be a PartitionSpec for each of the model's {len(leaves)} leaves")
        for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(model)[0], spec_leaves):
            name = jax.tree_util.keystr(path)
            if len(spec) > np.ndim(leaf) or any(a not in (None, "model") for a in spec):
                raise ValueError(f"model_specs{name}: {spec} must name only 'model' (or None) over the "
                                 f"{np.ndim(leaf)} dimensions of the leaf")
            for n, axis in zip(np.shape(leaf), spec):
                if axis == "model" and n % size:
                    raise ValueError(f"model_specs{name}: dimension {n} of {np.shape(leaf)} is not divisible "
                                     f"by the model axis ({size})")
        return cls(mesh, treedef, tuple(tuple(np.shape(x)) for x in leaves), tuple(spec_leaves))

    @property
    def sharded(self) -> bool:
        """Whether the model axis splits anything (else every program is as without it)."""
        return self.mesh.shape["model"] > 1

    def _stacked(self, tree) -> list:
        """(leaf, spec of the trailing model dimensions or None) for each leaf of `tree`
        in `jax.tree.leaves` order; the spec is padded to the model leaf's rank."""

        def is_model(x):
            return jax.tree.structure(x) == self.treedef and all(
                np.ndim(a) >= len(s) and tuple(np.shape(a))[np.ndim(a) - len(s):] == s
                for a, s in zip(jax.tree.leaves(x), self.shapes))

        out = []
        for node in jax.tree.leaves(tree, is_leaf=is_model):
            if is_model(node):
                out += [(leaf, tuple(spec) + (None,) * (len(shape) - len(spec)))
                        for leaf, spec, shape in zip(jax.tree.leaves(node), self.specs, self.shapes)]
            else:
                out.append((node, None))
        return out

    def _spec(self, leaf, spec, lead: tuple) -> PartitionSpec:
        """`lead` on the leading dimensions, `spec` (if any) on the trailing ones."""
        ndim, tail = np.ndim(leaf), (() if spec is None else spec)
        head = (tuple(lead) + (None,) * ndim)[: ndim - len(tail)]
        return PartitionSpec(*head, *tail)

    def shardings(self, tree, lead: tuple = ()):
        """NamedShardings for `tree` (arrays or shapes): the axes `lead` on every leaf's
        leading dimensions, a model leaf's spec on a stacked model's trailing ones."""
        out = [NamedSharding(self.mesh, self._spec(leaf, spec, lead)) for leaf, spec in self._stacked(tree)]
        return jax.tree.unflatten(jax.tree.structure(tree), out)

    def constrain(self, tree):
        """Inside the runner's shard_map: stacked models split over "model" (a no-op
        without a model axis)."""
        if not self.sharded:
            return tree
        out = [leaf if spec is None else jax.lax.with_sharding_constraint(leaf, self._spec(leaf, spec, ()))
               for leaf, spec in self._stacked(tree)]
        return jax.tree.unflatten(jax.tree.structure(tree), out)


def on_device(tree):
    """`tree` with every leaf held in host memory (an archive kept there) brought to
    device memory; other leaves as they are. Inside jit."""
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device) if is_on_host(x) else x, tree)


def is_on_host(x) -> bool:
    """Whether a traced value lives in host memory (`jax.memory.Space.Host`)."""
    return getattr(jax.typeof(x), "memory_space", None) == jax.memory.Space.Host


def pad_points(data, multiple: int):
    """Pad every leaf's leading (datapoint) axis to a multiple of `multiple` by
    repeating the last datapoint; the padded scores are dropped after the gather."""
    def pad(x):
        extra = -x.shape[0] % multiple
        if extra == 0:
            return x
        x = np.asarray(x)
        return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])
    return None if data is None else jax.tree.map(pad, data)


def to_host(x) -> np.ndarray:
    """A NumPy copy of a possibly multi-process array (gathered from every process)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def from_process_0(flag: bool) -> bool:
    """Process 0's value of a host-side decision (e.g. a time limit read on its own
    clock), in every process: they must all leave a loop of collectives together."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))
