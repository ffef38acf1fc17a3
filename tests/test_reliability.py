"""Tests of Main.py's reliability: bad input, kill -9 and resume, Ctrl-C, dropout, divergence."""

import csv
import dataclasses
import gzip
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import checkpoints
import configuration
import Data_Preprocessing
import divergence
import history_log
import Main
from conftest import assert_one_clear_line, round_clients, write_config

MAIN_PY = pathlib.Path(Main.__file__).resolve()
# 50 iid clients of 1,200 samples, 5 a round: about a second a round on 2 cores.
SMALL_RUN = {"NUM_CLIENTS": 50, "CLIENT_FRACTION": 0.1, "DISTRIBUTION": "iid", "SEED": 4}


def snapshot(folder):
    """Every file under `folder` with its bytes, to prove that nothing was written."""
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def start_main(config_path):
    return subprocess.Popen([sys.executable, str(MAIN_PY), "-c", "-f",
                             str(config_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def run_main(config_path):
    process = start_main(config_path)
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


def run_dir_of(config_path):
    """The folder Main.py writes for the run a CSV describes."""
    ((_, config),) = configuration.load_configs(
        Main.parse_arguments(["-c", "-f", str(config_path)]), Main.default_config())
    return configuration.run_dir(config)


def read_history(run_dir):
    with open(run_dir / "history.csv") as file:
        return list(csv.DictReader(file))


def without_seconds(rows):
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def wait_for_rounds(run_dir, num_rounds, process, timeout=300):
    """Wait until history.csv has `num_rounds` rows (the checkpoint follows within the round)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if (run_dir / "history.csv").is_file() and len(read_history(run_dir)) >= num_rounds:
            return
        time.sleep(0.05)
    raise TimeoutError(f"no round {num_rounds} within {timeout} s")


def global_weights_of(run_dir):
    arrays, metadata = checkpoints.load_checkpoint(run_dir / checkpoints.CHECKPOINT_NAME)
    return metadata["round"], [arrays[name] for name in sorted(arrays) if name.startswith("global")]


def corrupt_data_dir(tmp_path):
    """A copy of the real data folder whose training labels are cut short."""
    folder = tmp_path / "corrupt_data"
    shutil.copytree(Data_Preprocessing.find_data_dir(), folder)
    labels = folder / Data_Preprocessing.FILE_NAMES["train_labels"]
    with gzip.open(labels, "rb") as file:
        content = file.read()
    with gzip.open(labels, "wb") as file:
        file.write(content[:-10])
    return folder


BAD_CONSTANTS = [
    ("NUM_CLIENTS", "0", "NUM_CLIENTS must be an integer from 1 to 60000"),
    ("NUM_CLIENTS", "ten", "NUM_CLIENTS must be an integer, got 'ten'"),
    ("ROUNDS", "-3", "ROUNDS must be an integer >= 1"),
    ("CLIENT_FRACTION", "1.5", "CLIENT_FRACTION must be a number in (0, 1]"),
    ("CLIENT_FRACTION", "0", "CLIENT_FRACTION must be a number in (0, 1]"),
    ("LOCAL_EPOCHS", "0", "LOCAL_EPOCHS must be an integer >= 1"),
    ("BATCH_SIZE", "2.5", "BATCH_SIZE must be an integer, got '2.5'"),
    ("LEARNING_RATE", "-0.01", "LEARNING_RATE must be a number > 0"),
    ("LEARNING_RATE", "fast", "LEARNING_RATE must be a number, got 'fast'"),
    ("LOCAL_MOMENTUM", "1", "LOCAL_MOMENTUM must be a number in [0, 1)"),
    ("DISTRIBUTION", "pathological", "DISTRIBUTION must be one of iid, noniid_ib"),
    ("MAX_SAMPLE_SHARE", "0", "MAX_SAMPLE_SHARE must be a number in (0, 1]"),
    ("CLASSES_PER_CLIENT", "11", "CLASSES_PER_CLIENT must be an integer from 1 to 10"),
    ("DIRICHLET_ALPHA", "-1", "DIRICHLET_ALPHA must be a number > 0"),
    ("SHARDS_PER_CLIENT", "0", "SHARDS_PER_CLIENT must be an integer >= 1"),
    ("SEED", "-5", "SEED must be an integer from 0 to 2**32 - 1"),
    ("CLIENT_DROPOUT", "1", "CLIENT_DROPOUT must be a number in [0, 1)"),
    ("CHECKPOINT_EVERY", "0", "CHECKPOINT_EVERY must be an integer >= 1"),
    ("RESUME", "maybe", "RESUME must be True or False, got 'maybe'"),
    ("DP_NOISE", "random", "DP_NOISE must be one of seeded, secure, got 'random'"),
    ("NUM_CLIENTS", "600", "NUM_CLIENTS must be at most 500 for noniid_ib"),
]


@pytest.mark.parametrize("name, value, message", BAD_CONSTANTS)
def test_bad_constant_gives_one_line_exit_two_and_writes_nothing(
        tmp_path, capsys, real_data_once, name, value, message):
    output = tmp_path / "out"
    output.mkdir()
    path = write_config(tmp_path / "bad.csv", OUTPUT_DIR=output, **{name: value})
    assert Main.main(["-c", "-f", str(path)]) == Main.EXIT_BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, message)
    assert snapshot(output) == {}


@pytest.mark.parametrize("content, message", [
    ("ROUNDS,5\n", "must start with the header line 'param,val'"),
    ("param,val\nROUNDZ,5\n", "unknown parameter 'ROUNDZ'"),
    ("param,val\nROUNDS,5,6\n", "expected 'name,value'"),
    ("param;val\nROUNDS;5\n", "must start with the header line"),
])
def test_malformed_csv_gives_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    assert Main.main(["-c", "-f", str(path)]) == Main.EXIT_BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, message)


def test_missing_csv_gives_one_line(tmp_path, capsys):
    assert Main.main(["-c", "-f", str(tmp_path / "nowhere.csv")]) == Main.EXIT_BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, "nowhere.csv not found")


def test_missing_and_corrupt_data_files_give_one_line(tmp_path, capsys):
    missing = write_config(tmp_path / "missing.csv", DATA_DIR=tmp_path / "empty",
                           OUTPUT_DIR=tmp_path / "out")
    assert Main.main(["-c", "-f", str(missing)]) == Main.EXIT_BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, "lacks train-images-idx3-ubyte.gz")
    corrupt = write_config(tmp_path / "corrupt.csv", DATA_DIR=corrupt_data_dir(tmp_path),
                           OUTPUT_DIR=tmp_path / "out")
    assert Main.main(["-c", "-f", str(corrupt)]) == Main.EXIT_BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, "train-labels-idx1-ubyte.gz")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_gives_one_line(tmp_path, capsys, real_data_once):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    path = write_config(tmp_path / "bad.csv", OUTPUT_DIR=blocker / "results")
    assert Main.main(["-c", "-f", str(path)]) == Main.EXIT_BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, "is not writable")


def make_checkpoint(output, config_overrides, round_num, rounds, saved_overrides=None):
    """Leave a checkpoint in the run folder the given configuration would use.

    `saved_overrides` makes the checkpoint claim other constants than its folder stands for.
    """
    config = {**Main.default_config(), "OUTPUT_DIR": output, **config_overrides}
    run_dir = configuration.run_dir(config)
    run_dir.mkdir(parents=True)
    metadata = {"round": round_num, "history": [],
                "config": {**config, "ROUNDS": rounds, **(saved_overrides or {})}}
    checkpoints.save_checkpoint(run_dir / checkpoints.CHECKPOINT_NAME, {"global_0": np.zeros(2)},
                          json.loads(json.dumps(metadata, default=str)))
    (run_dir / "history.csv").write_text("round\n1\n")


@pytest.mark.parametrize("saved, requested, round_num, message", [
    (None, {"RESUME": True}, 3, "RESUME is True but there is no checkpoint"),
    ({"LEARNING_RATE": 0.05}, {"RESUME": True}, 3, "RESUME is True but there is no checkpoint"),
    ({}, {"RESUME": True, "ROUNDS": 2}, 3, "ROUNDS must be at least the checkpoint's round 3"),
    ({}, {}, 3, "holds an unfinished run (round 3 of 10)"),
    ({}, {}, 10, "holds a finished run (10 rounds)"),
])
def test_resume_problems_give_one_line_and_keep_the_run(
        tmp_path, capsys, real_data_once, saved, requested, round_num, message):
    output = tmp_path / "out"
    output.mkdir()
    if saved is not None:
        make_checkpoint(output, saved, round_num=round_num, rounds=10)
    before = snapshot(output)
    path = write_config(tmp_path / "resume.csv", OUTPUT_DIR=output, **{"ROUNDS": 10, **requested})
    assert Main.main(["-c", "-f", str(path)]) == Main.EXIT_BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, message)
    assert snapshot(output) == before


def test_resume_refuses_a_checkpoint_whose_constants_differ(tmp_path, capsys, real_data_once):
    output = tmp_path / "out"
    make_checkpoint(output, {}, round_num=3, rounds=10, saved_overrides={"SEED": 9})
    path = write_config(tmp_path / "resume.csv", OUTPUT_DIR=output, ROUNDS=10, RESUME=True)
    assert Main.main(["-c", "-f", str(path)]) == Main.EXIT_BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, "made with other values of SEED")


@pytest.mark.slow
def test_kill_minus_nine_then_resume_equals_an_uninterrupted_run(tmp_path):
    constants = {**SMALL_RUN, "ROUNDS": 4}
    whole = write_config(tmp_path / "whole.csv", OUTPUT_DIR=tmp_path / "whole", **constants)
    assert run_main(whole)[0] == 0
    (whole_dir,) = (tmp_path / "whole").iterdir()

    killed = write_config(tmp_path / "killed.csv", OUTPUT_DIR=tmp_path / "killed", **constants)
    process = start_main(killed)
    killed_dir = tmp_path / "killed" / whole_dir.name
    wait_for_rounds(killed_dir, 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    resumed = write_config(tmp_path / "resumed.csv", OUTPUT_DIR=tmp_path / "killed",
                           RESUME=True, **constants)
    returncode, stdout, stderr = run_main(resumed)
    assert returncode == 0, stderr
    assert "resuming after round" in stdout

    assert without_seconds(read_history(killed_dir)) == without_seconds(read_history(whole_dir))
    whole_round, whole_weights = global_weights_of(whole_dir)
    killed_round, killed_weights = global_weights_of(killed_dir)
    assert whole_round == killed_round == 4
    for expected, actual in zip(whole_weights, killed_weights, strict=True):
        np.testing.assert_array_equal(expected, actual)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_with_valid_history_and_checkpoint(tmp_path):
    path = write_config(tmp_path / "long.csv", OUTPUT_DIR=tmp_path / "out", ROUNDS=50,
                        **SMALL_RUN)
    process = start_main(path)
    run_dir = run_dir_of(path)
    wait_for_rounds(run_dir, 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == Main.EXIT_INTERRUPTED
    assert "RESUME" in stderr and "Traceback" not in stderr
    rows = read_history(run_dir)
    checkpoint_round, _ = global_weights_of(run_dir)
    assert [int(row["round"]) for row in rows] == list(range(1, checkpoint_round + 1))
    assert all(row["test_accuracy"] for row in rows)


@pytest.mark.slow
def test_client_dropout_still_trains_and_records_returned_clients(tmp_path):
    path = write_config(tmp_path / "dropout.csv", OUTPUT_DIR=tmp_path / "out", ROUNDS=4,
                        CLIENT_DROPOUT=0.3, LEARNING_RATE=0.05,
                        **{**SMALL_RUN, "CLIENT_FRACTION": 0.2})
    returncode, _, stderr = run_main(path)
    assert returncode == 0, stderr
    rows = read_history(run_dir_of(path))
    returned = [int(row["returned"]) for row in rows]
    assert all(int(row["clients"]) == 10 for row in rows)
    assert all(count <= 10 for count in returned) and sum(returned) < 40
    accuracies = [float(row["test_accuracy"]) for row in rows]
    assert accuracies[-1] > max(0.5, accuracies[0])


def test_a_round_where_no_client_returns_keeps_the_global_model(fashion_mnist):
    config = {**Main.default_config(), **SMALL_RUN, "CLIENT_DROPOUT": 0.999999}
    data = fashion_mnist._replace(x_test=fashion_mnist.x_test[:500],
                                  y_test=fashion_mnist.y_test[:500])
    client_indices = configuration.partition_data(config, data.y_train)
    federation = Main.build_federation(config, data, client_indices)
    weights = federation.global_model.get_weights()
    new_weights, row, _ = Main.run_round(1, config, federation, weights, federation.host)
    assert row["returned"] == 0 and row["samples"] == 0 and row["train_loss"] == ""
    for before, after in zip(weights, new_weights, strict=True):
        np.testing.assert_array_equal(before, after)


@pytest.mark.slow
def test_divergence_stops_with_a_clear_message_and_keeps_the_history(tmp_path):
    path = write_config(tmp_path / "nan.csv", OUTPUT_DIR=tmp_path / "out", ROUNDS=5,
                        LEARNING_RATE=1e30, **SMALL_RUN)
    returncode, _, stderr = run_main(path)
    assert returncode == Main.EXIT_DIVERGED
    assert "diverged" in stderr and "likely cause: LEARNING_RATE 1e+30 is too high" in stderr
    assert "Traceback" not in stderr
    run_dir = run_dir_of(path)
    assert read_history(run_dir) == []  # the first round already diverged: no row is invented


@pytest.mark.slow
def test_resume_restores_scaffold_variates_server_optimizer_and_baseline(tmp_path, real_data_once):
    """A run extended from its round-2 checkpoint to round 4 equals a straight 4-round run.

    SCAFFOLD's client and server variates, FedAdam's moments and the centralized baseline's
    weights and sample stream all live in the checkpoint; losing any one changes rounds 3-4.
    """
    constants = {**SMALL_RUN, "CLIENT_FRACTION": 0.04, "ALGORITHM": "scaffold",
                 "SERVER_OPTIMIZER": "fedadam", "SERVER_LR": 0.01, "CENTRALIZED_BASELINE": True}
    straight = write_config(tmp_path / "straight.csv", OUTPUT_DIR=tmp_path / "straight",
                            ROUNDS=4, **constants)
    assert Main.main(["-c", "-f", str(straight)]) == 0
    first = write_config(tmp_path / "first.csv", OUTPUT_DIR=tmp_path / "split", ROUNDS=2,
                         **constants)
    assert Main.main(["-c", "-f", str(first)]) == 0
    extended = write_config(tmp_path / "extended.csv", OUTPUT_DIR=tmp_path / "split", ROUNDS=4,
                            RESUME=True, **constants)
    assert Main.main(["-c", "-f", str(extended)]) == 0
    (straight_dir,) = (tmp_path / "straight").iterdir()
    (split_dir,) = (tmp_path / "split").iterdir()
    assert without_seconds(read_history(split_dir)) == without_seconds(read_history(straight_dir))


def test_divergence_message_names_the_attack_when_there_are_attackers(tmp_path):
    config = {**Main.default_config(), "MALICIOUS_FRACTION": 0.2, "ATTACK": "sign_flip"}
    with pytest.raises(divergence.DivergenceError,
                       match="likely cause: the sign_flip attackers") as error:
        divergence.check_finite(4, [np.array([np.nan])], {"test_loss": 1.0}, config, tmp_path,
                          [{"round": 1}, {"round": 2}, {"round": 3}])
    assert len(error.value.rows) == 3


def test_60000_one_sample_clients_keep_state_only_for_those_that_trained(fashion_mnist):
    config = {**Main.default_config(), "NUM_CLIENTS": 60000, "DISTRIBUTION": "iid",
              "CLIENT_FRACTION": 0.0001, "ALGORITHM": "scaffold", "COMPRESSION": "topk"}
    data = fashion_mnist._replace(x_test=fashion_mnist.x_test[:500],
                                  y_test=fashion_mnist.y_test[:500])
    client_indices = configuration.partition_data(config, data.y_train)
    assert {len(indices) for indices in client_indices} == {1}
    federation = Main.build_federation(config, data, client_indices)
    weights, trained = federation.global_model.get_weights(), set()
    for round_num in (1, 2):
        trained |= {int(client) for client in round_clients(config, round_num)[0]}
        weights, row, _ = Main.run_round(round_num, config, federation, weights,
                                      federation.host)
        assert row["returned"] == 6 and row["samples"] == 6
    for memory in federation.host.memory.values():
        assert set(memory.get_state()[0].tolist()) == trained


@pytest.mark.slow
def test_resume_continues_a_comparison_whose_later_runs_never_started(tmp_path,
                                                                      real_data_once):
    # A comparison stopped during its first run: RESUME continues that run and starts the rest.
    small = {**SMALL_RUN, "OUTPUT_DIR": tmp_path / "out", "EVAL_EVERY": 2}
    first = write_config(tmp_path / "first.csv", ROUNDS=1, **small)
    assert Main.main(["-c", "-f", str(first)]) == 0
    first = write_config(tmp_path / "first.csv", ROUNDS=2, RESUME=True, **small)
    second = write_config(tmp_path / "second.csv", ROUNDS=2, RESUME=True, LEARNING_RATE=0.02,
                          **small)
    assert Main.main(["-c", "-f", str(first), str(second)]) == 0
    assert [len(read_history(run_dir_of(path))) for path in (first, second)] == [2, 2]


class SpoilingEngine:
    """Trains in process, then spoils some uploads (a NaN variate change) before the server
    sees them: {round: clients whose upload is spoiled}."""

    def __init__(self, host, spoiled):
        self.host, self.spoiled = host, spoiled

    def train(self, round_num, clients, global_weights, received=None, step_limits=None):
        uploads = self.host.train(round_num, clients, global_weights, received,
                                  step_limits)
        return [dataclasses.replace(upload, extras={"variate": [
                    np.full_like(layer, np.nan) for layer in upload.extras["variate"]]})
                if upload.client in self.spoiled.get(round_num, ()) else upload
                for upload in uploads]

    def settle(self, round_num, accepted_clients):
        self.host.settle(round_num, accepted_clients)


@pytest.mark.slow
def test_client_state_follows_what_the_server_accepted(fashion_mnist):
    """SCAFFOLD with top-k and client dropout; some uploads are rejected. A client keeps its
    new c_i and residual only when its upload was accepted, so after every round the server's
    c is the mean of all K clients' c_i, and a client rejected once trains normally later."""
    config = {**Main.default_config(), "NUM_CLIENTS": 100, "CLIENT_FRACTION": 0.1,
              "DISTRIBUTION": "iid", "ALGORITHM": "scaffold", "COMPRESSION": "topk",
              "TOPK_FRACTION": 0.1, "CLIENT_DROPOUT": 0.2, "SEED": 1}
    returning = {round_num: [int(client) for client in
                             round_clients(config, round_num)[1]]
                 for round_num in range(1, 6)}
    later = {client for round_num in range(2, 6) for client in returning[round_num]}
    again = min(set(returning[1]) & later)  # rejected in round 1, selected again later
    spoiled = {1: {again}, 3: {returning[3][0]}}
    data = fashion_mnist._replace(x_test=fashion_mnist.x_test[:500],
                                  y_test=fashion_mnist.y_test[:500])
    federation = Main.build_federation(config, data,
                                       configuration.partition_data(config, data.y_train))
    engine = SpoilingEngine(federation.host, spoiled)
    weights = federation.global_model.get_weights()
    variates, residuals = federation.host.memory["variate"], federation.host.memory["residual"]
    for round_num in range(1, 6):
        weights, row, _ = Main.run_round(round_num, config, federation, weights, engine)
        assert row["rejected"] == len(spoiled.get(round_num, ()))
        assert row["returned"] == len(returning[round_num]) - row["rejected"]
        mean_variate = [np.mean([variates.get(client)[layer] for client in range(100)], axis=0)
                        for layer in range(len(weights))]
        server_variate = federation.server.sent_to_clients()["variate"]
        for server, mean in zip(server_variate, mean_variate, strict=True):
            np.testing.assert_allclose(server, mean, rtol=1e-4, atol=1e-7)
        if round_num == 1:
            assert again not in variates and again not in residuals
    assert again in variates and all(np.isfinite(layer).all() for layer in variates.get(again))


def test_a_krum_round_with_too_few_updates_is_logged_and_counted(fashion_mnist, capsys):
    config = {**Main.default_config(), **SMALL_RUN, "AGGREGATION": "krum", "KRUM_F": 1,
              "CLIENT_DROPOUT": 0.5}
    data = fashion_mnist._replace(x_test=fashion_mnist.x_test[:500],
                                  y_test=fashion_mnist.y_test[:500])
    federation = Main.build_federation(config, data,
                                       configuration.partition_data(config, data.y_train))
    returned = len(round_clients(config, 1)[1])
    assert returned < 5, "the test needs dropout to leave fewer than 2 f + 3 = 5 clients"
    weights = federation.global_model.get_weights()
    new_weights, row, _ = Main.run_round(1, config, federation, weights, federation.host)
    assert row["krum_skipped"] == 1 and row["returned"] == returned
    assert "the global model is kept" in capsys.readouterr().err
    for before, after in zip(weights, new_weights, strict=True):
        np.testing.assert_array_equal(before, after)
    assert "krum_skipped" in history_log.history_columns(config)
