"""Runs and datapoints sharded over 4 forced CPU devices equal one device.

The device count is fixed when jax starts, so the 4-device checks run in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import m2n2_jax as mj
from m2n2_jax.sharding import default_mesh, pad_points, runs_axis_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import m2n2_jax as mj
    from m2n2_jax.models.mlp import MLP, random_params

    assert len(jax.devices()) == 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(87, 6)).astype(np.float32)          # M = 61 + 26: not multiples of 4
    y = (x[:, :2].sum(1) > 0).astype(np.int32)
    train, test = (x[:61], y[:61]), (x[61:], y[61:])
    model = MLP(features=(8, 4))
    score_fn = mj.classification_scores(model.apply)
    seeds = lambda k: jax.vmap(lambda kk: random_params(kk, model, 6, std=0.3))(jax.random.split(k, 2))
    keys = jax.vmap(jax.random.key)(jnp.arange(3))                # R = 3: not a multiple of 4
    out = {}
    for name, mesh in [("one", mj.make_mesh(1, jax.devices()[:1])), ("runs4", mj.make_mesh(1)),
                       ("runs2_data2", mj.make_mesh(2)), ("data4", mj.make_mesh(4)), ("default", None)]:
        for chunk in ((None, 5) if name == "data4" else (None,)):  # chunks within the data shards
            r = mj.run(keys, seeds, score_fn, train, 150, mj.Config(archive_size=6, mutation_std=0.05),
                       test_data=test, log_every=25, mesh=mesh, chunk_size=chunk, progress=False)
            out[f"{name}/{chunk}"] = {"test": r.test_accuracy.tolist(), "train": r.train_accuracy.tolist(),
                                      "scores": np.asarray(r.state.scores).tolist()}

    # The archive placed with its parameters sharded over 4 devices: the primitives,
    # jitted, partition themselves (GSPMD) and agree with the unsharded archive.
    config = mj.Config(archive_size=4, mutation_std=0.05)
    stacked = seeds(jax.random.key(5))
    state = mj.init(jax.random.key(0), stacked, jax.vmap(score_fn, (0, None))(stacked, train), config)

    def steps(state):
        def body(s, i):
            child = mj.ask(jax.random.fold_in(jax.random.key(1), i), s, config)
            return mj.tell(s, child, score_fn(child, train), config), None
        return jax.lax.scan(body, state, jnp.arange(40))[0]

    mesh = Mesh(np.array(jax.devices()), ("model",))
    spec = lambda leaf: P(*([None] * (leaf.ndim - 1) + ["model"])) if leaf.shape[-1] % 4 == 0 else P()
    sharded = state.replace(params=jax.tree.map(lambda l: jax.device_put(l, NamedSharding(mesh, spec(l))),
                                                state.params))
    placed = [str(l.sharding.spec) for l in jax.tree.leaves(sharded.params)]
    a, b = jax.jit(steps)(state), jax.jit(steps)(sharded)
    out["archive"] = {"placed": placed, "max_param_diff": max(float(jnp.abs(u - v).max()) for u, v in
                      zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))),
                      "scores_equal": bool(jnp.array_equal(a.scores, b.scores)),
                      "out_specs": [str(l.sharding.spec) for l in jax.tree.leaves(b.params)]}
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def four_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_sharded_runs_and_datapoints_equal_one_device(four_devices):
    reference = four_devices["one/None"]
    assert len(reference["test"]) == 3 and len(reference["test"][0]) == 6  # 150 passes, logged every 25
    for name, result in four_devices.items():
        if name == "archive":
            continue
        for field in ("test", "train", "scores"):
            np.testing.assert_allclose(result[field], reference[field], atol=1e-6, err_msg=f"{name} {field}")


def test_archive_with_sharded_parameters_equals_unsharded(four_devices):
    archive = four_devices["archive"]
    assert any("model" in spec for spec in archive["placed"]), archive["placed"]
    assert archive["scores_equal"]
    assert archive["max_param_diff"] < 1e-5


@pytest.mark.parametrize("runs, devices, size", [(1, 4, 1), (2, 4, 2), (3, 4, 2), (4, 4, 4), (10, 4, 4),
                                                  (10, 2, 2), (5, 6, 3), (1, 1, 1)])
def test_default_mesh_gives_runs_first_and_the_rest_to_data(runs, devices, size):
    assert runs_axis_size(runs, devices) == size
    mesh = default_mesh(runs, jax.devices()[:1])
    assert (mesh.shape["runs"], mesh.shape["data"]) == (1, 1)


def test_pad_points_repeats_the_last_datapoint():
    x, y = np.arange(10).reshape(5, 2), np.arange(5)
    px, py = pad_points((x, y), 4)
    np.testing.assert_array_equal(px, np.concatenate([x, [x[-1]] * 3]))
    np.testing.assert_array_equal(py, [0, 1, 2, 3, 4, 4, 4, 4])
    assert pad_points((x, y), 5)[0] is x


@pytest.mark.parametrize("kwargs, message", [
    ({"mesh": "cpu"}, "mesh must be"),
    ({"mesh": jax.sharding.Mesh(np.array(jax.devices()), ("x",))}, "mesh must be"),
    ({"devices": jax.devices(), "mesh": mj.make_mesh(1)}, "not both"),
])
def test_run_validates_the_mesh(kwargs, message):
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=message):
        mj.run(jax.random.key(0), [{"w": np.zeros(3, np.float32)}] * 2, lambda p, d: d[:, 0] * 0 + p["w"][0],
               x, 10, progress=False, **kwargs)


def test_make_mesh_rejects_a_data_axis_not_dividing_the_devices():
    with pytest.raises(ValueError, match="dividing"):
        mj.make_mesh(3)
