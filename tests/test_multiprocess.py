"""Runs across processes: 2 processes x 2 CPU devices equal 1 process x 4 devices.

Three subprocesses of tests/multiprocess_worker.py start at once: the two halves of a
jax.distributed job (coordinator on a free loopback port, gloo collectives) and the
single-process reference. Each writes its results to an .npz; the module fixture waits
for all three under one hard timeout, and kills every one that is still running as
soon as one fails or the time is up (a hang is a failure, not a stuck suite).

Compilation is most of the time, and the second process compiles every program even
with a warm compilation cache (jax writes the cache from process 0 only), so all three
compile at XLA's backend optimisation level 0: about 30 % less CPU time. The flags are
the same in every process, so the comparisons hold as they are (with default flags
the file passes too, run by hand). The file takes 38-59 s on this project's shared
2-core CPU (load average 2.5-8).
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import CACHE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
TIMEOUT = 240  # seconds for all three
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp):
    """Start the three workers; wait for them (bounded); (results, stderr) per worker."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE}
    env.update(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    port = str(free_port())
    jobs = {"p0": (tmp / "multi", 0, 2), "p1": (tmp / "multi", 1, 2), "ref": (tmp / "ref", 0, 1)}
    procs, logs = {}, {}
    for name, (out, pid, nproc) in jobs.items():
        out.mkdir(exist_ok=True)
        logs[name] = (open(tmp / f"{name}.out", "w"), open(tmp / f"{name}.err", "w"))
        procs[name] = subprocess.Popen([sys.executable, WORKER, str(out), str(pid), str(nproc), port, CACHE],
                                       env=env, cwd=ROOT, stdout=logs[name][0], stderr=logs[name][1])
    deadline = time.monotonic() + TIMEOUT
    try:
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs.values()):
                break
            time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in sum(logs.values(), ()):
            f.close()
    err = {name: (tmp / f"{name}.err").read_text() for name in jobs}
    if any(p.returncode != 0 for p in procs.values()):
        report = "\n".join(f"--- {name}: exit {procs[name].returncode}\n{(tmp / f'{name}.out').read_text()[-1500:]}"
                           f"\n{err[name][-3000:]}" for name in jobs)
        pytest.fail(f"a worker failed or the {TIMEOUT} s ran out:\n{report}")
    results = {}
    for name, (out, pid, _) in jobs.items():
        results[name] = (dict(np.load(out / f"p{pid}.npz")), json.loads((out / f"p{pid}.json").read_text()))
    return results, err


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    results, err = launch(tmp)
    return results, err, tmp


def assert_equal_results(a, b, name, other=None):
    """Every array of result `name` in `a` equals result `other` (default: the same) in `b`, bit for bit."""
    keys = sorted(k for k in a if k.startswith(name + "/"))
    assert keys, name
    for k in keys:
        np.testing.assert_array_equal(a[k], b[k.replace(name, other or name, 1)], err_msg=k)


def test_a_mesh_without_every_process_is_a_clear_error_in_every_process(workers):
    (_, p0), (_, p1) = workers[0]["p0"], workers[0]["p1"]
    for info, process in ((p0, 0), (p1, 1)):
        assert set(info["errors"]) == {"first_process_only", "local_devices"}
        assert info["errors"]["first_process_only"].startswith("mesh holds devices of process(es) [0] only, but 2 ")
        assert f"process(es) [{process}] only" in info["errors"]["local_devices"]


def test_two_processes_equal_one_process_bit_for_bit(workers):
    (a0, p0), (a1, _), (ref, info) = workers[0]["p0"], workers[0]["p1"], workers[0]["ref"]
    assert (p0["devices"], p0["local_devices"], info["devices"], info["local_devices"]) == (4, 2, 4, 4)
    # R = 2 runs on 4 devices: the default mesh is 2 x 2, one "runs" row per process.
    assert p0["mesh"] == [[0, 0], [1, 1]]
    assert_equal_results(a0, a1, "full")
    assert_equal_results(a0, ref, "full")
    assert ref["full/state/4"].shape == (2, 20, 90)  # archive scores of the 2 runs, which differ
    assert not np.array_equal(ref["full/state/4"][0], ref["full/state/4"][1])
    np.testing.assert_array_equal(ref["full/passes"], [10, 20, 30, 40, 50, 60, 62])


def test_the_state_comes_back_to_every_process_as_host_arrays(workers):
    """Each process took np.asarray of every leaf (the worker would have failed otherwise)."""
    (_, p0), (_, p1), (_, ref) = workers[0]["p0"], workers[0]["p1"], workers[0]["ref"]
    assert p0["types"] == p1["types"] == {name: ["ndarray"] for name in ("full", "resumed", "time_limited")}
    assert ref["types"] == {"full": ["ArrayImpl"]}  # one process: left on the devices, as before


def test_two_processes_checkpoint_into_one_directory_and_resume_bit_for_bit(workers):
    (a0, p0), (a1, p1), (ref, _) = workers[0]["p0"], workers[0]["p1"], workers[0]["ref"]
    assert p0["saved"] == p1["saved"] == [22, 42, 62]
    assert p0["before_resume"] == p1["before_resume"] == [22]
    assert p0["after_resume"] == p1["after_resume"] == [22, 42, 62]
    # Resumed from pass 22 in 2 processes: equal to the uninterrupted run of 1 process.
    assert_equal_results(a0, ref, "resumed", "full")
    assert_equal_results(a1, ref, "resumed", "full")
    # One directory: process 0 wrote the metadata and the logs (host arrays, the same
    # in every process), each process its own shards of the state (one "runs" row each).
    step = workers[2] / "multi" / "ckpt" / "62"
    assert sorted(p.name for p in (step / "state").glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    assert sorted(p.name for p in (step / "logs").glob("ocdbt.process_*")) == ["ocdbt.process_0"]
    assert (step / "meta" / "metadata").is_file() and (step / "_CHECKPOINT_METADATA").is_file()


def test_a_time_limit_passed_on_process_0_stops_every_process(workers):
    (a0, _), (a1, _) = workers[0]["p0"], workers[0]["p1"]
    assert_equal_results(a0, a1, "time_limited")
    assert a0["time_limited/stopped"] and a1["time_limited/stopped"]
    np.testing.assert_array_equal(a0["time_limited/passes"], [7])  # after the first call of 5 steps


def test_only_process_0_shows_the_progress_bar(workers):
    err = workers[1]
    assert "M2N2: 100%" in err["p0"] and "124/124" in err["p0"]  # 2 runs x 62 passes
    assert "M2N2" not in err["p1"]
