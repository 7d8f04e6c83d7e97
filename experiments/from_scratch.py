"""Evolution from scratch on the digits task (SPEC.md; the paper's left panel).

    python experiments/from_scratch.py --method m2n2 --runs 10 --forward-passes 50000 \
        --seed 42 --out experiments/results/from_scratch

writes OUT/METHOD.json (fields: common.result_record). Each run starts from two
N(0, 0.01^2) random models of its own. The evosax baselines `cma-es` and `sep-cma-es`
start from one N(0, 0.01^2) mean with sigma_0 = --std-init and a population of
--population; their budget must be a multiple of the population. --time-limit bounds an
ES run in wall seconds (for full CMA-ES at large D): the JSON then records the passes
actually spent in `forward_passes`, the requested budget in `budget_forward_passes` and
`stopped_by_time_limit: true`.

Long M2N2-family runs can be checkpointed and resumed (orbax, atomic, no pickle):
    ... --checkpoint-every 5000            # into OUT/checkpoints/METHOD (or --checkpoint-dir)
    ... --resume OUT/checkpoints/METHOD    # same command line otherwise; ends bit-identical
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_devices import use_all_cores  # noqa: E402

use_all_cores()

import jax  # noqa: E402

import m2n2_jax as mj  # noqa: E402
from common import check_args, digits_problem, evolve, make_parser, run_keys, save  # noqa: E402
from m2n2_jax.baselines.evosax_es import STRATEGIES, run_es  # noqa: E402
from m2n2_jax.models.mlp import random_params  # noqa: E402

METHODS = mj.METHODS + tuple(STRATEGIES)


def main(argv=None) -> dict:
    parser = make_parser(__doc__, METHODS, 50_000, "experiments/results/from_scratch", 0.01)
    parser.add_argument("--population", type=int, default=20, help="ES population size")
    parser.add_argument("--std-init", type=float, default=0.01, help="ES initial step size sigma_0")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="ES only: stop after the first compiled call that ends past this many seconds")
    parser.add_argument("--generations-per-call", type=int, default=None,
                        help="ES only: generations per compiled call (granularity of wall stamps and --time-limit)")
    args = parser.parse_args(argv)
    check_args(args, METHODS)
    model, score_fn, train, test, descriptor_fn = digits_problem(args.hidden)
    input_dim = train[0].shape[1]
    if args.method in STRATEGIES:
        if args.checkpoint_every is not None or args.resume is not None:
            raise SystemExit("error: checkpointing (--checkpoint-every/--resume) is for the M2N2-family methods")
        init_fn = lambda key: random_params(key, model, input_dim)
        try:
            result = run_es(run_keys(args.seed, args.runs), args.method, init_fn, score_fn, train,
                            args.forward_passes, population_size=args.population, std_init=args.std_init,
                            test_data=test, log_every=args.log_every, generations_per_call=args.generations_per_call,
                            time_limit=args.time_limit, progress=not args.no_progress)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        return save(args, "from_scratch", result, population=args.population, std_init=args.std_init,
                    budget_forward_passes=args.forward_passes,
                    stopped_by_time_limit=bool(result.passes[-1] < args.forward_passes))
    seed_models = lambda key: jax.vmap(lambda k: random_params(k, model, input_dim))(jax.random.split(key, 2))
    return evolve(args, "from_scratch", seed_models, score_fn, train, test, descriptor_fn)


if __name__ == "__main__":
    main()
