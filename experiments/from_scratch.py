"""Evolution from scratch on the digits task (SPEC.md; the paper's left panel).

    python experiments/from_scratch.py --method m2n2 --runs 10 --forward-passes 50000 \
        --seed 42 --out experiments/results/from_scratch

writes OUT/METHOD.json (fields: common.result_record). Each run starts from two
N(0, 0.01^2) random models of its own.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_devices import use_all_cores  # noqa: E402

use_all_cores()

import jax  # noqa: E402

import m2n2_jax as mj  # noqa: E402
from common import check_args, digits_problem, evolve, make_parser  # noqa: E402
from m2n2_jax.models.mlp import random_params  # noqa: E402


def main(argv=None) -> dict:
    args = make_parser(__doc__, mj.METHODS, 50_000, "experiments/results/from_scratch", 0.01).parse_args(argv)
    check_args(args, mj.METHODS)
    model, score_fn, train, test, descriptor_fn = digits_problem(args.hidden)
    input_dim = train[0].shape[1]
    seed_models = lambda key: jax.vmap(lambda k: random_params(k, model, input_dim))(jax.random.split(key, 2))
    return evolve(args, "from_scratch", seed_models, score_fn, train, test, descriptor_fn)


if __name__ == "__main__":
    main()
