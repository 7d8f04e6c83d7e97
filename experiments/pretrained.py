"""Merging two pre-trained specialists on digits (docs/algorithm.md#pretrained; the paper's right panel).

    python experiments/pretrained.py --method m2n2 --runs 10 --forward-passes 10000 \
        --seed 42 --out experiments/results/pretrained

The archive starts from the specialist on digits 0-4 and the one on 5-9
(experiments/specialists.py, cached with orbax); no method mutates. `slerp-grid`
scores --forward-passes evenly spaced slerp ratios between the two specialists (the
ends are the specialists) and keeps the best on training data (identical in every run).
`cma-es-slerp` is the paper's LLM baseline in miniature: CMA-ES over one slerp ratio
per layer between the two specialists (2 coefficients; --population, --std-init).
Writes OUT/METHOD.json with the fields of experiments/from_scratch.py. --dataset mnist
(and --train-size) as there; the paper's starting models are 64-input, so MNIST needs
--specialist-init key.
"""

from __future__ import annotations

import dataclasses
import os
import sys

# Run as a file, sys.path[0] is experiments/: the repository root replaces it, so that each module here has
# one name, experiments.NAME (a bare `import harness` fails instead of loading a second copy).
if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from experiments import harness

harness.use_cpu_devices()

from experiments.digits_protocol import Protocol, evolve, load_data
from experiments.harness import POSITIVE, flag
from experiments.specialists import CACHE, HALVES, label_accuracy, load_or_train
from m2n2_jax.tasks import digits

METHODS = ("m2n2", "m2n2-no-attraction", "m2n2-no-splitpoint", "ga", "map-elites", "slerp-grid", "cma-es-slerp")


@dataclasses.dataclass(frozen=True)
class Pretrained(Protocol):
    train_steps: int = flag(10, "Adam steps of each specialist (the paper: 10)", POSITIVE)
    specialist_init: str = flag("paper", "the paper's exact starting models, or a draw from --specialist-seed",
                                choices=("paper", "key"))
    specialist_seed: int = flag(0, "seed of the specialists' starting models with --specialist-init key")
    cache: str = flag(CACHE, "where the trained specialists are kept (orbax)", result=False)

    def __post_init__(self):
        if self.dataset != "digits" and self.specialist_init == "paper":
            raise ValueError(f"--dataset {self.dataset} needs --specialist-init key: "
                             "the paper's starting models are 64-input (digits)")


def main(argv=None) -> dict:
    spec = harness.parse(Pretrained, __doc__, argv, choices={"method": METHODS}, defaults={
        "forward_passes": 10_000, "out": "experiments/results/pretrained", "mutation_std": 0.0})
    train, test = load_data(spec)
    data = "_".join(([] if spec.dataset == "digits" else [spec.dataset])
                    + ([] if spec.train_size is None else [f"n{spec.train_size}"]))
    specialists = load_or_train(train, spec.hidden, steps=spec.train_steps, init=spec.specialist_init,
                                seed=spec.specialist_seed, cache=spec.cache, data=data)
    info = {
        "train_steps": spec.train_steps,
        "specialist_init": spec.specialist_init if spec.specialist_init == "paper" else f"key {spec.specialist_seed}",
        "specialists_test_accuracy": [float(digits.classification_scores(s, test).mean()) for s in specialists],
        "specialists_half_test_accuracy": [[label_accuracy(s, test, h) for h in HALVES] for s in specialists],
    }
    return evolve(spec, "pretrained", train, test, seed_models=specialists, **info)


if __name__ == "__main__":
    main()
