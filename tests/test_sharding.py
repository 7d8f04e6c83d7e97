"""Runs and datapoints placed on real meshes equal the single-device run.

conftest forces 2 CPU devices, so the (2, 1) mesh (runs split) and the (1, 2) mesh
(datapoints split, scores gathered) are real here. The device count is fixed when jax
starts, so the 4-device checks (a real 2 x 2 mesh, the single-device reference, the
output state sharded over "runs", the default mesh) run in ONE subprocess started
with --xla_force_host_platform_device_count=4; it runs while this process compiles
its own meshes. The runs use M = 89 training points (padded to a multiple of the
"data" axis) and R = 3 runs here (padded to the "runs" axis), R = 4 in the subprocess.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import problems as P
import pytest
from jax.sharding import Mesh

import m2n2_jax as mj
from experiments import methods
from m2n2_jax.sharding import AXES, default_mesh, pad_points, runs_axis_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import m2n2_jax as mj
    import problems as P
    from m2n2_jax.sharding import default_mesh
    from experiments import methods

    assert len(jax.devices()) == 4, jax.devices()
    algo, params = methods.make_method("m2n2", P.SETTINGS)
    train = (P.X[:89], P.Y[:89])
    keys = jax.vmap(jax.random.key)(jnp.arange(4))
    one = jax.make_mesh((1, 1), ("runs", "data"), devices=jax.devices()[:1])
    grid = jax.make_mesh((2, 2), ("runs", "data"))
    arrays, info = {}, {"grid_shape": dict(grid.shape), "grid_devices": [[d.id for d in r] for r in grid.devices],
                        "default": {r: dict(default_mesh(r).shape) for r in range(1, 6)}}
    for name, mesh in (("one", one), ("grid", grid)):
        r = mj.run(algo, keys, P.score_fn, train, 60, params=params, seed_fn=P.seed_fn, test_data=P.TEST,
                   log_every=10, mesh=mesh, progress=False)
        leaves = jax.tree.leaves(r.state)
        info[name] = {"specs": [str(x.sharding.spec) for x in leaves],
                      "devices": [sorted(d.id for d in x.sharding.device_set) for x in leaves],
                      "rows_per_shard": [x.sharding.shard_shape(x.shape)[0] for x in leaves],
                      "spec_mesh": [dict(x.sharding.mesh.shape) for x in leaves]}
        arrays[name + "/passes"] = r.passes
        for k, v in r.metrics.items():
            arrays[f"{name}/metrics/{k}"] = v
        for i, x in enumerate(leaves):
            arrays[f"{name}/state/{i}"] = np.asarray(x)
        for i, x in enumerate(jax.tree.leaves(r.best_models)):
            arrays[f"{name}/best/{i}"] = np.asarray(x)
    np.savez(sys.argv[1] + ".npz", **arrays)
    json.dump(info, open(sys.argv[1] + ".json", "w"))
""")

ALGO, PARAMS = methods.make_method("m2n2", P.SETTINGS)
TRAIN = (P.X[:89], P.Y[:89])  # 89: not a multiple of the "data" axis


class FourDevices:
    """The subprocess, started once per module; `get()` waits for its results."""

    def __init__(self, out):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
        self.out, self.result = out, None
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT, out], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def get(self):
        if self.result is None:
            _, err = self.proc.communicate(timeout=600)
            assert self.proc.returncode == 0, err[-4000:]
            arrays = dict(np.load(self.out + ".npz"))
            self.result = arrays, json.load(open(self.out + ".json"))
        return self.result


def run(mesh):
    """R = 3 runs (P.KEYS, the first 3 keys of the subprocess's 4) on `mesh`."""
    return mj.run(ALGO, P.KEYS, P.score_fn, TRAIN, 60, params=PARAMS, seed_fn=P.seed_fn, test_data=P.TEST,
                  log_every=10, mesh=mesh, progress=False)


SHAPES = [(2, 1), (1, 2)]
ON_MESH = {}  # shape -> Future of run(jax.make_mesh(shape, AXES[:2]))


@pytest.fixture(scope="module", autouse=True)
def four_devices(request, tmp_path_factory):
    """Started before the first test of this module, so that the subprocess and the two
    meshes here (one on a second thread: XLA compiles with the GIL released) compile
    side by side."""
    selected = [item.nodeid for item in request.session.items if item.nodeid.startswith(request.node.nodeid)]
    needs = lambda *names: any(name in n for n in selected for name in names)
    four = FourDevices(str(tmp_path_factory.mktemp("four") / "result")) if needs("one_device") else None
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
        if needs("split_over_two_devices"):
            ON_MESH.update({shape: executor.submit(run, jax.make_mesh(shape, AXES[:2])) for shape in SHAPES})
        yield four
        ON_MESH.clear()
    if four is not None and four.proc.poll() is None:
        four.proc.kill()
        four.proc.wait()


def assert_same_run(get, rows):
    """Two results agree: pass counts, curves, archive scores and occupancy bit for bit;
    parameters to float rounding (programs compiled for other meshes may round the
    merges' arithmetic differently in the last bit). get(part) -> (mine, theirs)."""
    np.testing.assert_array_equal(*get("passes"))
    for part in ("metrics/train_score", "metrics/test_score", "state/4", "state/5"):
        mine, theirs = get(part)
        np.testing.assert_array_equal(mine, theirs[:rows], err_msg=part)
    for part in ("state/0", "state/1", "state/2", "state/3", "best/0", "best/1", "best/2", "best/3"):
        mine, theirs = get(part)
        np.testing.assert_allclose(mine, theirs[:rows], rtol=1e-5, atol=1e-6, err_msg=part)


def parts(result):
    """A RunResult as the subprocess stores it: name -> array."""
    out = {"passes": result.passes, **{f"metrics/{k}": v for k, v in result.metrics.items()}}
    out.update({f"state/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(result.state))})
    out.update({f"best/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(result.best_models))})
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_two_device_meshes_are_real(shape):
    mesh = jax.make_mesh(shape, AXES[:2])
    assert dict(mesh.shape) == dict(zip(AXES[:2], shape))
    assert sorted(d.id for d in mesh.devices.flat) == [0, 1]


@pytest.mark.parametrize("shape", SHAPES)
def test_runs_or_datapoints_split_over_two_devices_equal_one_device(shape, four_devices):
    # jax.make_mesh gives Explicit axes by default: the runner must accept them.
    result = ON_MESH[shape].result() if shape in ON_MESH else run(jax.make_mesh(shape, AXES[:2]))
    assert result.train_score.shape == (3, 6)
    for x in jax.tree.leaves(result.state):  # the state lives on both devices
        assert len(x.sharding.device_set) == 2
    arrays, _ = four_devices.get()
    mine = parts(result)
    assert_same_run(lambda part: (mine[part], arrays["one/" + part]), rows=3)


def test_the_default_mesh_splits_runs_first():
    assert dict(default_mesh(3).shape) == {"runs": 2, "data": 1, "model": 1}  # 3 runs, padded to 4
    assert dict(default_mesh(1).shape) == {"runs": 1, "data": 2, "model": 1}  # one run: datapoints split
    # The default for 3 runs is the (2, 1) mesh: the same compiled program, the same result.
    np.testing.assert_array_equal(run(None).train_score, run(jax.make_mesh((2, 1), AXES[:2])).train_score)


def test_a_two_by_two_mesh_equals_one_device_and_keeps_runs_sharded(four_devices):
    arrays, info = four_devices.get()
    assert info["grid_shape"] == {"runs": 2, "data": 2}
    assert sorted(sum(info["grid_devices"], [])) == [0, 1, 2, 3]
    # Curves, final state and best models of the 2 x 2 mesh equal the single device.
    assert_same_run(lambda part: (arrays["grid/" + part], arrays["one/" + part]), rows=4)
    # The runs differ from one another (state leaf 4 is the archive's scores).
    assert arrays["one/state/4"].shape == (4, 20, 89)
    assert not np.array_equal(arrays["one/state/4"][0], arrays["one/state/4"][1])
    # The returned state is sharded over "runs": 2 of the 4 runs per shard, on all 4 devices.
    grid = info["grid"]
    assert [s.replace(", None", "").replace(",)", ")") for s in grid["specs"]] == ["P('runs')"] * len(grid["specs"])
    assert grid["rows_per_shard"] == [2] * len(grid["specs"])
    assert grid["devices"] == [[0, 1, 2, 3]] * len(grid["specs"])
    assert grid["spec_mesh"] == [{"runs": 2, "data": 2, "model": 1}] * len(grid["specs"])
    assert info["one"]["devices"] == [[0]] * len(grid["specs"])
    # The default mesh on 4 devices: runs first, the rest shares the datapoints.
    expected = {1: (1, 4), 2: (2, 2), 3: (2, 2), 4: (4, 1), 5: (4, 1)}
    assert {int(r): (m["runs"], m["data"]) for r, m in info["default"].items()} == expected


@pytest.mark.parametrize("runs, devices, size", [(1, 4, 1), (2, 4, 2), (3, 4, 2), (4, 4, 4), (10, 4, 4),
                                                  (10, 2, 2), (5, 6, 3), (4, 6, 3), (1, 1, 1), (7, 7, 7)])
def test_runs_axis_size_is_the_largest_divisor_not_above_the_runs(runs, devices, size):
    assert runs_axis_size(runs, devices) == size
    reference = max(d for d in range(1, devices + 1) if devices % d == 0 and d <= runs)
    assert size == reference


def test_pad_points_repeats_the_last_datapoint():
    x, y = np.arange(10).reshape(5, 2), np.arange(5)
    px, py = pad_points((x, y), 4)
    np.testing.assert_array_equal(px, np.concatenate([x, [x[-1]] * 3]))
    np.testing.assert_array_equal(py, [0, 1, 2, 3, 4, 4, 4, 4])
    assert pad_points((x, y), 5)[0] is x
    assert pad_points(None, 4) is None


@pytest.mark.parametrize("mesh", [
    "cpu",
    Mesh(np.array(jax.devices()), ("x",)),
    Mesh(np.array(jax.devices()).reshape(1, 2), ("data", "runs")),  # axes in the wrong order
])
def test_run_validates_the_mesh(mesh):
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with axes \('runs', 'data', 'model'\)"):
        mj.run(ALGO, P.KEYS, P.score_fn, TRAIN, 60, params=PARAMS, seed_fn=P.seed_fn, mesh=mesh, progress=False)


def test_an_archive_sharded_over_a_model_axis_steps_like_an_unsharded_one():
    """Archives too large for one device: shard the parameters, jit ask / tell, XLA partitions them."""
    algo, params = methods.make_method("m2n2", P.SETTINGS)
    seeds = P.seed_fn(jax.random.key(3))
    state, _ = jax.jit(lambda s: mj.init_state(algo, P.score_fn, jax.random.key(4), s, params, P.TRAIN))(seeds)
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*([None] * (x.ndim - 1) + ["model"]))) if x.shape[-1] % 2 == 0 else x)
    sharded = state.replace(models=jax.tree.map(shard, state.models))
    assert any(len(x.sharding.device_set) == 2 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(sharded.models))
    step = jax.jit(lambda s, k: mj.step(algo, P.score_fn, s, k, params, P.TRAIN))
    for i in range(5):
        state, _ = step(state, jax.random.key(10 + i))
        sharded, _ = step(sharded, jax.random.key(10 + i))
    np.testing.assert_array_equal(np.asarray(state.scores), np.asarray(sharded.scores))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7),
                 state.models, sharded.models)
