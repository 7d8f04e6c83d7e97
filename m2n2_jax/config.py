"""Frozen configuration of M2N2 and its ablations.

A `Config` is hashable, so it is passed to jitted functions as a static argument:
changing it recompiles, changing arrays does not.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of M2N2 (SPEC.md, "The three mechanisms").

    Attributes:
      archive_size: N, the number of models kept (>= 2).
      alpha: exponent of the resource normaliser z_j = (sum_i S[i, j])**alpha;
        0 turns competition off (plain summed score, an ordinary GA).
      attraction: sample parent B by complementarity to A (else B ~ f, like A).
      crossover: merge two parents; if False the child is a copy of parent A
        (then mutated), i.e. the "no crossover" ablations.
      split_point: use the split-point slerp; if False a plain slerp with one ratio.
      mutation_std: std of the Gaussian noise added to every child coordinate
        (0.01 from scratch, 0 when merging pre-trained models).
      slerp_eps: below this sin(Omega) the merge falls back to linear interpolation.
    """

    archive_size: int = 20
    alpha: float = 1.0
    attraction: bool = True
    crossover: bool = True
    split_point: bool = True
    mutation_std: float = 0.01
    slerp_eps: float = 1e-6

    def __post_init__(self):
        if not isinstance(self.archive_size, int) or self.archive_size < 2:
            raise ValueError(f"archive_size must be an int >= 2, got {self.archive_size!r}")
        if not self.alpha >= 0:  # also rejects NaN
            raise ValueError(f"alpha must be >= 0, got {self.alpha!r}")
        if not self.mutation_std >= 0:
            raise ValueError(f"mutation_std must be >= 0, got {self.mutation_std!r}")
        if not self.slerp_eps > 0:
            raise ValueError(f"slerp_eps must be > 0, got {self.slerp_eps!r}")
