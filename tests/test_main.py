"""Tests of Main.py: config validation, clear errors, and one end-to-end run on real data."""

import csv
import json
import pathlib
import subprocess
import sys

import pytest

import Main

ROOT = pathlib.Path(Main.__file__).resolve().parent


def config_with(**overrides):
    return {**Main.default_config(), **overrides}


def test_the_defaults_are_the_seeds_and_valid():
    config = Main.validate_config(Main.default_config())
    assert (config["NUM_CLIENTS"], config["ROUNDS"], config["CLIENT_FRACTION"]) == (100, 100, 0.3)
    assert (config["LOCAL_EPOCHS"], config["BATCH_SIZE"], config["LEARNING_RATE"]) == (1, 32, 0.01)
    assert config["DISTRIBUTION"] == "noniid_ib" and config["SEED"] == 0


@pytest.mark.parametrize("name, value", [
    ("NUM_CLIENTS", 0), ("NUM_CLIENTS", 2.0), ("ROUNDS", 0), ("ROUNDS", True),
    ("CLIENT_FRACTION", 0.0), ("CLIENT_FRACTION", 1.5), ("LOCAL_EPOCHS", 0), ("BATCH_SIZE", -1),
    ("LEARNING_RATE", -0.1), ("LEARNING_RATE", 0), ("LEARNING_RATE", float("nan")),
    ("LOCAL_MOMENTUM", 1.0), ("DISTRIBUTION", "non-iid"), ("MAX_SAMPLE_SHARE", 0),
    ("CLASSES_PER_CLIENT", 11), ("DIRICHLET_ALPHA", 0), ("SHARDS_PER_CLIENT", 0), ("SEED", -1),
    ("SEED", "0"), ("OUTPUT_DIR", "")])
def test_validate_config_names_the_bad_constant(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        Main.validate_config(config_with(**{name: value}))


def write_config(path, **constants):
    lines = ["param,val"] + [f"{name},{value}" for name, value in constants.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("constants, message", [
    ({"ROUNDZ": 3}, "unknown parameter 'ROUNDZ'"),
    ({"CLIENT_FRACTION": 2}, "CLIENT_FRACTION must be a number in (0, 1]"),
    ({"DISTRIBUTION": "pathological"}, "DISTRIBUTION must be one of"),
    ({"DATA_DIR": "/nonexistent/fmnist"}, "DATA_DIR /nonexistent/fmnist lacks"),
])
def test_bad_input_gives_one_line_and_exit_code_two(tmp_path, capsys, constants, message):
    path = write_config(tmp_path / "bad.csv", OUTPUT_DIR=tmp_path / "out", **constants)
    assert Main.main(["-c", "-f", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert error.count("\n") == 1 and "Traceback" not in error


def test_main_reports_a_missing_config_file(tmp_path, capsys):
    assert Main.main(["-c", "-f", str(tmp_path / "none.csv")]) == 2
    assert "none.csv not found" in capsys.readouterr().err


def run_main(tmp_path, output_name):
    """Run Main.py as a user would, on the real data with a tiny configuration."""
    path = write_config(tmp_path / f"{output_name}.csv", NUM_CLIENTS=10, ROUNDS=3,
                        CLIENT_FRACTION=0.2, OUTPUT_DIR=tmp_path / output_name, SEED=3)
    result = subprocess.run([sys.executable, str(ROOT / "Main.py"), "-c", "-f", str(path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (run_dir,) = (tmp_path / output_name).iterdir()
    with open(run_dir / "history.csv") as file:
        return result.stdout, run_dir, list(csv.DictReader(file))


def test_end_to_end_run_on_real_data_learns_and_writes_every_output(tmp_path):
    stdout, run_dir, history = run_main(tmp_path, "first")
    assert run_dir.name == "fedavg_noniid_ib_K10_C0.2_E1_B32"
    for name in ("history.csv", "config.json", "distribution.png", "accuracy.png",
                 "global_model.keras"):
        assert (run_dir / name).stat().st_size > 0, name
    assert list(history[0]) == list(Main.HISTORY_COLUMNS)
    assert [int(row["round"]) for row in history] == [1, 2, 3]
    assert all(int(row["clients"]) == 2 for row in history)
    accuracies = [float(row["test_accuracy"]) for row in history]
    assert accuracies[-1] > 0.6, f"accuracy {accuracies} is not well above chance (0.1)"
    assert json.loads((run_dir / "config.json").read_text())["ROUNDS"] == 3
    assert "round 3/3  acc" in stdout

    _, _, repeated = run_main(tmp_path, "second")
    without_time = [{key: value for key, value in row.items() if key != "seconds"}
                    for row in history]
    assert without_time == [{key: value for key, value in row.items() if key != "seconds"}
                            for row in repeated], "the same SEED gave a different curve"
