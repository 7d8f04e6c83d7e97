"""The diffusion experiment with a JA seed whose FiLM layers start from en-base's
(`Training(ja_new_conditioning=False)`: only its text encoder is new), every method and
the default settings otherwise (docs/diffusion.md, "What would change the picture").
Writes experiments/results/diffusion/explorations/shared_conditioning/diffusion.json and
its plots; its printed log is kept in experiments/results/diffusion/explorations/
shared_conditioning.log. Run from the repository root:

    python experiments/explore_diffusion_shared_conditioning.py
"""
import dataclasses
import os
import sys

# Run as a file, sys.path[0] is experiments/: the repository root replaces it, so that each module here has
# one name, experiments.NAME (a bare `import harness` fails instead of loading a second copy).
if not __package__:
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from experiments import diffusion  # (sets the CPU devices)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "diffusion", "explorations",
                   "shared_conditioning")

default_training = diffusion.Spec.training
diffusion.Spec.training = lambda self: dataclasses.replace(default_training(self), ja_new_conditioning=False)
diffusion.main(["--runs", "4", "--no-progress", "--out", OUT])
