"""The diffusion experiment with a JA seed whose FiLM layers start from en-base's
(`Training(ja_new_conditioning=False)`: only its text encoder is new), every method and
the default settings otherwise (docs/diffusion.md, "What would change the picture").
Writes shared_conditioning/diffusion.json and its plots; log in shared_conditioning.log.
Run from the repository root:

    python experiments/results/diffusion/explorations/shared_conditioning.py
"""
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
import diffusion  # noqa: E402  (sets the CPU devices)

default_training = diffusion.Spec.training
diffusion.Spec.training = lambda self: dataclasses.replace(default_training(self), ja_new_conditioning=False)
diffusion.main(["--runs", "4", "--no-progress", "--out", os.path.join(os.path.dirname(__file__), "shared_conditioning")])
