"""Checkpoint / resume: bit-identical continuation, kill -9, clear errors that touch nothing."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import m2n2_jax as mj
from m2n2_jax.models.mlp import MLP, random_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rng = np.random.default_rng(3)
X = rng.normal(size=(60, 5)).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32)
MODEL = MLP(features=(3, 2))
SCORE_FN = mj.classification_scores(MODEL.apply)
SEEDS = lambda key: jax.vmap(lambda k: random_params(k, MODEL, 5, std=0.3))(jax.random.split(key, 2))
KEYS = jax.vmap(jax.random.key)(jnp.arange(3))
CONFIG = mj.Config(archive_size=5, mutation_std=0.05)


def evolve(checkpoint=None, passes=80, keys=KEYS):
    return mj.run(keys, SEEDS, SCORE_FN, (X, Y), passes, CONFIG, test_data=(X, Y), log_every=10,
                  checkpoint=checkpoint, progress=False)


def snapshot(directory):
    """{relative path: sha256} of every file under `directory`."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def assert_same(a, b):
    np.testing.assert_array_equal(a.passes, b.passes)
    np.testing.assert_array_equal(a.train_accuracy, b.train_accuracy)
    np.testing.assert_array_equal(a.test_accuracy, b.test_accuracy)
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_from_an_intermediate_checkpoint_is_bit_identical(tmp_path):
    reference = evolve()
    directory = str(tmp_path / "ckpt")
    evolve(mj.Checkpointing(directory, every=15, keep=100))
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
    assert steps == [17, 32, 47, 62, 77, 80]  # 2 seeds, then calls of 15 steps (<= every)
    for later in steps[2:]:  # as if the run had died after pass 30
        shutil.rmtree(os.path.join(directory, str(later)))
    resumed = evolve(mj.Checkpointing(directory, every=15, resume=True, keep=100))
    assert_same(resumed, reference)
    assert np.all(np.diff(resumed.log_wall_seconds) >= 0)
    # Resuming a finished run returns its result without evolving further.
    assert_same(evolve(mj.Checkpointing(directory, every=15, resume=True)), reference)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path):
    result = evolve(mj.Checkpointing(str(tmp_path / "new"), every=1000, resume=True))
    assert_same(result, evolve())
    assert sorted(os.listdir(tmp_path / "new")) == ["80"]  # the final state is always saved


@pytest.mark.parametrize("change, message", [
    ({"passes": 90}, "different run"),
    ({"keys": jax.vmap(jax.random.key)(jnp.arange(3) + 7)}, "other PRNG keys"),
    ({"meta": {"method": "ga"}}, "different run"),
])
def test_a_mismatched_checkpoint_is_a_clear_error_and_touches_nothing(tmp_path, change, message):
    directory = str(tmp_path / "ckpt")
    evolve(mj.Checkpointing(directory, every=40, meta={"method": "m2n2"}))
    before = snapshot(directory)
    meta = change.pop("meta", {"method": "m2n2"})
    with pytest.raises(ValueError, match=message):
        evolve(mj.Checkpointing(directory, every=40, resume=True, meta=meta), **change)
    assert snapshot(directory) == before


def test_a_fresh_run_refuses_a_directory_holding_checkpoints(tmp_path):
    directory = str(tmp_path / "ckpt")
    evolve(mj.Checkpointing(directory, every=40))
    before = snapshot(directory)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        evolve(mj.Checkpointing(directory, every=40))
    assert snapshot(directory) == before


def test_a_corrupt_checkpoint_is_a_clear_error_and_touches_nothing(tmp_path):
    directory = str(tmp_path / "ckpt")
    evolve(mj.Checkpointing(directory, every=1000))
    for root, _, files in os.walk(os.path.join(directory, "80")):
        for f in files:  # garble every stored byte
            path = os.path.join(root, f)
            data = open(path, "rb").read()
            open(path, "wb").write(bytes(255 - b for b in data))
    before = snapshot(directory)
    with pytest.raises(ValueError, match="cannot (read|restore) checkpoint"):
        evolve(mj.Checkpointing(directory, every=1000, resume=True))
    assert snapshot(directory) == before


@pytest.mark.parametrize("kwargs, message", [({"every": 0}, "every"), ({"every": 5, "meta": {1j}}, "JSON")])
def test_checkpointing_validates_its_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mj.Checkpointing("somewhere", **kwargs)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real subprocess is killed with SIGKILL after its first checkpoint, then resumed."""
    script = os.path.join(ROOT, "experiments", "from_scratch.py")
    common = ["--method", "m2n2", "--runs", "2", "--hidden", "4", "--forward-passes", "20000",
              "--log-every", "1000", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    killed_out, ckpt = str(tmp_path / "killed"), str(tmp_path / "killed" / "ckpt")
    proc = subprocess.Popen([sys.executable, script, *common, "--out", killed_out, "--checkpoint-every", "1000",
                             "--checkpoint-dir", ckpt], env=env)
    deadline = time.time() + 120
    while not (os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed_out, "m2n2.json")), "killed too late: the run had finished"
    subprocess.run([sys.executable, script, *common, "--out", killed_out, "--resume", ckpt], env=env, check=True)
    reference_out = str(tmp_path / "reference")
    subprocess.run([sys.executable, script, *common, "--out", reference_out], env=env, check=True)
    resumed = json.load(open(os.path.join(killed_out, "m2n2.json")))
    reference = json.load(open(os.path.join(reference_out, "m2n2.json")))
    for field in ("final_test_accuracy", "final_train_accuracy", "test_accuracy_runs"):
        assert resumed[field] == reference[field]
    for field in ("forward_passes", "test_accuracy_mean", "train_accuracy_mean"):
        assert resumed["curve"][field] == reference["curve"][field]
