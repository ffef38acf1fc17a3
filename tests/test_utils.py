"""Tests of the CSV overrides, run naming, history file and plots."""

import csv
import dataclasses
import pathlib

import numpy as np
import pytest

import comparison
import Utils

DEFAULTS = {"ROUNDS": 100, "CLIENT_FRACTION": 0.3, "DISTRIBUTION": "noniid_ib",
            "DATA_DIR": None, "OUTPUT_DIR": pathlib.Path("results"), "RESUME": False}


def write_csv(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, text, expected", [
    ("ROUNDS", "5", 5), ("CLIENT_FRACTION", "1", 1.0), ("CLIENT_FRACTION", " 0.25 ", 0.25),
    ("DISTRIBUTION", "iid", "iid"), ("DATA_DIR", "None", None), ("DATA_DIR", "/data", "/data"),
    ("OUTPUT_DIR", "out", pathlib.Path("out")), ("RESUME", "True", True),
    ("RESUME", "false", False)])
def test_convert_value_types_like_the_default(name, text, expected):
    value = Utils.convert_value(name, text, DEFAULTS[name])
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("name, text, message", [
    ("ROUNDS", "2.5", "ROUNDS must be an integer, got '2.5'"),
    ("ROUNDS", "", "ROUNDS must be an integer"),
    ("CLIENT_FRACTION", "a third", "CLIENT_FRACTION must be a number"),
    ("RESUME", "maybe", "RESUME must be True or False")])
def test_convert_value_names_the_parameter_when_the_text_does_not_fit(name, text, message):
    with pytest.raises(ValueError, match=message):
        Utils.convert_value(name, text, DEFAULTS[name])


def test_read_overrides_returns_only_the_listed_constants(tmp_path):
    path = write_csv(tmp_path / "my.csv", "param,val\nROUNDS,5\n\nDISTRIBUTION,iid\n")
    assert Utils.read_overrides(path, DEFAULTS) == {"ROUNDS": 5, "DISTRIBUTION": "iid"}


@pytest.mark.parametrize("text, message", [
    ("name,value\nROUNDS,5\n", "must start with the header line 'param,val'"),
    ("", "must start with the header line"),
    ("param,val\nROUNDZ,5\n", "line 2: unknown parameter 'ROUNDZ'"),
    ("param,val\nROUNDS,5,6\n", "line 2: expected 'name,value'"),
    ("param,val\nROUNDS\n", "line 2: expected 'name,value'")])
def test_read_overrides_rejects_malformed_files(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        Utils.read_overrides(write_csv(tmp_path / "bad.csv", text), DEFAULTS)


def test_read_overrides_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file .*missing.csv not found"):
        Utils.read_overrides(tmp_path / "missing.csv", DEFAULTS)


def test_run_name_describes_the_configuration():
    config = {"ALGORITHM": "fedavg", "DISTRIBUTION": "noniid_ib", "NUM_CLIENTS": 100,
              "CLIENT_FRACTION": 0.3, "LOCAL_EPOCHS": 1, "BATCH_SIZE": 32,
              "SERVER_OPTIMIZER": "sgd"}
    assert Utils.run_name(config) == "fedavg_noniid_ib_K100_C0.3_E1_B32_s0"
    config.update(ALGORITHM="scaffold", SERVER_OPTIMIZER="fedadam")
    assert Utils.run_name(config) == "scaffold_noniid_ib_K100_C0.3_E1_B32_s0_fedadam"
    config.update(SERVER_OPTIMIZER="sgd", COMPRESSION="topk", DP_CLIP_NORM=1.0,
                  DP_NOISE_MULTIPLIER=0.5, AGGREGATION="median", MALICIOUS_FRACTION=0.2,
                  ATTACK="sign_flip")
    assert Utils.run_name(config) == \
        "scaffold_noniid_ib_K100_C0.3_E1_B32_s0_topk_dp0.5_median_sign_flip0.2"


def test_config_hash_covers_every_constant_but_the_ignored_ones():
    config = {"LEARNING_RATE": 0.01, "ROUNDS": 10, "OUTPUT_DIR": pathlib.Path("/tmp/a")}
    same = Utils.config_hash(config, ignored=("ROUNDS", "OUTPUT_DIR"))
    assert len(same) == 8 and int(same, 16) >= 0
    assert Utils.config_hash({**config, "ROUNDS": 99, "OUTPUT_DIR": "/x"},
                             ("ROUNDS", "OUTPUT_DIR")) == same
    assert Utils.config_hash({**config, "LEARNING_RATE": 0.02},
                             ("ROUNDS", "OUTPUT_DIR")) != same


def test_generators_repeat_for_their_keys_and_differ_across_streams_and_keys():
    def draw(*key):
        return Utils.rng(*key).integers(1 << 62)

    assert draw(4, "training", 3, 17) == draw(4, "training", 3, 17)
    assert len({draw(4, "training", 3, 17), draw(4, "attack", 3, 17), draw(5, "training", 3, 17),
                draw(4, "training", 4, 17), draw(4, "training", 3, 18)}) == 5


def test_history_writer_flushes_every_row(tmp_path):
    writer = Utils.HistoryWriter(tmp_path / "history.csv", ["round", "test_accuracy"])
    writer.append({"round": 1, "test_accuracy": 0.5})
    # Read before close: a crash right now must not lose the row.
    rows = list(csv.DictReader(open(tmp_path / "history.csv")))
    assert rows == [{"round": "1", "test_accuracy": "0.5"}]
    writer.close()


def test_plots_are_written(tmp_path):
    counts = np.random.default_rng(0).integers(0, 50, size=(12, 10))
    Utils.plot_distribution(tmp_path / "distribution.png", counts, "test")
    rows = [{"round": r, "test_accuracy": 0.1 * r, "test_loss": 1.0 / r} for r in (1, 2, 3)]
    Utils.plot_history(tmp_path / "accuracy.png", rows, "test")
    for name in ("distribution.png", "accuracy.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def seed_rows(finals, rounds=3):
    """A run whose accuracy climbs to `final` in `rounds` rounds, 1 MB up a round."""
    return [{"round": r, "test_accuracy": round(finals * r / rounds, 6), "mb_up_total": float(r),
             "seconds": 2.0} for r in range(1, rounds + 1)]


def test_comparison_gives_mean_and_sample_std_over_seeds_by_hand(tmp_path):
    """Seeds ending at 0.7, 0.8 and 0.9: mean 0.8, sample std 0.1. Target 0.5 is first reached
    in round 3 (0.7 * 2/3 = 0.467 < 0.5), round 2 (0.533) and round 2 (0.6): 2.3 ± 0.6."""
    config = {"ROUNDS": 3, "TARGET_ACCURACY": 0.5, "ALGORITHM": "fedavg",
              "SERVER_OPTIMIZER": "sgd", "SERVER_LR": 1.0, "DISTRIBUTION": "iid"}
    configs = [{**config, "SEED": seed} for seed in range(4)]
    histories = [seed_rows(0.7), seed_rows(0.8), seed_rows(0.9), seed_rows(0.9)[:1]]
    comparison.write_comparison(tmp_path, ["a", "a", "a", "b"], configs, histories)
    table = (tmp_path / "comparison.md").read_text().splitlines()
    assert table[2].startswith("| a | fedavg | sgd (lr 1.0) | iid | 3 | 0.8000 ± 0.1000 | "
                               "0.8000 ± 0.1000 | 2.3 ± 0.6 (3/3) | 3.0 ± 0.0 |")
    assert "| b |" in table[3] and "1 (1 diverged in round 2)" in table[3]
    with open(tmp_path / "comparison_seeds.csv") as file:
        seeds = list(csv.DictReader(file))
    assert [(row["run"], row["seed"], row["final_accuracy"]) for row in seeds[:3]] == [
        ("a", "0", "0.7"), ("a", "1", "0.8"), ("a", "2", "0.9")]
    assert seeds[3]["diverged_in_round"] == "2" and seeds[3]["final_accuracy"] == ""
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_over_distributions_draws_a_panel_each_with_one_colour_per_method(tmp_path):
    """Curves compare like with like: iid runs in one panel, shards runs in another, and FedAvg
    has the same colour in both while SCAFFOLD has another."""
    config = {"ROUNDS": 3, "TARGET_ACCURACY": 0.5, "SERVER_OPTIMIZER": "sgd", "SERVER_LR": 1.0}
    runs = {f"{distribution}_{algorithm}": [({**config, "DISTRIBUTION": distribution,
                                               "ALGORITHM": algorithm, "SEED": seed},
                                              seed_rows(0.6 + 0.1 * seed)) for seed in (0, 1)]
            for distribution in ("iid", "shards") for algorithm in ("fedavg", "scaffold")}
    assert comparison.panels_by_distribution(runs) == {"iid": ["iid_fedavg", "iid_scaffold"],
                                                  "shards": ["shards_fedavg", "shards_scaffold"]}
    styles = comparison._curve_styles(runs)
    assert styles["iid_fedavg"] == styles["shards_fedavg"] != styles["iid_scaffold"]
    assert styles["iid_scaffold"] == styles["shards_scaffold"]
    runs["iid_fedavg_again"] = runs["iid_fedavg"]  # two FedAvg runs in one panel: own colours
    styles = comparison._curve_styles(runs)
    assert styles["iid_fedavg_again"] != styles["iid_fedavg"]
    single = {label: group for label, group in runs.items() if label.startswith("iid")}
    assert comparison.panels_by_distribution(single) == {
        "iid": ["iid_fedavg", "iid_scaffold", "iid_fedavg_again"]}
    comparison.plot_comparison(tmp_path / "comparison.png", runs, 0.5)
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_log_holds_the_rounds_values_once(tmp_path):
    import tensorflow as tf

    rows = [{"round": 1, "test_accuracy": 0.5, "train_loss": 1.25, "epsilon": 2.0},
            {"round": 2, "test_accuracy": 0.625, "train_loss": "", "epsilon": 3.0}]
    Utils.TensorBoardLog(tmp_path, rows[:1]).close()
    resumed = Utils.TensorBoardLog(tmp_path, rows[:1])  # a resumed run rewrites its rounds
    resumed.append(rows[1])
    resumed.close()
    seen = [(event.step, value.tag, float(tf.make_ndarray(value.tensor)))
            for path in tmp_path.glob("events.out.tfevents.*")
            for event in tf.compat.v1.train.summary_iterator(str(path))
            for value in event.summary.value]
    assert sorted(seen) == [(1, "epsilon", 2.0), (1, "test_accuracy", 0.5),
                            (1, "train_loss", 1.25), (2, "epsilon", 3.0),
                            (2, "test_accuracy", 0.625)]


def test_comparisons_skip_rounds_without_evaluation(tmp_path):
    config = {"ROUNDS": 4, "TARGET_ACCURACY": 0.5, "ALGORITHM": "fedavg",
              "SERVER_OPTIMIZER": "sgd", "SERVER_LR": 1.0, "DISTRIBUTION": "iid", "SEED": 0}
    rows = [{"round": r, "test_accuracy": accuracy, "mb_up_total": float(r), "seconds": 1.0}
            for r, accuracy in ((1, ""), (2, 0.6), (3, ""), (4, 0.7))]
    assert comparison.rounds_to_reach(rows, 0.5) == 2
    assert comparison.seed_summary(config, rows, 0.5)["best_accuracy"] == 0.7
    rounds, mean, *_ = comparison._mean_curves([(config, rows)])
    assert rounds.tolist() == [2, 4] and mean.tolist() == [0.6, 0.7]
    comparison.write_comparison(tmp_path, ["a"], [config], [rows])
    assert "| a | fedavg | sgd (lr 1.0) | iid | 1 | 0.7000 | 0.7000 | 2.0 (1/1) |" in \
        (tmp_path / "comparison.md").read_text()


def test_spread_of_infinite_epsilons_is_not_nan():
    """z = 0 gives epsilon = inf in every seed; the table says inf, not 'inf ± nan'."""
    assert comparison.mean_and_spread([float("inf")] * 3, 2) == "inf"
    assert comparison.mean_and_spread([6.02, 6.02, 6.02], 2) == "6.02 ± 0.00"


def test_settings_name_the_constants_they_come_from():
    """Inside, code reads named fields; each field is the constant of the same name."""
    import Client_side
    import Main
    import Server_side

    config = {**Main.default_config(), "LEARNING_RATE": 0.123, "KRUM_F": 4}
    client = Client_side.ClientSettings.from_config(config)
    server = Server_side.ServerSettings.from_config(config)
    assert client.learning_rate == 0.123 and server.krum_f == 4
    for settings in (client, server):
        for field in dataclasses.fields(settings):
            if field.name == "options":  # the plug-ins' constants, by their own names
                assert settings.options == {name: config[name] for name in settings.options}
                assert "PROX_MU" in settings.options and "DITTO_LAMBDA" in settings.options
            else:
                assert getattr(settings, field.name) == config[field.name.upper()]
