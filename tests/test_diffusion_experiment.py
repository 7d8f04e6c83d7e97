"""experiments/diffusion.py: its command line and JSON fields are a contract, and a
short run of every method executes."""

import json

import numpy as np
import pytest

from experiments import diffusion
from experiments import diffusion_protocol as dp

TINY = ["--hidden", "16", "--batch", "16", "--classifier-steps", "5", "--base-steps", "5", "--long-steps", "3",
        "--thick-steps", "3", "--ja-steps", "3", "--runs", "2", "--forward-passes", "30", "--population", "4",
        "--archive-size", "5", "--warmup", "2", "--train-captions", "6", "--sampling-steps", "2", "--log-every", "10",
        "--no-progress"]


def test_every_method_runs_and_the_json_contract_holds(tmp_path):
    record = diffusion.main(TINY + ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    on_disk = json.loads((tmp_path / "out" / "diffusion.json").read_text())
    methods = [*dp.SEEDS, *dp.METHODS]
    assert set(dp.METHODS) >= {"m2n2", "cma-es", "ga", "m2n2-no-attraction", "m2n2-no-splitpoint", "m2n2-one-group"}
    assert dp.SEEDS == ("seed-ja", "seed-en-base", "seed-en-long", "seed-en-thick")
    for metric in ("test_ncs", "fid", "digit_accuracy", "en_test_ncs", "cross_lingual"):
        assert list(on_disk[metric]) == methods
        for method in methods:
            entry = on_disk[metric][method]
            assert len(entry["runs"]) == 2 and entry["mean"] == pytest.approx(np.mean(entry["runs"]))
            assert entry["stderr"] == pytest.approx(np.std(entry["runs"], ddof=1) / np.sqrt(2))
            if metric != "fid":
                assert all(0 <= v <= 1 for v in entry["runs"])
    assert on_disk["test_ncs"] == record["test_ncs"]
    assert record["seeds"] == [42, 43] and record["forward_passes"] == 30 and record["train_captions"] == 6
    for name in dp.EVOLUTIONARY:  # CMA-ES spends whole generations of 4 after the 4 seeds
        assert record["curves"][name]["forward_passes"][-1] == (28 if name == "cma-es" else 30)
    assert set(record["coefficients"]) == set(dp.OPERATORS)
    assert record["training"]["base_steps"] == 5 and "total" in record["wall_seconds"]
    for png in ("diffusion_samples.png", "diffusion_bars.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    samples = np.load(tmp_path / "out" / "diffusion_samples.npz")
    assert sorted(samples.files) == sorted(f"{m}/{lang}" for m in methods for lang in ("ja", "en"))
    assert samples["m2n2/ja"].shape == (10, 64) and np.abs(samples["m2n2/ja"]).max() <= 1


@pytest.mark.parametrize("argv, message", [
    (["--forward-passes", "10"], "--forward-passes must be >= 4 seeds"),
    (["--methods", "m2n2", "nope"], "unknown --methods"),
    (["--train-captions", "5000"], "at most the 1,437"),
    (["--runs", "0"], "--runs must be > 0"),
])
def test_refused_runs_exit_2_with_one_line_and_touch_nothing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        diffusion.main(argv + ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
