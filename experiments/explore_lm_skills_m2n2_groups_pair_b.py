"""Why M2N2 stays below CMA-ES-slerp on pair (b): the same m2n2 as lm_skills.py
(4 runs, seeds 42-45, 1,000 evaluations, default protocol), but with one merge ratio
and split point per layer unit (`M2N2(groups=lm_analysis.transformer_unit)`, the
structure CMA-ES-slerp has). Prints the test mean of the two skills per run; its output
is kept in experiments/results/lm_skills/explorations/m2n2_groups_pair_b.log
(docs/lm_skills.md). Run from the repository root:

    python experiments/explore_lm_skills_m2n2_groups_pair_b.py
"""
import dataclasses
import os
import sys
import time

# Run as a file, sys.path[0] is experiments/: the repository root replaces it, so that each module here has
# one name, experiments.NAME (a bare `import harness` fails instead of loading a second copy).
if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from experiments import harness

harness.use_cpu_devices(single_threaded_ops=True)

import numpy as np

from experiments import lm_analysis, lm_protocol, lm_skills

spec = lm_skills.Spec(pairs=("b",))
p = lm_protocol.prepare(spec.training()["b"], spec)
algo, params, seeds = lm_protocol.algorithm("m2n2", p.models, p.skill_of_point, spec)
algo = dataclasses.replace(algo, groups=lm_analysis.transformer_unit)
t0 = time.perf_counter()
_, scores = lm_protocol.run_evolutionary("m2n2", algo, params, seeds, p, spec)
for r, s in enumerate(scores):
    print(f"run {r}: test {s['test']}, mean {np.mean(list(s['test'].values())):.4f}; "
          f"train mean {np.mean(list(s['train'].values())):.4f}")
means = [np.mean(list(s["test"].values())) for s in scores]
print(f"m2n2 with per-unit groups, pair b: test mean of skills {100 * np.mean(means):.1f} % "
      f"(stderr {100 * np.std(means, ddof=1) / np.sqrt(len(means)):.1f}), {time.perf_counter() - t0:.0f} s")
