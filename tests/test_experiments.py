"""The experiment scripts' command lines and JSON fields are a contract: check them."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

import from_scratch  # noqa: E402
import plot  # noqa: E402

CONTRACT = {"method", "forward_passes", "runs", "seeds", "final_test_accuracy", "final_train_accuracy",
            "curve", "wall_seconds", "jax_version", "device"}


def test_from_scratch_writes_the_json_contract_and_plot_draws_it(tmp_path):
    for method in ("m2n2", "map-elites"):
        from_scratch.main(["--method", method, "--runs", "2", "--forward-passes", "120", "--seed", "42",
                           "--out", str(tmp_path), "--hidden", "16", "--no-progress"])
    record = json.loads((tmp_path / "m2n2.json").read_text())
    assert CONTRACT <= set(record)
    assert record["seeds"] == [42, 43] and record["runs"] == 2 and record["forward_passes"] == 120
    assert len(record["final_test_accuracy"]) == 2
    assert set(record["curve"]) >= {"forward_passes", "test_accuracy_mean", "test_accuracy_stderr"}
    assert record["curve"]["forward_passes"] == [100, 120]
    plot.main([str(tmp_path)])
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert len(record["curve"]["wall_seconds"]) == 2
    plot.main([str(tmp_path), "--time"])
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method"),
    (["--runs", "0"], "--runs"),
    (["--forward-passes", "1"], "forward_passes"),
    (["--archive-size", "1"], "archive_size"),
])
def test_from_scratch_rejects_bad_arguments(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        from_scratch.main(argv + ["--out", str(tmp_path), "--no-progress", "--hidden", "8"])


def test_from_scratch_runs_the_evosax_baselines(tmp_path):
    record = from_scratch.main(["--method", "sep-cma-es", "--runs", "2", "--forward-passes", "200", "--population", "20",
                                "--out", str(tmp_path), "--hidden", "8", "--no-progress"])
    assert CONTRACT <= set(record) and record["curve"]["forward_passes"] == [100, 200]
    assert record["population"] == 20 and record["std_init"] == 0.01
    with pytest.raises(SystemExit, match="multiple of the population"):
        from_scratch.main(["--method", "cma-es", "--forward-passes", "210", "--out", str(tmp_path),
                           "--hidden", "8", "--no-progress"])
