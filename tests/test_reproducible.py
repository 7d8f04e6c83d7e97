"""The same seeds give the same run, bit for bit, in fresh processes with other thread settings.

Two fresh Python processes run the same small M2N2 run on the tiny problem of
tests/problems.py (3 runs of 200 passes from the same keys and seed models) side by
side: one with the default threading, the other with XLA's Eigen thread pool off, one
OpenMP/BLAS thread and pinned to one core (taskset, where available). Each saves its
final archive, best models and curves with np.savez; every array must be identical.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    import jax.numpy as jnp
    import numpy as np
    import m2n2_jax as mj
    import problems as P
    from experiments import methods

    algo, params = methods.make_method("m2n2", P.SETTINGS)
    models = [P.init_model(jax.random.key(i)) for i in range(2)]
    r = mj.run(algo, P.KEYS, P.score_fn, P.TRAIN, 200, params=params, seed_models=models, log_every=20,
               progress=False)
    out = {"passes": r.passes, **{"metrics/" + k: v for k, v in r.metrics.items()}}
    out.update({f"state/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(r.state))})
    out.update({f"best/{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(r.best_models))})
    np.savez(sys.argv[1], **out)
""")


def test_same_seeds_same_bits_in_fresh_processes_with_other_thread_settings(tmp_path):
    base = {**os.environ,
            "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    base.pop("XLA_FLAGS", None)
    single = {**base, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
              "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if shutil.which("taskset") else []
    outs = [str(tmp_path / "default.npz"), str(tmp_path / "one_thread.npz")]
    procs = [subprocess.Popen(prefix + [sys.executable, "-c", SCRIPT, out], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for prefix, env, out in (([], base, outs[0]), (pin, single, outs[1]))]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    a, b = (dict(np.load(out)) for out in outs)
    assert a.keys() == b.keys() and {"passes", "metrics/train_score", "state/0", "best/0"} <= a.keys()
    np.testing.assert_array_equal(a["passes"], np.arange(20, 201, 20))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), f"{k} differs between the two processes"
    # Something happened: the archive holds children beyond the 2 seeds, and runs differ.
    scores = a["state/4"]  # Archive leaves: 4 parameter arrays, then scores (R, N, M), occupied
    assert scores.shape == (3, 20, 90) and a["state/5"].all()
    assert not np.array_equal(scores[0], scores[1])
