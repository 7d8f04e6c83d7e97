"""Memory of a run before any weight is loaded: compile one call of `run`'s step from
abstract shapes and read XLA's per-device accounting.

    plan = mj.memory_plan(algorithm, score_fn, model_shapes, data_shapes, num_seeds=2,
                          mesh=jax.make_mesh((1, 1, 8), ("runs", "data", "model")))
    plan["argument_bytes"], plan["temp_bytes"], plan["host_bytes"]   # per device

The program is the one `run` compiles for its steps (`runner.lower_step`, the state
donated and updated in place) for the `Layout` that `run` would build from the same
arguments (`layout.lay_out`): the mesh, the model axis, the archive in
`archive_memory`. Nothing is allocated; compiling for devices this process does not
have is not possible, so plan for 8 GPUs on 8 devices of the same count (on a CPU:
`XLA_FLAGS=--xla_force_host_platform_device_count=8`). XLA's accounting differs
between backends (fusion, temporaries): a CPU plan is an estimate for a GPU.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from m2n2_jax.base import Algorithm
from m2n2_jax.layout import lay_out
from m2n2_jax.runner import lower_step


def memory_plan(
    algorithm: Algorithm,
    score_fn,
    model,
    data,
    *,
    num_seeds: int,
    params=None,
    num_runs: int = 1,
    mesh: Mesh | None = None,
    model_specs=None,
    archive_memory: str = "device",
    chunk_size: int | None = None,
    steps_per_call: int = 1,
) -> dict:
    """Per-device bytes of one compiled call of `steps_per_call` steps.

    Args:
      model: one model's leaves as `jax.ShapeDtypeStruct`s (or arrays; only shapes
        and dtypes are read), e.g. from a Hugging Face config.
      data: the training data's shapes (leading axis M), like `run`'s `data`.
      num_seeds: S, the seed models the state is built from (shared by the runs).
      mesh, model_specs, archive_memory, chunk_size: as `run` takes them (default
        mesh: `run`'s, `sharding.default_mesh(num_runs)`).

    Returns:
      {"argument_bytes": device memory of the arguments (the state, data, keys),
       "temp_bytes": XLA's temporaries (parents, child, activations),
       "host_bytes": host memory of the arguments (an archive kept there),
       "output_bytes", "alias_bytes": outputs, and the part of them written in place
       of donated arguments}, each per device, ints.
    """
    seeds = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_seeds,) + np.shape(x), x.dtype), model)
    layout = lay_out(algorithm, score_fn, seeds, data, params=algorithm.default_params() if params is None else params,
                     num_runs=num_runs, mesh=mesh, model_specs=model_specs, archive_memory=archive_memory,
                     chunk_size=chunk_size)
    states = layout.abstract_step_arguments(steps_per_call)[0]
    stats = lower_step(layout, steps_per_call).compile().memory_analysis()
    host = sum(_shard_bytes(x) for x in jax.tree.leaves(states) if x.sharding.memory_kind == "pinned_host")
    arguments = stats.argument_size_in_bytes
    if not stats.host_argument_size_in_bytes:  # XLA:CPU counts host arguments among the rest
        arguments -= host
    else:
        host = stats.host_argument_size_in_bytes
    return {"argument_bytes": int(arguments), "temp_bytes": int(stats.temp_size_in_bytes), "host_bytes": int(host),
            "output_bytes": int(stats.output_size_in_bytes), "alias_bytes": int(stats.alias_size_in_bytes)}


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of `x`."""
    return int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
