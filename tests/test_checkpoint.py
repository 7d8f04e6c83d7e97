"""Checkpoint / resume: bit-identical continuation, SIGKILL, clear errors that touch nothing.

Every run here uses one compiled program (seed_fn, 15 steps per call, log_every 10;
budgets and keys are traced), and the SIGKILL subprocess runs while this process
compiles it.
"""

import functools
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import problems as P
import pytest

import m2n2_jax as mj
from experiments import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGO, PARAMS = methods.make_method("m2n2", P.SETTINGS)


def evolve(checkpoint=None, passes=80, keys=P.KEYS, params=PARAMS, steps_per_call=15):
    return mj.run(ALGO, keys, P.score_fn, P.TRAIN, passes, params=params, seed_fn=P.seed_fn, test_data=P.TEST,
                  log_every=10, steps_per_call=steps_per_call, checkpoint=checkpoint, progress=False)


@functools.cache
def reference(passes=80):
    """The uninterrupted run, without checkpoints."""
    return evolve(passes=passes)


def snapshot(directory):
    """{relative path: sha256} of every file and folder under `directory`."""
    out = {}
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), directory) + "/"] = "dir"
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def steps_in(directory):
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def assert_same(a, b):
    np.testing.assert_array_equal(a.passes, b.passes)
    assert a.metrics.keys() == b.metrics.keys()
    for k in a.metrics:
        np.testing.assert_array_equal(a.metrics[k], b.metrics[k], err_msg=k)
    for x, y in zip(jax.tree.leaves((a.state, a.best_models)), jax.tree.leaves((b.state, b.best_models)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------- SIGKILL, in a real subprocess

KILLED_BUDGET = 2 + 5 * 300  # the child: 300 calls of 5 steps, a checkpoint every 150 passes

CHILD = textwrap.dedent(f"""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)  # as conftest: the same padding of runs as here
    import m2n2_jax as mj
    import problems as P
    from experiments import methods

    algo, params = methods.make_method("m2n2", P.SETTINGS)
    mj.run(algo, P.KEYS, P.score_fn, P.TRAIN, {KILLED_BUDGET}, params=params, seed_fn=P.seed_fn, test_data=P.TEST,
           log_every=10, steps_per_call=5, checkpoint=mj.Checkpointing(sys.argv[1], every=150), progress=False)
    print("FINISHED")
""")


class Killed:
    """A child run, SIGKILLed by a watcher thread as soon as its first checkpoint is complete
    (orbax renames a finished checkpoint to its pass count)."""

    def __init__(self, directory):
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
        self.directory, self.killed_at = directory, None
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, directory], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self):
        deadline = time.time() + 300
        while self.proc.poll() is None and time.time() < deadline:
            if os.path.isdir(self.directory) and steps_in(self.directory):
                self.proc.send_signal(signal.SIGKILL)
                self.killed_at = steps_in(self.directory)
                return
            time.sleep(0.005)

    def wait(self):
        self.thread.join(timeout=310)
        out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, out, err


@pytest.fixture(scope="module", autouse=True)
def killed_child(request, tmp_path_factory):
    """Started before the first test of this module (if its test is selected), so the
    child compiles alongside them; its test comes last."""
    selected = any(item.nodeid.startswith(request.node.nodeid) and "test_sigkill" in item.nodeid
                   for item in request.session.items)
    child = Killed(str(tmp_path_factory.mktemp("killed") / "ckpt")) if selected else None
    yield child
    if child is not None and child.proc.poll() is None:
        child.proc.kill()
        child.proc.wait()


# ---------------------------------------------------------------- resume in this process

def test_resume_from_an_intermediate_checkpoint_is_bit_identical(tmp_path):
    directory = str(tmp_path / "ckpt")
    first = evolve(mj.Checkpointing(directory, every=15, keep=100))
    assert_same(first, reference())  # checkpointing changes nothing
    # 2 seeds, then calls of 15 steps; every call crosses a multiple of 15; the end is always saved.
    assert steps_in(directory) == [17, 32, 47, 62, 77, 80]
    for later in (47, 62, 77, 80):  # as if the run had died after pass 32
        shutil.rmtree(os.path.join(directory, str(later)))
    resumed = evolve(mj.Checkpointing(directory, every=15, resume=True, keep=100))
    assert_same(resumed, reference())
    assert steps_in(directory) == [17, 32, 47, 62, 77, 80]
    # It continued rather than restarted: the points logged before pass 32 keep the
    # wall times of the first run, restored from the checkpoint.
    before = first.passes <= 32
    np.testing.assert_array_equal(resumed.log_wall_seconds[before], first.log_wall_seconds[before])
    assert np.all(np.diff(resumed.log_wall_seconds) >= 0)
    # Resuming a finished run returns its result and writes nothing.
    done = snapshot(directory)
    assert_same(evolve(mj.Checkpointing(directory, every=15, resume=True, keep=100)), reference())
    assert snapshot(directory) == done


def test_resume_without_a_checkpoint_starts_fresh_and_saves_the_end(tmp_path):
    result = evolve(mj.Checkpointing(str(tmp_path / "new"), every=1000, resume=True))
    assert_same(result, reference())
    assert sorted(os.listdir(tmp_path / "new")) == ["80"]


# ---------------------------------------------------------------- errors that touch nothing

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished run's checkpoints (passes 47 and 80), made once; tests copy it."""
    directory = str(tmp_path_factory.mktemp("saved") / "ckpt")
    evolve(mj.Checkpointing(directory, every=45, meta={"method": "m2n2"}))
    assert steps_in(directory) == [47, 80]
    return directory


def copy_of(saved, tmp_path):
    directory = str(tmp_path / "ckpt")
    shutil.copytree(saved, directory)
    return directory


@pytest.mark.parametrize("change, message", [
    ({"passes": 90}, r"different run \(forward_passes: checkpoint 80 vs this run 90\)"),
    ({"keys": jax.vmap(jax.random.key)(jnp.arange(3) + 7)}, "other PRNG keys"),
    ({"params": PARAMS.replace(alpha=jnp.float32(0.5))}, r"different run \(params \.alpha: checkpoint '[0-9a-f]+' vs"),
    ({"meta": {"method": "ga"}}, r"different run \(user method: checkpoint 'm2n2' vs this run 'ga'\)"),
])
def test_a_mismatched_checkpoint_is_a_clear_error_and_touches_nothing(saved, tmp_path, change, message):
    directory = copy_of(saved, tmp_path)
    before = snapshot(directory)
    meta = change.pop("meta", {"method": "m2n2"})
    with pytest.raises(ValueError, match=message):
        evolve(mj.Checkpointing(directory, every=45, resume=True, meta=meta), **change)
    assert snapshot(directory) == before


def test_a_fresh_run_refuses_a_directory_holding_checkpoints(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    before = snapshot(directory)
    with pytest.raises(ValueError, match=r"already holds a checkpoint \(pass 80\)"):
        evolve(mj.Checkpointing(directory, every=45, meta={"method": "m2n2"}))
    assert snapshot(directory) == before


def test_a_corrupt_checkpoint_is_a_clear_error_and_touches_nothing(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    for root, _, files in os.walk(os.path.join(directory, "80")):
        for f in files:  # garble every stored byte of the latest checkpoint
            path = os.path.join(root, f)
            data = open(path, "rb").read()
            open(path, "wb").write(bytes(255 - b for b in data))
    before = snapshot(directory)
    with pytest.raises(ValueError, match="cannot (read|restore) checkpoint .*80"):
        evolve(mj.Checkpointing(directory, every=45, resume=True, meta={"method": "m2n2"}))
    assert snapshot(directory) == before


def test_a_foreign_checkpoint_is_a_clear_error_and_touches_nothing(tmp_path):
    directory = str(tmp_path / "foreign")  # an orbax checkpoint of something else
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=True),
                                    item_names=("state",))
    manager.save(17, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": np.zeros(3)})))
    manager.wait_until_finished()
    before = snapshot(directory)
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*17 \(corrupt or incomplete\?\).*meta"):
        evolve(mj.Checkpointing(directory, every=15, resume=True))
    assert snapshot(directory) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, "every must be an int >= 1"),
    ({"every": 2.5}, "every must be an int >= 1"),
    ({"every": 5, "keep": 0}, "keep must be an int >= 1"),
    ({"every": 5, "meta": {1j}}, "JSON"),
])
def test_checkpointing_validates_its_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mj.Checkpointing("somewhere", **kwargs)


def test_sigkill_then_resume_equals_an_uninterrupted_run(killed_child):
    returncode, out, err = killed_child.wait()
    assert returncode == -signal.SIGKILL, (returncode, err[-3000:])
    assert "FINISHED" not in out
    directory = killed_child.directory
    assert killed_child.killed_at and killed_child.killed_at[0] == 152  # 2 seeds + 30 calls of 5 passes
    assert KILLED_BUDGET not in steps_in(directory)  # killed before the end
    # Resume here, in other chunks (15 steps per call, one checkpoint at the end).
    resumed = evolve(mj.Checkpointing(directory, every=10_000, resume=True), passes=KILLED_BUDGET)
    assert_same(resumed, reference(KILLED_BUDGET))
    assert steps_in(directory)[-1] == KILLED_BUDGET
