"""Tests of devices on a virtual clock (DEVICE_HETEROGENEITY, devices.py)."""

import csv

import numpy as np
import pytest

import configuration
import devices
import Main

# 5 clients of a tenth of the data, all trained every round.
SMALL = {"NUM_CLIENTS": 5, "CLIENT_FRACTION": 1.0, "DISTRIBUTION": "iid", "ROUNDS": 2,
         "SEED": 2}
MODEL_BYTES = 4 * 34826


def write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(path, **constants):
    return write_csv(path, ["param,val"] + [f"{name},{value}" for name, value in
                                            constants.items()])


def history(output_dir):
    (run_dir,) = output_dir.iterdir()
    with open(run_dir / "history.csv") as file:
        return list(csv.DictReader(file))


PROFILES = ["samples_per_second,down_mbps,up_mbps", "100,20,5", "400,50,10", "25,2,0.5"]


def test_profiles_come_from_the_file_or_the_lognormal_medians(tmp_path):
    path = write_csv(tmp_path / "devices.csv", PROFILES)
    config = {**Main.default_config(), "NUM_CLIENTS": 50, "DEVICE_HETEROGENEITY": str(path)}
    profiles = devices.device_profiles(config)
    rows = {(100.0, 20.0, 5.0), (400.0, 50.0, 10.0), (25.0, 2.0, 0.5)}
    drawn = set(zip(profiles.speed, profiles.down, profiles.up))
    assert drawn == rows  # 50 clients draw every one of the 3 rows
    again = devices.device_profiles(config)
    assert np.array_equal(profiles.speed, again.speed)
    lognormal = devices.device_profiles({**config, "NUM_CLIENTS": 20000,
                                         "DEVICE_HETEROGENEITY": "lognormal"})
    for values, median in ((lognormal.speed, 100), (lognormal.down, 20), (lognormal.up, 5)):
        assert np.median(values) == pytest.approx(median, rel=0.05)
        assert np.std(np.log(values)) == pytest.approx(1.0, rel=0.05)
    assert devices.device_profiles({**config, "DEVICE_HETEROGENEITY": "none"}) is None


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["none", "topk"])
def test_a_rounds_virtual_time_is_its_slowest_client_computed_by_hand(
        tmp_path, tenth_of_the_data, compression):
    path = write_csv(tmp_path / "devices.csv", PROFILES)
    setting = {**SMALL, "DEVICE_HETEROGENEITY": str(path), "COMPRESSION": compression,
               "LOCAL_EPOCHS": 2}
    run = write_config(tmp_path / "run.csv", OUTPUT_DIR=tmp_path / "out", **setting)
    assert Main.main(["-c", "-f", str(run)]) == 0
    rows = history(tmp_path / "out")
    config = {**Main.default_config(), **setting}
    profiles = devices.device_profiles(config)
    sizes = [len(indices) for indices in configuration.partition_data(
        config, tenth_of_the_data.y_train)]
    # What each client sends: the whole float32 model, or top-k's float32 values and int32
    # indices, ceil(1 % of each layer): 3 + 1 + 185 + 1 + 160 + 1 entries of 8 bytes.
    sent = MODEL_BYTES if compression == "none" else 8 * 351
    assert int(rows[0]["bytes_up"]) == 5 * sent
    expected = max(8 * MODEL_BYTES / (profiles.down[client] * 1e6)
                   + sizes[client] * 2 / profiles.speed[client]
                   + 8 * sent / (profiles.up[client] * 1e6) for client in range(5))
    for row in rows:
        assert float(row["virtual_seconds"]) == pytest.approx(expected, abs=1e-3)
    assert float(rows[1]["virtual_hours_total"]) == pytest.approx(2 * expected / 3600, abs=1e-6)
    if compression == "topk":
        assert sent < MODEL_BYTES / 10


@pytest.mark.parametrize("lines, message", [
    (None, "device profiles {path} cannot be read"),
    (["speed,down,up", "1,2,3"], "device profiles {path}, line 1: the header must be "
                                  "samples_per_second,down_mbps,up_mbps"),
    (PROFILES[:2] + ["100,fast,5"], "device profiles {path}, line 3: expected three numbers > 0"),
    (PROFILES[:2] + ["100,20,0"], "device profiles {path}, line 3: expected three numbers > 0"),
    (PROFILES[:1] + ["100,20,5,7"], "device profiles {path}, line 2: expected three numbers"),
    (PROFILES[:1], "device profiles {path} holds no device"),
])
def test_a_bad_profiles_file_is_named_with_its_line_and_exit_two(tmp_path, capsys, lines,
                                                                  message):
    path = tmp_path / "devices.csv"
    if lines is not None:
        write_csv(path, lines)
    run = write_config(tmp_path / "run.csv", OUTPUT_DIR=tmp_path / "out",
                       DEVICE_HETEROGENEITY=str(path))
    assert Main.main(["-c", "-f", str(run)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message.format(path=path) in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("constants, message", [
    ({"DEVICE_SPEED": 0}, "DEVICE_SPEED must be a number > 0, got 0"),
    ({"DEVICE_SPEED_SIGMA": -1}, "DEVICE_SPEED_SIGMA must be a number >= 0, got -1"),
    ({"DEVICE_DOWN_MBPS": -2.0}, "DEVICE_DOWN_MBPS must be a number > 0, got -2.0"),
    ({"DEVICE_UP_MBPS": "fast"}, "DEVICE_UP_MBPS must be a number"),
    ({"DEVICE_BANDWIDTH_SIGMA": -0.5}, "DEVICE_BANDWIDTH_SIGMA must be a number >= 0"),
])
def test_bad_device_constants_give_one_line_and_exit_two(tmp_path, capsys, constants, message):
    run = write_config(tmp_path / "run.csv", OUTPUT_DIR=tmp_path / "out", **constants)
    assert Main.main(["-c", "-f", str(run)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error


def test_without_devices_the_history_has_no_clock_columns():
    config = Main.default_config()
    assert not set(Main.CLOCK_COLUMNS) & set(Main.history_columns(config))
    assert set(Main.CLOCK_COLUMNS) <= set(Main.history_columns(
        {**config, "DEVICE_HETEROGENEITY": "lognormal"}))
