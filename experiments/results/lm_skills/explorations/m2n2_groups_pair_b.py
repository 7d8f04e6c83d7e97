"""Why M2N2 stays below CMA-ES-slerp on pair (b): the same m2n2 as lm_skills.py
(4 runs, seeds 42-45, 1,000 evaluations, default protocol), but with one merge ratio
and split point per layer unit (`M2N2(groups=lm_analysis.transformer_unit)`, the
structure CMA-ES-slerp has). Prints the test mean of the two skills per run; output in
m2n2_groups_pair_b.log (docs/lm_skills.md). Run from the repository root:

    python experiments/results/lm_skills/explorations/m2n2_groups_pair_b.py
"""
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
import harness  # noqa: E402

harness.use_cpu_devices(single_threaded_ops=True)
import jax  # noqa: E402
import numpy as np  # noqa: E402

import lm_analysis  # noqa: E402
import lm_protocol  # noqa: E402
import lm_skills  # noqa: E402
import m2n2_jax as mj  # noqa: E402
from lm_models import load_or_train, make_model  # noqa: E402
from m2n2_jax.tasks import skills  # noqa: E402
from m2n2_jax.tasks.transformer import mixed_scores, per_skill_batch  # noqa: E402

spec = lm_skills.Spec(pairs=("b",))
training = spec.training()["b"]
names = training.specialists
train, test, test_prompts = lm_analysis.skill_sets(names, spec.train_questions, spec.test_questions, spec.data_seed)
trained = load_or_train(training, test_prompts, spec.cache)
models = {"base": trained["base"], "specialist_a": trained[names[0]], "specialist_b": trained[names[1]]}
model = make_model(training)
evaluate = lm_analysis.skill_evaluator(model, train, test)
scorers = {s: skills.SCORERS[s] for s in names}
train_batch, test_batch = per_skill_batch(train, scorers), per_skill_batch(test, scorers)
skill_of_point = np.concatenate([np.full(len(train[s][0]), i) for i, s in enumerate(names)])
weights = lm_protocol.skill_weights(skill_of_point)
test_weights = lm_protocol.skill_weights(np.concatenate([np.full(len(test[s][0]), i) for i, s in enumerate(names)]))
score_fn = mixed_scores(model)
algo, params, seeds = lm_protocol.algorithm("m2n2", models, skill_of_point, spec)
algo = dataclasses.replace(algo, groups=lm_analysis.transformer_unit)
t0 = time.perf_counter()
result = mj.run(algo, harness.run_keys(spec.seed, spec.runs), score_fn, train_batch, spec.forward_passes,
                params=params, seed_models=seeds, test_data=test_batch, log_every=spec.log_every, progress=False,
                metrics_fn=lm_protocol.skill_metrics(algo, score_fn, train_batch, weights, test_weights))
pick = jax.jit(lambda state: lm_protocol.returned_model(algo, state, score_fn, train_batch, weights)[0])
scores = [evaluate(pick(jax.tree.map(lambda x: x[r], result.state))) for r in range(spec.runs)]
for r, s in enumerate(scores):
    print(f"run {r}: test {s['test']}, mean {np.mean(list(s['test'].values())):.4f}; "
          f"train mean {np.mean(list(s['train'].values())):.4f}")
means = [np.mean(list(s["test"].values())) for s in scores]
print(f"m2n2 with per-unit groups, pair b: test mean of skills {100 * np.mean(means):.1f} % "
      f"(stderr {100 * np.std(means, ddof=1) / np.sqrt(len(means)):.1f}), {time.perf_counter() - t0:.0f} s")
