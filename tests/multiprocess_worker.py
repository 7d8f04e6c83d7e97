"""One process of tests/test_multiprocess.py: the same runs on 2 processes x 2 CPU
devices (jax.distributed over loopback, gloo collectives) or, as the reference, on
1 process x 4 devices.

    python multiprocess_worker.py OUT PROCESS_ID NUM_PROCESSES PORT CACHE

R = 2 runs of M2N2, fewer than the 4 devices, on the default mesh: 2 x 2, one "runs"
row per process, so the final state is sharded over both processes (np.asarray of it
raised before `run` gathered it) and each process writes its own row to the
checkpoints. One program is compiled per process (a second mesh would double the
test's time). Writes OUT/p{PROCESS_ID}.npz (every result's arrays, taken with
np.asarray) and OUT/p{PROCESS_ID}.json; checkpoints go to OUT/ckpt, one directory
shared by the processes.
"""

import json
import os
import shutil
import sys
import time
import types

import jax

START = time.perf_counter()
OUT, PID, NPROC, PORT, CACHE = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
jax.config.update("jax_num_cpu_devices", 4 // NPROC)
jax.config.update("jax_compilation_cache_dir", CACHE)  # the suite's (conftest)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
if NPROC > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}", num_processes=NPROC, process_id=PID)

import numpy as np
import problems as P
from jax.experimental import multihost_utils

import m2n2_jax as mj
from experiments import methods
from m2n2_jax import runner
from m2n2_jax.sharding import default_mesh

ALGO, PARAMS = methods.make_method("m2n2", P.SETTINGS)
CKPT = os.path.join(OUT, "ckpt")
KEYS = P.KEYS[:2]
PASSES = 62  # 2 seeds, then 60 steps of one child: 12 calls of 5 steps


def evolve(mesh=None, progress=False, **kw):
    return mj.run(ALGO, KEYS, P.score_fn, P.TRAIN, PASSES, params=PARAMS, seed_fn=P.seed_fn, test_data=P.TEST,
                  log_every=10, steps_per_call=5, mesh=mesh, progress=progress, **kw)


def keep(name, result):
    """Every array of `result` under name/...; np.asarray must work in every process."""
    arrays[f"{name}/passes"] = result.passes
    arrays[f"{name}/stopped"] = np.bool_(result.stopped_by_time_limit)
    for k, v in result.metrics.items():
        arrays[f"{name}/metrics/{k}"] = np.asarray(v)
    info.setdefault("types", {})[name] = sorted({type(x).__name__ for x in jax.tree.leaves(result.state)})
    for i, x in enumerate(jax.tree.leaves(result.state)):
        arrays[f"{name}/state/{i}"] = np.asarray(x)
    for i, x in enumerate(jax.tree.leaves(result.best_models)):
        arrays[f"{name}/best/{i}"] = np.asarray(x)
    say(f"{name} run returned")


def say(what):
    """A time-stamped line on stdout: the test shows it when a process fails or hangs."""
    print(f"{time.perf_counter() - START:7.1f} s  process {PID}: {what}", flush=True)


def steps(directory):
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


say(f"started, {len(jax.devices())} devices")
info = {"devices": len(jax.devices()), "local_devices": len(jax.local_devices()),
        "mesh": [[d.process_index for d in row] for row in default_mesh(len(KEYS)).devices[..., 0]]}
arrays = {}
if NPROC > 1:  # meshes that leave a process out: a clear error in every process, not a hang
    info["errors"] = {}
    for name, devices in (("first_process_only", jax.devices()[:2]), ("local_devices", jax.local_devices())):
        try:
            evolve(mesh=default_mesh(len(KEYS), devices))
        except ValueError as e:
            info["errors"][name] = str(e)

# Checkpoints at 22, 42 and 62 passes (every 20), the progress bar on.
keep("full", evolve(progress=True, checkpoint=mj.Checkpointing(CKPT, every=20, keep=10)))
info["saved"] = steps(CKPT)

if NPROC > 1:
    # Resume from pass 22, as if the run had died there.
    multihost_utils.sync_global_devices("saved")
    if PID == 0:
        for later in (42, 62):
            shutil.rmtree(os.path.join(CKPT, str(later)))
    multihost_utils.sync_global_devices("deleted")
    info["before_resume"] = steps(CKPT)
    keep("resumed", evolve(checkpoint=mj.Checkpointing(CKPT, every=20, keep=10, resume=True)))
    info["after_resume"] = steps(CKPT)
    # A time limit that only process 0's clock passes (a clock a million times fast):
    # every process must stop with it after the first call (pass 7).
    if PID == 0:
        runner.time = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() * 1e6)
    keep("time_limited", evolve(time_limit=1000.0))
    runner.time = time

np.savez(os.path.join(OUT, f"p{PID}.npz"), **arrays)
with open(os.path.join(OUT, f"p{PID}.json"), "w") as f:
    json.dump(info, f)
