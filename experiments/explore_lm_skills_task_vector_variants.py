"""Variants of M2N2's task-vector mode on pair (a), 2 runs (seeds 42, 43) x 1,000
evaluations, 120 addition / 40 reversal training questions, union norm unless a
variant says otherwise; printed lines are kept in
experiments/results/lm_skills/explorations/task_vector_variants.log (docs/lm_skills.md,
"How the task-vector mode was settled"). Run from the repository root, e.g.

    python experiments/explore_lm_skills_task_vector_variants.py "std=0.1" "weighted=True"

"weighted" sets M2N2's capacities to lm_protocol.question_weights (each skill an equal
share; now the protocol's default). The "refine" variants used `refine_rate` of M2N2's
params (then `mj.Params`, now `mj.M2N2Params`; a share of children that rescale parent
A's task vector instead of merging), an option removed after these runs; with the
current library they fail (the other variants run).
"""
import os
import sys
import time

# Run as a file, sys.path[0] is experiments/: the repository root replaces it, so that each module here has
# one name, experiments.NAME (a bare `import harness` fails instead of loading a second copy).
if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from experiments import harness

harness.use_cpu_devices(single_threaded_ops=True)

import jax
import jax.numpy as jnp
import numpy as np

import m2n2_jax as mj
from experiments import lm_analysis, lm_protocol, lm_skills
from experiments.lm_models import load_or_train, make_model
from m2n2_jax.tasks import skills
from m2n2_jax.tasks.transformer import mixed_scores, per_skill_batch

spec = lm_skills.Spec(runs=2, pairs=("a",))
training = spec.training()["a"]
names = training.specialists
train, test, tp = lm_analysis.skill_sets(names, spec.train_questions, spec.test_questions, spec.data_seed)
t = load_or_train(training, tp, spec.cache)
models = {"base": t["base"], "specialist_a": t[names[0]], "specialist_b": t[names[1]]}
model = make_model(training)
evaluate = lm_analysis.skill_evaluator(model, train, test)
scorers = {s: skills.SCORERS[s] for s in names}
trb, teb = per_skill_batch(train, scorers), per_skill_batch(test, scorers)
sop = np.concatenate([np.full(len(train[s][0]), i) for i, s in enumerate(names)])
W = lm_protocol.skill_weights(sop)
TW = lm_protocol.skill_weights(np.concatenate([np.full(len(test[s][0]), i) for i, s in enumerate(names)]))
score_fn = mixed_scores(model)
keys = harness.run_keys(42, 2)
for variant in sys.argv[1:]:
    kw = dict(eval("dict(" + variant + ")"))
    std = kw.pop("std", 0.05)
    warm = kw.pop("warmup", 50)
    alpha = kw.pop("alpha", 1.0)
    refine = kw.pop("refine", 0.0)
    weighted = kw.pop("weighted", False)
    algo = mj.M2N2(archive_size=15, mutation=False, capacity_rule="max", task_vectors=True,
                   groups=lm_analysis.transformer_unit, **{"task_vector_norm": "union", **kw})
    params = algo.default_params().replace(warmup=jnp.int32(warm), base=models["base"],
                                           magnitude_std=jnp.float32(std), alpha=jnp.float32(alpha),
                                             **({"refine_rate": jnp.float32(refine)} if refine else {}))
    if weighted:
        params = params.replace(capacity=W.sum(1) * W.shape[0] / W.shape[1])
    t0 = time.perf_counter()
    res = mj.run(algo, keys, score_fn, trb, 1000, params=params,
                 seed_models=[models["specialist_a"], models["specialist_b"]],
                 test_data=teb, log_every=250, progress=False,
                 metrics_fn=lm_protocol.skill_metrics(algo, score_fn, trb, W, TW))
    pick = jax.jit(lambda s: lm_protocol.returned_model(algo, s, params, score_fn, trb, W)[0])
    sc = [evaluate(pick(jax.tree.map(lambda x: x[r], res.state))) for r in range(2)]
    print(variant, "test", [round(100*np.mean(list(s["test"].values())),1) for s in sc],
          [ {k: round(100*v,1) for k,v in s["test"].items()} for s in sc],
          "train", [round(100*np.mean(list(s["train"].values())),1) for s in sc],
          "curve", np.round(res.train_score.mean(0),3).tolist(), f"{time.perf_counter()-t0:.0f}s", flush=True)
