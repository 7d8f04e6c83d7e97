"""Placement of a run on devices: a Mesh with axes ("runs", "data").

Runs (seeds) are split over the "runs" axis; the training datapoints
over the "data" axis, each device scoring its slice of every model and the
per-datapoint scores gathered (M floats per model). Parameters are replicated over
"data". The same code runs on one device, many devices of one host, and, after
`jax.distributed.initialize()`, the devices of many processes (`jax.devices()` is then
global). Every process then runs the same program on its own devices, so a mesh must
hold devices of every process, and values leave the devices gathered to every process.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

AXES = ("runs", "data")


def default_mesh(num_runs: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Runs over as many devices as there are runs (the largest divisor of the device
    count not above R); the remaining factor shares the datapoints."""
    devices = list(jax.devices() if devices is None else devices)
    runs = runs_axis_size(num_runs, len(devices))
    return Mesh(np.array(devices).reshape(runs, len(devices) // runs), AXES)


def runs_axis_size(num_runs: int, num_devices: int) -> int:
    """The largest divisor of `num_devices` that is at most `num_runs`."""
    return max(d for d in range(1, num_devices + 1) if num_devices % d == 0 and d <= num_runs)


def check_mesh(mesh: Mesh) -> Mesh:
    """The mesh with Auto axes; ValueError unless its axes are AXES and it holds
    devices of every process (a process without one would wait forever in the
    others' collectives, or fail on arrays it cannot read)."""
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with axes {AXES}, e.g. "
                         f"jax.make_mesh((runs, data), {AXES}); got {mesh!r}")
    present = sorted({d.process_index for d in mesh.devices.flat})
    if len(present) != jax.process_count():
        raise ValueError(f"mesh holds devices of process(es) {present} only, but {jax.process_count()} processes run "
                         "this program: build the mesh over the global jax.devices(), not jax.local_devices()")
    # jax.make_mesh gives Explicit axes by default, under which shard_map refuses the
    # runner's unplaced inputs; the runner places its arrays itself (Auto axes).
    return Mesh(mesh.devices, AXES)


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
