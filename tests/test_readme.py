"""README's library example runs as written and merges two specialists into a better model."""

import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README, REAL_MODELS = os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs", "real_models.md")


def test_readme_example_runs_and_the_merge_beats_both_specialists(capsys):
    block = re.search(r"```python\n(.*?)```", open(README).read(), re.S).group(1)
    assert "mj.run(" in block
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    merged = np.asarray(namespace["result"].final_test_score)
    specialists = [float(namespace["score_fn"](m, namespace["test"]).mean())
                   for m in (namespace["model_a"], namespace["model_b"])]
    assert merged.shape == (4,)
    assert merged.min() > max(specialists), (merged, specialists)
    assert "merged:" in capsys.readouterr().out


def test_real_model_options_run_through_the_runner():
    """docs/real_models.md's block builds an M2N2 with every option; it runs (grouped
    by the tiny MLP's leaf names, which contain no "attn": one group "rest")."""
    import jax.numpy as jnp
    import problems as P

    import m2n2_jax as mj

    block = next(b for b in re.findall(r"```python\n(.*?)```", open(REAL_MODELS).read(), re.S)
                 if "attention_or_rest" in b)
    namespace = {"mj": mj, "jnp": jnp}
    exec(compile(block, "real_models.md", "exec"), namespace)
    algorithm, params = namespace["algorithm"], namespace["params"]
    assert (algorithm.capacity_rule, algorithm.subtract_worst, int(params.warmup)) == ("max", True, 50)
    result = mj.run(algorithm, P.KEYS[:1], P.score_fn, P.TRAIN, 2 + 60, params=params, seed_fn=P.seed_fn,
                    log_every=20, progress=False)
    assert int(result.state.asked[0]) == 60 and np.isfinite(result.train_score).all()
