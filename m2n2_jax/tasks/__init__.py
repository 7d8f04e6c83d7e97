"""Tasks used by the experiments: data, models and scores.

Nothing in the core package imports this subpackage; import it explicitly
(`from m2n2_jax.tasks import digits`). Its modules may need the `experiments` extra.
"""
