"""Evolution from scratch on the digits task (docs/algorithm.md#from-scratch; the paper's left panel).

    python experiments/from_scratch.py --method m2n2 --runs 10 --forward-passes 50000 \
        --seed 42 --out experiments/results/from_scratch

writes OUT/METHOD.json (fields: harness.run_record). Each run starts from two
N(0, 0.01^2) random models of its own; the evosax baselines `cma-es` and `sep-cma-es`
from one, with sigma_0 = --std-init and a population of --population (the budget is
the seed plus whole generations). --time-limit bounds a run in wall seconds (for full
CMA-ES at large D): the JSON then records the passes actually spent in
`forward_passes`, the requested budget in `budget_forward_passes` and
`stopped_by_time_limit: true`.

--dataset mnist runs on real MNIST (784 inputs, D = 203,530 at hidden 256; `make mnist`
first; docs/mnist.md), --train-size N on the first N training images; full `cma-es`
is refused before any work where its D x D state does not fit in memory.

Any run can be checkpointed and resumed (orbax, atomic, no pickle):
    ... --checkpoint-every 5000            # into OUT/checkpoints/METHOD (or --checkpoint-dir)
    ... --resume OUT/checkpoints/METHOD    # same settings otherwise; ends bit-identical
"""

from __future__ import annotations

import os
import sys

# Run as a file, sys.path[0] is experiments/: the repository root replaces it, so that each module here has
# one name, experiments.NAME (a bare `import harness` fails instead of loading a second copy).
if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from experiments import harness

harness.use_cpu_devices()

import jax

from experiments import methods
from experiments.digits_protocol import Protocol, check_cma_es_memory, evolve, load_data
from m2n2_jax.tasks import digits

METHODS = tuple(m for m in methods.METHODS if m not in ("slerp-grid", methods.TASK_VECTORS))


def main(argv=None) -> dict:
    spec = harness.parse(Protocol, __doc__, argv, choices={"method": METHODS})
    check_cma_es_memory(spec)
    train, test = load_data(spec)
    num_seeds, inputs = 1 if spec.method in methods.ES else 2, train[0].shape[1]
    seed_fn = lambda key: jax.vmap(lambda k: digits.init_mlp(k, spec.hidden, inputs=inputs))(
        jax.random.split(key, num_seeds))
    return evolve(spec, "from_scratch", train, test, seed_fn=seed_fn,
                  **({"population": spec.population, "std_init": spec.std_init} if spec.method in methods.ES else {}))


if __name__ == "__main__":
    main()
