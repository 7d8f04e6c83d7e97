"""The experiment scripts' command lines and JSON fields are a contract: check them."""

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from experiments import from_scratch, plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
MODULES = sorted(name[:-3] for name in os.listdir(EXPERIMENTS) if name.endswith(".py") and name != "__init__.py")
CONTRACT = {"method", "forward_passes", "runs", "seeds", "final_test_accuracy", "final_train_accuracy",
            "curve", "wall_seconds", "jax_version", "device", "machine"}


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
    assert {"processor", "versions"} <= set(record["machine"]) and record["machine"]["versions"]["jax"]
    plot.main([str(tmp_path)])
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert len(record["curve"]["wall_seconds"]) == 2
    plot.main([str(tmp_path), "--time"])
    assert (tmp_path / "time_to_accuracy.png").stat().st_size > 1000


BAD = [
    (["--method", "nope"], "invalid choice"),
    (["--method", "brute-force"], "error: argument --method: method 'brute-force' is now called 'slerp-grid'"),
    (["--method", "slerp-cma-es"], "method 'slerp-cma-es' is now called 'cma-es-slerp'"),
    (["--runs", "0"], "--runs must be > 0"),
    (["--runs", "-3"], "--runs must be > 0"),
    (["--forward-passes", "0"], "--forward-passes must be > 0"),
    (["--archive-size", "1"], "--archive-size must be >= 2"),
    (["--hidden", "0"], "--hidden must be > 0"),
    (["--log-every", "0"], "--log-every must be > 0"),
    (["--mutation-std", "-0.1"], "--mutation-std must be >= 0"),
    (["--mutation-std", "nan"], "--mutation-std must be >= 0"),
    (["--std-init", "0"], "--std-init must be > 0"),
    (["--population", "1"], "--population must be >= 2"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be > 0"),
    (["--time-limit", "0"], "--time-limit must be > 0"),
    (["--generations-per-call", "0"], "--generations-per-call must be > 0"),
    (["--forward-passes", "2"], "forward_passes must be an int >= seeds"),  # refused by the runner
    (["--method", "cma-es", "--forward-passes", "15"], "forward_passes must be an int >= seeds"),
    (["--resume", "/nonexistent/dir"], "no such checkpoint directory"),
]


def test_refused_runs_exit_with_one_line_and_leave_results_untouched(tmp_path, capsys):
    """Every value is checked before any work; a refused run never touches OUT/METHOD.json."""
    out = tmp_path / "m2n2.json"
    out.write_text('{"earlier": "result"}')
    for method in ("m2n2", "cma-es"):
        (tmp_path / f"{method}.json").write_text('{"earlier": "result"}')
    digest = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    for argv, message in BAD:
        with pytest.raises(SystemExit) as e:
            from_scratch.main(["--out", str(tmp_path), "--no-progress", "--hidden", "8"] + argv)
        error = str(e.value) if e.value.code not in (0, 2) else capsys.readouterr().err
        assert message in error, (argv, error)
        assert e.value.code != 0
    assert {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()} == digest


def test_from_scratch_runs_the_evosax_baselines_with_a_time_limit(tmp_path):
    record = from_scratch.main(["--method", "sep-cma-es", "--runs", "2", "--forward-passes", "201",
                                "--population", "20", "--out", str(tmp_path), "--hidden", "8", "--no-progress"])
    assert CONTRACT <= set(record) and record["curve"]["forward_passes"] == [101, 201]
    assert record["population"] == 20 and record["std_init"] == 0.01 and not record["stopped_by_time_limit"]
    stopped = from_scratch.main(["--method", "sep-cma-es", "--runs", "2", "--forward-passes", "2001",
                                 "--time-limit", "1e-3", "--generations-per-call", "2", "--out", str(tmp_path),
                                 "--hidden", "8", "--no-progress"])
    assert stopped["stopped_by_time_limit"] and stopped["forward_passes"] == 41
    assert stopped["budget_forward_passes"] == 2001


def test_experiment_modules_are_imported_by_one_name():
    """Scripts, tests and benchmarks import experiment code as `experiments.NAME`, never as
    the top-level NAME (two module objects of one file, e.g. two harnesses, in one process)."""
    bare = re.compile(rf"^\s*(import|from) ({'|'.join(MODULES)})\b", re.MULTILINE)
    offenders = []
    for folder in ("experiments", "tests", "benchmarks"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                with open(os.path.join(ROOT, folder, name)) as f:
                    offenders += [f"{folder}/{name}: {m.group(0).strip()}" for m in bare.finditer(f.read())]
    assert not offenders, offenders


def test_a_script_run_as_a_file_loads_each_experiment_module_once():
    """`python experiments/from_scratch.py` (sys.path[0] = experiments/) imports harness,
    methods and digits_protocol as experiments.NAME only (-X importtime lists every import)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-X", "importtime", "experiments/from_scratch.py", "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--method" in proc.stdout, proc.stderr[-4000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert {"experiments.harness", "experiments.methods", "experiments.digits_protocol"} <= imported
    assert not imported & set(MODULES), sorted(imported & set(MODULES))
