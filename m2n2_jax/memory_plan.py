"""Memory of a run before any weight is loaded: compile one call of `run`'s step from
abstract shapes and read XLA's per-device accounting.

    plan = mj.memory_plan(algorithm, score_fn, model_shapes, data_shapes, num_seeds=2,
                          mesh=jax.make_mesh((1, 1, 8), ("runs", "data", "model")))
    plan["argument_bytes"], plan["temp_bytes"], plan["host_bytes"]   # per device

The program is the one `run` compiles for its steps (`runner._advance`, the state
donated and updated in place), placed as `run` places it: the model axis, the archive
in `archive_memory`. Nothing is allocated; compiling for devices this process does not
have is not possible, so plan for 8 GPUs on 8 devices of the same count (on a CPU:
`XLA_FLAGS=--xla_force_host_platform_device_count=8`). XLA's accounting differs
between backends (fusion, temporaries): a CPU plan is an estimate for a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m2n2_jax import runner
from m2n2_jax.base import Algorithm
from m2n2_jax.checks import check_contract
from m2n2_jax.sharding import Placement, check_archive_memory, check_mesh


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
      num_seeds: S, the seed models the state is built from.
      mesh, model_specs, archive_memory, chunk_size: as `run` takes them (default
        mesh: one device).

    Returns:
      {"argument_bytes": device memory of the arguments (the state, data, keys),
       "temp_bytes": XLA's temporaries (parents, child, activations),
       "host_bytes": host memory of the arguments (an archive kept there),
       "output_bytes", "alias_bytes": outputs, and the part of them written in place
       of donated arguments}, each per device, ints.
    """
    check_archive_memory(archive_memory)
    mesh = check_mesh(Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("runs", "data", "model"))
                      if mesh is None else mesh)
    params = algorithm.default_params() if params is None else params
    shape = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    model = jax.tree.map(shape, model)
    seeds = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_seeds,) + x.shape, x.dtype), model)
    m = jax.tree.leaves(data)[0].shape[0]
    state = check_contract(algorithm, seeds, m, params)
    placement = Placement.of(mesh, model, model_specs)
    runs = -(-num_runs // mesh.shape["runs"]) * mesh.shape["runs"]
    per_run = lambda x: jax.ShapeDtypeStruct((runs,) + x.shape, x.dtype)
    states = jax.tree.map(per_run, state)
    shardings = runner.state_shardings(states, placement, archive_memory)
    states = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), states, shardings)
    replicated = NamedSharding(mesh, PartitionSpec())
    dtype = lambda x: x.dtype if hasattr(x, "dtype") else np.result_type(x)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), dtype(x), sharding=s),
                          params, placement.shardings(params))  # as run places them (a base model split)
    data_axis = mesh.shape["data"]
    points = jax.tree.map(lambda x: jax.ShapeDtypeStruct((-(-x.shape[0] // data_axis) * data_axis,) + x.shape[1:],
                                                         x.dtype, sharding=NamedSharding(mesh, PartitionSpec("data"))),
                          data)
    keys = jax.ShapeDtypeStruct((runs,), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec("runs")))
    flags = jax.ShapeDtypeStruct((steps_per_call,), jnp.bool_, sharding=replicated)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    compiled = runner._advance.lower(
        states, keys, params, step, flags, flags, points, None, algorithm=algorithm, score_fn=score_fn,
        metrics_fn=None, chunk_size=chunk_size, mesh=mesh, m=m, shared=True, per_run=False, placement=placement,
        archive_memory=archive_memory).compile()
    stats = compiled.memory_analysis()
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
