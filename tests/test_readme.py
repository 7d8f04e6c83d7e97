"""README's library example runs as written and merges two specialists into a better model."""

import os
import re

import numpy as np

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_example_runs_and_the_merge_beats_both_specialists(capsys):
    block = re.search(r"```python\n(.*?)```", open(README).read(), re.S).group(1)
    assert "mj.run(" in block
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    merged = np.asarray(namespace["result"].final_test_accuracy)
    specialists = [float(namespace["score_fn"](m, namespace["test"]).mean())
                   for m in (namespace["model_a"], namespace["model_b"])]
    assert merged.shape == (4,)
    assert merged.min() > max(specialists), (merged, specialists)
    assert "merged:" in capsys.readouterr().out
