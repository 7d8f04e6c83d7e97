"""A model axis and an archive in host memory (sharding.py, runner.py, memory_plan.py).

The device count is fixed when jax starts and the suite runs on 2 CPU devices, so the
runs on meshes (1, 1, m) for m = 1, 2, 4, 8 happen in ONE subprocess started with 8
devices, while this process checks the placement rules. Compared with the
single-device run (the plain ("runs", "data") mesh of one device):
- bit for bit: the logged curves, the archives' scores and occupancy;
- to a bound, 1e-6 (|x| < 2): the parameters, and single merges (relative 1e-6).
  A model split over devices is reduced in another order (each device sums its rows,
  then the devices' sums are added), so the slerp's angle may differ in its last bit;
  and XLA:CPU contracts a multiply and an add into one fused multiply-add depending on
  how each shard's elementwise loop is compiled, so the same arithmetic rounds once
  or twice. Such differences then propagate through later merges.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import problems as P
import pytest
from jax.sharding import Mesh, PartitionSpec

import m2n2_jax as mj
from experiments import methods
from m2n2_jax.sharding import Placement, check_mesh, model_specs
from m2n2_jax.tasks import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec
    import m2n2_jax as mj
    from experiments import methods
    import problems as P
    from m2n2_jax.merge import split_point_slerp
    from m2n2_jax.sharding import Placement, check_mesh
    from m2n2_jax.runner import _sharded

    assert len(jax.devices()) == 8, jax.devices()
    algo, params = methods.make_method("m2n2", P.SETTINGS)  # from scratch: merge and mutation
    keys = jax.vmap(jax.random.key)(jnp.arange(2))
    seen = {}

    def score_fn(model, batch):  # records how the child reaches the user's code
        jax.debug.inspect_array_sharding(model[0].kernel, callback=lambda s: seen.setdefault(name, str(s.spec)))
        return P.score_fn(model, batch)

    arrays, info = {}, {}
    meshes = {"one": jax.make_mesh((1, 1), ("runs", "data"), devices=jax.devices()[:1])}
    for m in (1, 2, 4, 8):
        meshes[f"m{m}"] = jax.make_mesh((1, 1, m), ("runs", "data", "model"), devices=jax.devices()[:m])
    for name, mesh in meshes.items():
        for memory in ("device", "pinned_host") if name != "one" else ("device",):
            name = name if memory == "device" else name + "-host"
            r = mj.run(algo, keys, score_fn, P.TRAIN, 200, params=params, seed_fn=P.seed_fn, test_data=P.TEST,
                       log_every=20, mesh=mesh, progress=False, archive_memory=memory)
            kernel = r.state.models[0].kernel
            split = jax.sharding.NamedSharding(kernel.sharding.mesh, PartitionSpec("runs", None, "model"),
                                               memory_kind=kernel.sharding.memory_kind)
            info[name] = {"split": kernel.sharding.is_equivalent_to(split, kernel.ndim),
                          "memory": kernel.sharding.memory_kind,
                          "devices": len(kernel.sharding.device_set),
                          "shard": list(kernel.sharding.shard_shape(kernel.shape))}
            for k, v in r.metrics.items():
                arrays[f"{name}/metrics/{k}"] = v
            for i, x in enumerate(jax.tree.leaves(r.state)):
                arrays[f"{name}/state/{i}"] = np.asarray(x)
    info["score_fn_saw"] = seen

    # A recipe archive: its seeds are the models split over "model" (or kept on the host).
    recipe_algo = mj.M2N2(archive_size=6, mutation=False, archive="recipes", max_children=60)
    seeds = [P.init_model(jax.random.key(i)) for i in range(3)]
    for name in ("one", "m2", "m2-host"):
        mesh = meshes[name.split("-")[0]]
        r = mj.run(recipe_algo, keys, P.score_fn, P.TRAIN, 63, seed_models=seeds, test_data=P.TEST, log_every=20,
                   mesh=mesh, progress=False, archive_memory="pinned_host" if name.endswith("host") else "device")
        kernel = r.state.recipes.seeds[0].kernel
        info[f"recipes-{name}"] = {"memory": kernel.sharding.memory_kind,
                                   "shard": list(kernel.sharding.shard_shape(kernel.shape))}
        arrays[f"recipes-{name}/test_score"] = r.metrics["test_score"]
        arrays[f"recipes-{name}/scores"] = np.asarray(r.state.scores)

    # Merges of two models placed like the runner places them, on each mesh.
    shapes = {"w": (512, 128), "b": (128,), "v": (64, 40)}
    model = lambda key: {k: jax.random.normal(jax.random.fold_in(key, i), s) for i, (k, s) in enumerate(shapes.items())}
    a, b = model(jax.random.key(0)), model(jax.random.key(1))
    for m in (1, 2, 4, 8):
        mesh = check_mesh(jax.make_mesh((1, 1, m), ("runs", "data", "model"), devices=jax.devices()[:m]))
        placement = Placement.of(mesh, a)
        put = lambda t: jax.device_put(*(lambda s: (s, placement.shardings(s, ("runs",))))(
            jax.tree.map(lambda x: x[None], t)))
        merge = lambda a, b: jax.tree.map(lambda x: x[None], [split_point_slerp(
            jax.tree.map(lambda x: x[0], a), jax.tree.map(lambda x: x[0], b), w, k) for w, k in
            ((0.3, 0), (0.3, 5000), (0.8, 65600), (0.5, 70000))])
        merged = jax.jit(_sharded(merge, mesh, (PartitionSpec("runs"), PartitionSpec("runs"))))(put(a), put(b))
        for i, x in enumerate(jax.tree.leaves(merged)):
            arrays[f"merge{m}/{i}"] = np.asarray(x)
    np.savez(sys.argv[1] + ".npz", **arrays)
    json.dump(info, open(sys.argv[1] + ".json", "w"))
""")


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eight") / "result")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, out], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(np.load(out + ".npz")), json.load(open(out + ".json"))


RUNS = ["m1", "m1-host", "m2", "m2-host", "m4", "m4-host", "m8", "m8-host"]


@pytest.mark.parametrize("name", RUNS)
def test_a_run_split_over_a_model_axis_equals_one_device(eight_devices, name):
    arrays, _ = eight_devices
    for part in ("metrics/train_score", "metrics/test_score", "state/4", "state/5"):  # curves, scores, occupancy
        np.testing.assert_array_equal(arrays[f"{name}/{part}"], arrays[f"one/{part}"], err_msg=part)
    for i in range(4):  # the parameters: to the bound of the module docstring
        mine, one = arrays[f"{name}/state/{i}"], arrays[f"one/state/{i}"]
        assert np.abs(one).max() < 2
        np.testing.assert_allclose(mine, one, rtol=0, atol=1e-6, err_msg=f"state/{i}")


def test_a_recipe_archive_splits_its_seeds_over_the_model_axis_and_runs_as_on_one_device(eight_devices):
    arrays, info = eight_devices
    # (runs, seeds, 8, 16) kernels: the default rule splits their 8 rows in two.
    assert info["recipes-m2"]["shard"][-2:] == [4, 16] and info["recipes-one"]["shard"][-2:] == [8, 16]
    assert info["recipes-m2-host"]["memory"] == "pinned_host" and info["recipes-m2"]["memory"] == "device"
    for name in ("m2", "m2-host"):
        for part in ("test_score", "scores"):
            np.testing.assert_array_equal(arrays[f"recipes-{name}/{part}"], arrays[f"recipes-one/{part}"], err_msg=part)


@pytest.mark.parametrize("m", [2, 4, 8])
def test_merges_on_a_model_axis_equal_one_device_to_float_rounding(eight_devices, m):
    """Split points inside "w" (5000), past it (65,600 > 65,536) and in "v": a cut
    misplaced across shards would differ by the ratio's whole effect."""
    arrays, _ = eight_devices
    for i in range(12):
        np.testing.assert_allclose(arrays[f"merge{m}/{i}"], arrays[f"merge1/{i}"], rtol=1e-6, atol=1e-6,
                                   err_msg=str(i))


def test_the_archive_is_really_split_and_in_host_memory(eight_devices):
    """The first kernel, (R, N, 8, 16): its 8 rows over the model axis; host memory when asked."""
    _, info = eight_devices
    for m in (2, 4, 8):
        for name, memory in ((f"m{m}", "device"), (f"m{m}-host", "pinned_host")):
            assert info[name]["split"], name
            assert info[name]["devices"] == m and info[name]["shard"] == [2, 20, 8 // m, 16], name
            assert info[name]["memory"] == memory
    assert info["m1-host"]["memory"] == "pinned_host" and info["m1"]["shard"] == [2, 20, 8, 16]
    # score_fn receives the child split over "model" (on 1 device: whole).
    saw = info["score_fn_saw"]
    assert saw["m4"] == saw["m8-host"] == "P('model',)", saw
    assert saw["one"] == "P()", saw


def test_default_rule_splits_the_largest_dimension_but_the_last():
    model = {"embed": np.zeros((32, 8)), "w": np.zeros((6, 16, 24)), "bias": np.zeros(16), "odd": np.zeros((3, 5)),
             "scalar": np.zeros(())}
    specs = model_specs(model, 8)
    assert specs == {"embed": PartitionSpec("model", None), "w": PartitionSpec(None, "model", None),
                     "bias": PartitionSpec(), "odd": PartitionSpec(), "scalar": PartitionSpec()}
    assert model_specs(model, 2)["w"] == PartitionSpec(None, "model", None)  # 16 > 6, and never 24 (last)
    assert all(s == PartitionSpec() for s in jax.tree.leaves(model_specs(model, 1),
                                                             is_leaf=lambda x: isinstance(x, PartitionSpec)))


def test_placement_finds_stacked_models_anywhere_in_a_state():
    mesh = check_mesh(Mesh(np.array(jax.devices()[:2]).reshape(1, 1, 2), ("runs", "data", "model")))
    model = P.init_model(jax.random.key(0))
    placement = Placement.of(mesh, model)
    state = jax.eval_shape(lambda: mj.Archive(jax.tree.map(lambda x: jnp.zeros((3, 5) + x.shape), model),
                                              jnp.zeros((3, 5, 7)), jnp.zeros((3, 5), bool)))
    trim = lambda spec: tuple(spec)[:max([0] + [i + 1 for i, a in enumerate(spec) if a is not None])]
    specs = [trim(s.spec) for s in jax.tree.leaves(placement.shardings(state, ("runs",)))]
    # kernel (8, 16), bias (16,), kernel (16, 4), bias (4,): kernels split on their rows;
    # then scores, occupied and the scalar `asked` (which this state has without a runs axis).
    assert specs == [("runs", None, "model"), ("runs",), ("runs", None, "model"), ("runs",),
                     ("runs",), ("runs",), ()]


def test_placement_and_run_refuse_what_they_cannot_place():
    mesh = check_mesh(Mesh(np.array(jax.devices()[:2]).reshape(1, 1, 2), ("runs", "data", "model")))
    model = {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(3)}
    Placement.of(mesh, model, {"kernel": PartitionSpec(None, "model"), "bias": PartitionSpec()})  # user specs
    with pytest.raises(ValueError, match="not divisible"):
        Placement.of(mesh, model, {"kernel": PartitionSpec(), "bias": PartitionSpec("model")})
    with pytest.raises(ValueError, match="must name only 'model'"):
        Placement.of(mesh, model, {"kernel": PartitionSpec("data"), "bias": PartitionSpec()})
    with pytest.raises(ValueError, match="PartitionSpec for each"):
        Placement.of(mesh, model, {"kernel": PartitionSpec()})
    algo, params = methods.make_method("m2n2", P.SETTINGS)
    with pytest.raises(ValueError, match="archive_memory must be one of"):
        mj.run(algo, P.KEYS, P.score_fn, P.TRAIN, 60, params=params, seed_fn=P.seed_fn, archive_memory="disk",
               progress=False)
    es, es_params = mj.EvosaxES.example(P.init_model(jax.random.key(0)), 90)
    with pytest.raises(ValueError, match="holds no Archive"):
        mj.run(es, P.KEYS, P.score_fn, P.TRAIN, 60, params=es_params, seed_fn=P.seed_fn,
               archive_memory="pinned_host", progress=False)


def test_memory_plan_splits_the_archive_and_moves_it_to_the_host():
    """Per-device argument bytes on a 2-device model axis are about half of one
    device's (the archive dominates), and with the archive on the host they leave the
    device for host_bytes. 20 models of an MLP of 8 -> 256 -> 256 -> 4."""
    sizes = (8, 256, 256, 4)
    model = jax.eval_shape(lambda: digits.mlp_from_flat(jnp.zeros(sum(a * b + b for a, b in zip(sizes, sizes[1:]))),
                                                        sizes))
    data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), P.TRAIN)
    algorithm = mj.M2N2(archive_size=20)
    plan = lambda m, memory: mj.memory_plan(
        algorithm, P.score_fn, model, data, num_seeds=20, archive_memory=memory,
        mesh=Mesh(np.array(jax.devices()[:m]).reshape(1, 1, m), ("runs", "data", "model")))
    one, two, host = plan(1, "device"), plan(2, "device"), plan(1, "pinned_host")
    archive = 20 * mj.num_params(model) * 4
    assert archive <= one["argument_bytes"] < 1.02 * archive and one["host_bytes"] == 0
    assert two["argument_bytes"] < 0.53 * one["argument_bytes"]
    assert host["argument_bytes"] < 0.02 * archive and archive <= host["host_bytes"] < 1.02 * archive


def test_an_archive_in_host_memory_resumes_from_a_checkpoint_bit_for_bit(tmp_path):
    algo = mj.M2N2(archive_size=6, mutation=False)
    kw = dict(seed_models=[P.init_model(jax.random.key(i)) for i in range(3)], test_data=P.TEST, log_every=20,
              progress=False, archive_memory="pinned_host", steps_per_call=40)
    full = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 83, **kw)
    part = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 83, checkpoint=mj.Checkpointing(str(tmp_path), every=40),
                  time_limit=1e-9, **kw)
    assert part.stopped_by_time_limit and part.passes[-1] == 43
    resumed = mj.run(algo, P.KEYS[:2], P.score_fn, P.TRAIN, 83,
                     checkpoint=mj.Checkpointing(str(tmp_path), every=40, resume=True), **kw)
    assert resumed.state.models[0].kernel.sharding.memory_kind == "pinned_host"
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(full.test_score, resumed.test_score)
