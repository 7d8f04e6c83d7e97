"""Why the paper's M2N2 (two parameter groups) stays below m2n2-one-group and the
static slerp in experiments/diffusion.py. Three measurements on the default models
and settings (docs/diffusion.md); it prints them, and its output is kept in
experiments/results/diffusion/explorations/why_m2n2.log. Run from the repository root:

    python experiments/explore_diffusion_why_m2n2.py > experiments/results/diffusion/explorations/why_m2n2.log

1. Geometry: the cosine between the JA denoiser and each EN one, per group (the FiLM
   "conditioning" layers and the rest).
2. The two-group slerp between the JA denoiser and en-long, one ratio per group
   (w = 0: JA, 1: en-long), on a 5 x 5 grid: the training similarity and the test
   Fréchet distance of each point.
3. The archive over one run (its own key, 42) of m2n2 and of m2n2-one-group: how many
   EN seeds are left in the first 20 passes; then, every 40 passes, distinct members,
   their mean pairwise distance, and the best and worst training similarity.
"""
import os
import sys

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
from experiments import diffusion
from experiments import diffusion_protocol as dp
from m2n2_jax.tasks import diffusion as df

spec = harness.parse(diffusion.Spec, "", ["--no-progress"])
p = dp.prepare(spec)
d, ja_encoder = p.models["denoisers"], p.models["encoders"]["ja"]
groups = mj.leaf_groups(d["ja"], df.conditioning_group)  # rest = 0, conditioning = 1
names = {0: "rest", 1: "conditioning"}

print("1. cosine between the JA denoiser and each EN one, per group (norm of JA, of EN)")
for g, name in names.items():
    a = np.concatenate([np.ravel(x) for x, gi in zip(jax.tree.leaves(d["ja"]), groups) if gi == g])
    for seed in ("en-base", "en-long", "en-thick"):
        b = np.concatenate([np.ravel(x) for x, gi in zip(jax.tree.leaves(d[seed]), groups) if gi == g])
        print(f"   {name:<12} {seed:<9} cos {a @ b / np.linalg.norm(a) / np.linalg.norm(b):.3f} "
              f"(|ja| {np.linalg.norm(a):.1f}, |en| {np.linalg.norm(b):.1f})")

a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(d[s])]) for s in ("ja", "en-long"))
omega = np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
print(f"   whole vectors, ja and en-long: cos {np.cos(omega):.3f}; the one-group slerp's coefficients at w = 0.5, "
      f"sin(Omega / 2) / sin(Omega) each, sum to {2 * np.sin(omega / 2) / np.sin(omega):.3f}")


def group_norms(model):
    return {names[g]: float(np.sqrt(sum(np.sum(np.square(x)) for x, gi in zip(jax.tree.leaves(model), groups)
                                        if gi == g))) for g in names}


print("   group norms: " + "; ".join(f"{s} " + ", ".join(f"{k} {v:.1f}" for k, v in group_norms(d[s]).items())
                                   for s in ("ja", "en-long")))

print("2. two-group slerp JA -> en-long: training similarity / test Fréchet distance")
evaluate = dp.evaluator(p)
train_score = p.train_mean
merge = jax.jit(lambda w: mj.slerp(d["ja"], d["en-long"], w, 1e-6, 1.0, groups))
grid = (0.0, 0.25, 0.5, 0.75, 1.0)
print("   w_rest \\ w_conditioning " + " ".join(f"{w:>15}" for w in grid))
for w_rest in grid:
    cells = []
    for w_cond in grid:
        m = merge(jnp.asarray([w_rest, w_cond], jnp.float32))
        cells.append(f"{float(train_score(m)):.4f} / {evaluate(m, ja_encoder)['fid']:5.1f}")
    print(f"   {w_rest:<24} " + " ".join(f"{c:>15}" for c in cells))

print("3. the archive over one run (seed 42)")
for name in ("m2n2", "m2n2-one-group"):
    algo, params, seeds, score_fn = dp.algorithm(name, p, spec)
    k_init, k_run = jax.random.split(jax.random.key(42))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *seeds)
    seed_flat = np.concatenate([np.asarray(x).reshape(4, -1) for x in jax.tree.leaves(stacked)], 1)

    def seeds_left(s):
        flat = np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(s.models)], 1)[s.occupied]
        return sum(any(np.array_equal(f, seed) for f in flat) for seed in seed_flat[1:])  # the EN seeds
    state, _ = jax.jit(lambda k: mj.init_state(algo, score_fn, k, stacked, params, p.train_batch))(k_init)
    evolve = jax.jit(lambda s, k: mj.evolve(algo, score_fn, s, k, params, p.train_batch, 40))
    evolve_4 = jax.jit(lambda s, k: mj.evolve(algo, score_fn, s, k, params, p.train_batch, 4))
    for i in range(5):  # the first 20 passes after the seeds, 4 at a time
        state = evolve_4(state, jax.random.fold_in(k_run, 100 + i))
        s = jax.device_get(state)
        print(f"   {name:<15} pass {4 + 4 * (i + 1):>3}: seeds left {int(seeds_left(s))}, "
              f"occupied {int(s.occupied.sum())}, "
              f"training similarity worst {s.scores[s.occupied].mean(1).min():.4f}")
    for i in range(12):
        state = evolve(state, jax.random.fold_in(k_run, i))
        s = jax.device_get(state)
        flat = np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(s.models)], 1)[s.occupied]
        dist = np.linalg.norm(flat[:, None] - flat[None], axis=-1)[np.triu_indices(len(flat), 1)]
        print(f"   {name:<15} pass {24 + 40 * (i + 1):>3}: distinct {len(np.unique(flat, axis=0)):>2}/{len(flat)}, "
              f"mean distance {dist.mean():7.3f}, training similarity best {s.scores[s.occupied].mean(1).max():.4f} "
              f"worst {s.scores[s.occupied].mean(1).min():.4f}")
    best = jax.tree.map(lambda x: x[int(np.argmax(np.where(s.occupied, s.scores.mean(1), -1)))], s.models)
    print(f"   {name:<15} best member's group norms: " + ", ".join(f"{k} {v:.1f}" for k, v in group_norms(best).items())
          + f"; test: {', '.join(f'{k} {v:.4f}' for k, v in evaluate(best, ja_encoder).items())}")
