"""Tests of devices on a virtual clock (DEVICE_HETEROGENEITY, devices.py)."""

import csv

import numpy as np
import pytest

import checkpoints
import configuration
import devices
import history_log
import Main
import upload_format
import Utils
from algorithms import fednova
from conftest import assert_refused, run_whole_and_resumed, write_config

# 5 clients of a tenth of the data, all trained every round.
SMALL = {"NUM_CLIENTS": 5, "CLIENT_FRACTION": 1.0, "DISTRIBUTION": "iid", "ROUNDS": 2,
         "SEED": 2}
MODEL_BYTES = 4 * 34826


def write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


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
    assert_refused(tmp_path, capsys, message.format(path=path),
                   DEVICE_HETEROGENEITY=str(path))


@pytest.mark.parametrize("constants, message", [
    ({"DEVICE_SPEED": 0}, "DEVICE_SPEED must be a number > 0, got 0"),
    ({"DEVICE_SPEED_SIGMA": -1}, "DEVICE_SPEED_SIGMA must be a number >= 0, got -1"),
    ({"DEVICE_DOWN_MBPS": -2.0}, "DEVICE_DOWN_MBPS must be a number > 0, got -2.0"),
    ({"DEVICE_UP_MBPS": "fast"}, "DEVICE_UP_MBPS must be a number"),
    ({"DEVICE_BANDWIDTH_SIGMA": -0.5}, "DEVICE_BANDWIDTH_SIGMA must be a number >= 0"),
])
def test_bad_device_constants_give_one_line_and_exit_two(tmp_path, capsys, constants, message):
    assert_refused(tmp_path, capsys, message, **constants)


def test_an_edited_profiles_file_names_another_run_folder(tmp_path):
    """The run's folder hashes the profiles file's content: an edited file with the same path
    must not resume a run made with other devices."""
    path = write_csv(tmp_path / "devices.csv", PROFILES)
    config = {**Main.default_config(), "DEVICE_HETEROGENEITY": str(path)}
    before = configuration.run_dir(config)
    assert configuration.run_dir(config) == before
    write_csv(path, PROFILES[:-1] + ["25,2,0.25"])
    assert configuration.run_dir(config) != before
    assert configuration.run_dir(Main.default_config()).name.endswith(
        Utils.config_hash(checkpoints.identity(Main.default_config())))


def test_without_devices_the_history_has_no_clock_columns():
    config = Main.default_config()
    assert not set(history_log.CLOCK_COLUMNS) & set(history_log.history_columns(config))
    assert set(history_log.CLOCK_COLUMNS) <= set(history_log.history_columns(
        {**config, "DEVICE_HETEROGENEITY": "lognormal"}))


# --- Deadlines, stragglers, over-selection ------------------------------------------------------

def hand_profiles():
    """Four devices: speeds 100, 50, 10, 100 samples/s; 8 Mbit/s both ways (1 s per MB)."""
    return devices.DeviceProfiles(np.array([100.0, 50.0, 10.0, 100.0]), np.full(4, 8.0),
                                  np.full(4, 8.0))


def clock_config(**constants):
    return {**Main.default_config(), "DEVICE_HETEROGENEITY": "lognormal", **constants}


def test_a_deadline_drops_or_cuts_the_work_of_stragglers_as_computed_by_hand():
    sizes = [100, 100, 100, 300]  # seconds of training: 1, 2, 10, 3; transfer 1 + 1
    config = clock_config(BATCH_SIZE=32, LOCAL_EPOCHS=1, ROUND_DEADLINE=4.5)
    plan = devices.plan_round(hand_profiles(), config, np.arange(4), sizes, 10**6, 10**6, 4)
    assert plan.clients.tolist() == [0, 1] and plan.dropped == 2
    assert plan.seconds == 4.5 and plan.step_limits == {}
    partial = devices.plan_round(hand_profiles(), {**config, "STRAGGLER_POLICY": "partial"},
                                 np.arange(4), sizes, 10**6, 10**6, 4)
    # Client 2 has 2.5 s of compute: 25 samples, less than one batch: dropped, as with "drop".
    # Client 3 has 2.5 s: 250 samples: 7 steps of 32 (224); the 8th would need 256.
    assert partial.clients.tolist() == [0, 1, 3] and partial.dropped == 1
    assert partial.step_limits == {3: 7} and partial.partial == 1
    assert partial.seconds == 4.5  # the server waited for client 2 until the deadline


def test_over_selection_keeps_the_first_m_to_finish_ties_by_client_id():
    sizes = [100, 50, 100, 100]  # finish at 3, 3, 12, 3 s
    config = clock_config(OVER_SELECTION=2.0)
    plan = devices.plan_round(hand_profiles(), config, np.arange(4), sizes, 10**6, 10**6, 2)
    assert plan.clients.tolist() == [0, 1] and plan.cut == 2 and plan.seconds == 3.0
    steps = devices.steps_within(100, 32, 2, 150)
    assert steps == (5, 132)  # epoch 1: 32, 32, 32, 4 = 100, then 32; 164 would exceed 150
    assert devices.steps_within(100, 0, 3, 250) == (2, 200)  # full batches (B = 0)


def test_over_selection_with_a_drop_deadline_closes_at_the_mth_arrival():
    """Bonawitz et al. 2019: the round closes when m clients have arrived. By hand: 4 clients,
    m = 2, deadline 4.5, finish times 3, 4, 12, 5: clients 2 and 3 are late, but 0 and 1 are
    the two wanted, in by 4 s; the round lasts 4.0 s, not the deadline."""
    sizes = [100, 100, 100, 200]  # training 1, 2, 10, 2 s; transfer 1 + 1
    profiles = devices.DeviceProfiles(np.array([100.0, 50.0, 10.0, 66.66666666666667]),
                                      np.full(4, 8.0), np.full(4, 8.0))
    config = clock_config(ROUND_DEADLINE=4.5, OVER_SELECTION=2.0)
    plan = devices.plan_round(profiles, config, np.arange(4), sizes, 10**6, 10**6, 2)
    assert plan.clients.tolist() == [0, 1] and plan.dropped == 2
    assert plan.seconds == pytest.approx(4.0)
    # Fewer than m in time: the server waits until the deadline for the rest.
    short = devices.plan_round(profiles, config, np.arange(4), sizes, 10**6, 10**6, 3)
    assert short.clients.tolist() == [0, 1] and short.seconds == 4.5


@pytest.mark.parametrize("policy", ["drop", "partial"])
def test_a_round_never_outlasts_its_deadline(policy):
    """A client whose transfers alone take longer than the deadline cannot do one step in time:
    it is dropped whatever the policy (it was given one step and ran 160 s past 4.5 s)."""
    sizes = [100, 100]
    profiles = devices.DeviceProfiles(np.array([100.0, 100.0]), np.array([8.0, 0.1]),
                                      np.array([8.0, 0.1]))  # client 1: 80 s each way
    config = clock_config(ROUND_DEADLINE=4.5, STRAGGLER_POLICY=policy)
    plan = devices.plan_round(profiles, config, np.arange(2), sizes, 10**6, 10**6, 2)
    assert plan.clients.tolist() == [0] and plan.dropped == 1 and plan.step_limits == {}
    assert plan.seconds == 4.5
    # Transfers of 3 s leave 1.5 s: 15 samples at 10 samples/s, not one batch of 32.
    slow = devices.DeviceProfiles(np.array([100.0, 10.0]), np.full(2, 8.0), np.full(2, 4.0))
    plan = devices.plan_round(slow, config, np.arange(2), sizes, 10**6, 10**6, 2)
    assert plan.clients.tolist() == [0] and plan.dropped == 1 and plan.seconds == 4.5


def test_samples_trained_count_the_steps_taken_and_the_extra_epochs_by_hand():
    """100 samples, B 32, E 2: all 8 steps take 200; 5 steps 132 (32, 32, 32, 4, 32); FedRep
    adds HEAD_EPOCHS x n (3 x 100), Ditto PERSONAL_EPOCHS x n; `samples` would say 100."""
    def upload(steps):
        return upload_format.Upload(0, 1, [], 100, steps, 0.0)

    config = clock_config(BATCH_SIZE=32, LOCAL_EPOCHS=2, HEAD_EPOCHS=3, PERSONAL_EPOCHS=2)
    assert devices.samples_trained(config, [upload(8), upload(5)]) == 200 + 132
    assert devices.samples_trained({**config, "PERSONALIZATION": "fedrep"}, [upload(8)]) == 500
    assert devices.samples_trained({**config, "PERSONALIZATION": "ditto"}, [upload(8)]) == 400


@pytest.mark.parametrize("num_examples, batch_size, epochs, budget", [
    (100, 32, 2, 150), (100, 32, 3, 10**6), (100, 0, 3, 250), (7, 32, 2, 1), (96, 32, 1, 95)])
def test_samples_in_steps_are_the_samples_a_plans_steps_take(num_examples, batch_size, epochs,
                                                             budget):
    steps, used = devices.steps_within(num_examples, batch_size, epochs, budget)
    assert upload_format.samples_in_steps(num_examples, batch_size, steps) == used


def test_partial_work_equals_training_on_the_first_batches_alone(fashion_mnist):
    import Client_side
    import Server_side

    trainer = Client_side.LocalTrainer(Server_side.create_model(), fashion_mnist.x_train[:500],
                                       fashion_mnist.y_train[:500], 0.05, 0.0, 32, 2)
    weights = trainer.model.get_weights()
    indices = np.arange(100, 300)
    orders = trainer.epoch_orders(indices, np.random.default_rng(5))
    (limited, limited_loss, _), = trainer.train_orders(weights, [orders], [7], max_steps=[8])
    # 8 steps of E = 2 with 7 steps an epoch: all of epoch 1, then one batch of epoch 2.
    one_epoch = Client_side.LocalTrainer(trainer.model, fashion_mnist.x_train[:500],
                                         fashion_mnist.y_train[:500], 0.05, 0.0, 32, 1)
    (first, _, _), = one_epoch.train_orders(weights, [orders[:1]], [7])
    (second, loss, _), = one_epoch.train_orders(first, [orders[1:, :32]], [None])
    for got, expected in zip(limited, second, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert limited_loss == pytest.approx(loss, rel=1e-6)


def test_fednova_with_uneven_steps_stays_near_the_optimum_where_fedavg_drifts():
    """Quadratics f_i(w) = ||w - c_i||^2 / 2, local SGD (lr eta) for tau_i steps:
    w_i = c_i + (1 - eta)^tau_i (x - c_i). The optimum of the mean is (c_1 + c_2) / 2 = 5.
    FedAvg's fixed point weights client i by its progress 1 - (1 - eta)^tau_i, so the client
    taking 20 steps pulls it to 9.5; FedNova's (a_i = tau_i for vanilla SGD) by the progress per
    step, which tends to eta for every client as eta -> 0, so its fixed point tends to the
    optimum (Wang et al. 2020: normalizing removes the objective inconsistency)."""
    import Server_side

    centers, steps, shares, eta = np.array([[0.0], [10.0]]), [1, 20], [1, 1], 0.005
    nova = avg = np.zeros(1)
    for _ in range(2000):
        deltas = [[c + (1 - eta) ** t * (nova - c) - nova] for c, t in zip(centers, steps)]
        nova = nova + fednova.fednova_delta(deltas, shares, steps)[0]
        deltas = [[c + (1 - eta) ** t * (avg - c) - avg] for c, t in zip(centers, steps)]
        avg = avg + Server_side.fedavg(deltas, shares)[0]
    progress = np.array([1 - (1 - eta) ** t for t in steps])
    per_step = progress / steps
    assert nova[0] == pytest.approx(10 * per_step[1] / per_step.sum(), abs=1e-6)
    assert avg[0] == pytest.approx(10 * progress[1] / progress.sum(), abs=1e-6)
    assert abs(nova[0] - 5.0) < 0.15 and abs(avg[0] - 5.0) > 4


@pytest.mark.parametrize("constants, message", [
    ({"ROUND_DEADLINE": -1}, "ROUND_DEADLINE must be a number >= 0, got -1"),
    ({"STRAGGLER_POLICY": "wait"}, "STRAGGLER_POLICY must be one of drop, partial"),
    ({"OVER_SELECTION": 0.5}, "OVER_SELECTION must be a number >= 1, got 0.5"),
    ({"ROUND_DEADLINE": 60}, "ROUND_DEADLINE and OVER_SELECTION need DEVICE_HETEROGENEITY"),
    ({"OVER_SELECTION": 1.3, "DEVICE_HETEROGENEITY": "lognormal", "CLIENT_SAMPLING": "poisson"},
     "OVER_SELECTION needs CLIENT_SAMPLING fixed"),
    ({"OVER_SELECTION": 1.3, "DEVICE_HETEROGENEITY": "lognormal", "DP_CLIP_NORM": 1.0},
     "DP_CLIP_NORM > 0 cannot combine with ROUND_DEADLINE or OVER_SELECTION"),
])
def test_bad_clock_constants_give_one_line_and_exit_two(tmp_path, capsys, constants, message):
    assert_refused(tmp_path, capsys, message, **constants)


@pytest.mark.slow
def test_partial_work_on_flower_equals_the_in_process_run_and_resumes_bit_for_bit(
        tmp_path, monkeypatch, tenth_of_the_data):
    """FedNova with a deadline that leaves stragglers partial work and over-selection: the
    Flower apps' handlers (tests/fake_grid.py) ship each node its clients' step limits."""
    import checkpoints
    import flower_app
    import node_cache
    from fake_grid import FakeGrid

    monkeypatch.setattr(node_cache, "load_data_and_partition", lambda config, *folders: (
        tenth_of_the_data, configuration.partition_data(config, tenth_of_the_data.y_train)))
    setting = {"NUM_CLIENTS": 10, "CLIENT_FRACTION": 0.5, "ROUNDS": 3, "SEED": 1,
               "DEVICE_HETEROGENEITY": "lognormal", "ROUND_DEADLINE": 8,
               "STRAGGLER_POLICY": "partial", "OVER_SELECTION": 1.4, "ALGORITHM": "fednova",
               "DP_NOISE": "seeded"}
    grid = FakeGrid({11: {"partition-id": 0, "num-partitions": 2},
                     22: {"partition-id": 1, "num-partitions": 2}})
    runs = {}
    for label, engine in (("flower", lambda constants: flower_app.FlowerEngine(
            grid, flower_app.NodeRoster(2), 60, constants)), ("local", None)):
        path = write_config(tmp_path / f"{label}.csv", OUTPUT_DIR=tmp_path / label, **setting)
        assert Main.main(["-c", "-f", str(path)], engine, flower_app.ENGINE_DEFAULTS) == 0
        runs[label] = history(tmp_path / label)
    first = write_config(tmp_path / "first.csv", OUTPUT_DIR=tmp_path / "parts",
                         **{**setting, "ROUNDS": 2})
    assert Main.main(["-c", "-f", str(first)]) == 0
    rest = write_config(tmp_path / "rest.csv", OUTPUT_DIR=tmp_path / "parts", **setting,
                        RESUME=True)
    assert Main.main(["-c", "-f", str(rest)]) == 0
    runs["resumed"] = history(tmp_path / "parts")
    strip = [[{key: value for key, value in row.items() if key != "seconds"} for row in rows]
             for rows in runs.values()]
    assert strip[0] == strip[1] == strip[2]
    assert sum(int(row["partial"]) for row in runs["local"]) > 0
    assert all(int(row["over_selection_cut"]) == 2 for row in runs["local"])
    assert all(int(row["rejected"]) == 0 for row in runs["local"])
    weights = []
    for label in ("flower", "local", "parts"):
        (run_dir,) = (tmp_path / label).iterdir()
        arrays, _ = checkpoints.load_checkpoint(run_dir / checkpoints.CHECKPOINT_NAME)
        weights.append([arrays[f"global_{index}"] for index in range(6)])
    for flower, local, resumed in zip(*weights):
        np.testing.assert_array_equal(flower, local)
        np.testing.assert_array_equal(resumed, local)


# --- FedBuff ------------------------------------------------------------------------------------

class FixedUpdates:
    """An engine whose clients always upload the same update: +value on every weight."""

    def __init__(self, server, values, batch_size=32, epochs=1):
        self.server, self.values = server, values
        self.batch_size, self.epochs = batch_size, epochs

    def train(self, count, clients, global_weights, received=None, step_limits=None):
        import upload_format

        (client,) = clients
        size = self.server.client_sizes[client]
        update = [{"values": np.full(shape, self.values[client], np.float32)}
                  for shape in self.server.upload_shapes]
        return [upload_format.Upload(client, count, update, size, upload_format.num_local_steps(
            size, self.batch_size, self.epochs), 0.5)]

    def settle(self, count, accepted):
        pass


def test_fedbuff_orders_arrivals_and_weights_staleness_as_worked_by_hand(tenth_of_the_data):
    """Two clients, both always running: A takes 1 s, B 2.5 s (transfers are instant).
    t=1 A arrives (staleness 0) and restarts; t=2 A again: step 1 = (dA + dA) / 2.
    A restarts from version 1; t=2.5 B arrives, started at version 0: staleness 1; B restarts;
    t=3 A (staleness 0): step 2 = (dB / sqrt(2) + dA) / 2."""
    import fedbuff

    config = clock_config(NUM_CLIENTS=2, ASYNC_BUFFER=2, MAX_CONCURRENCY=2, SEED=0)
    federation = Main.build_federation(config, tenth_of_the_data, configuration.partition_data(
        config, tenth_of_the_data.y_train))
    sizes = federation.server.client_sizes
    federation.devices = devices.DeviceProfiles(np.array([sizes[0] / 1.0, sizes[1] / 2.5]),
                                                np.full(2, 1e12), np.full(2, 1e12))
    engine = FixedUpdates(federation.server, {0: 1.0, 1: 10.0})
    start = federation.global_model.get_weights()
    first, report, started, clock = fedbuff.server_step(config, federation, start, engine)
    assert started == 3 and clock["staleness_max"] == 0
    assert clock["virtual_seconds"] == pytest.approx(2.0, abs=1e-3)
    assert [upload.client for upload in report.accepted] == [0, 0]
    for layer, before in zip(first, start):
        np.testing.assert_allclose(layer, before + 1.0, rtol=1e-6)
    second, report, started, clock = fedbuff.server_step(config, federation, first, engine)
    assert [upload.client for upload in report.accepted] == [1, 0] and started == 2
    assert clock == {"virtual_seconds": pytest.approx(1.0, abs=1e-3), "staleness_mean": 0.5,
                     "staleness_max": 1}
    for layer, before in zip(second, first):
        np.testing.assert_allclose(layer, before + (10 / np.sqrt(2) + 1) / 2, rtol=1e-6)


@pytest.mark.slow
def test_fedbuff_runs_and_a_resumed_run_continues_its_event_queue_bit_for_bit(
        tmp_path, tenth_of_the_data):
    setting = {"NUM_CLIENTS": 20, "ROUNDS": 4, "SEED": 3, "DEVICE_HETEROGENEITY": "lognormal",
               "ASYNC_BUFFER": 3, "MAX_CONCURRENCY": 6, "LEARNING_RATE": 0.05}
    run_whole_and_resumed(tmp_path, setting, 2)
    rows, parts = history(tmp_path / "whole"), history(tmp_path / "parts")
    strip = [[{key: value for key, value in row.items() if key != "seconds"} for row in run]
             for run in (rows, parts)]
    assert strip[0] == strip[1]
    assert [int(row["returned"]) for row in rows] == [3] * 4
    assert max(int(row["staleness_max"]) for row in rows) >= 1
    assert float(rows[-1]["test_accuracy"]) > 0.2


@pytest.mark.parametrize("constants, message", [
    ({"ASYNC_BUFFER": -1}, "ASYNC_BUFFER must be an integer >= 0, got -1"),
    ({"MAX_CONCURRENCY": 0}, "MAX_CONCURRENCY must be an integer >= 1, got 0"),
    ({"ASYNC_BUFFER": 5}, "ASYNC_BUFFER > 0 (FedBuff) needs DEVICE_HETEROGENEITY not none"),
    ({"ASYNC_BUFFER": 5, "DEVICE_HETEROGENEITY": "lognormal", "ALGORITHM": "scaffold"},
     "ASYNC_BUFFER > 0 (FedBuff) needs ALGORITHM one of fedavg, fedprox, got scaffold"),
    ({"ASYNC_BUFFER": 5, "DEVICE_HETEROGENEITY": "lognormal", "MAX_CONCURRENCY": 101},
     "MAX_CONCURRENCY must be at most the 100 clients that train, got 101"),
])
def test_bad_fedbuff_constants_give_one_line_and_exit_two(tmp_path, capsys, constants, message):
    assert_refused(tmp_path, capsys, message, **constants)


def test_fedbuff_is_refused_on_flower_with_the_reason():
    import flower_app

    with pytest.raises(ValueError, match="ASYNC_BUFFER > 0 \\(FedBuff\\) runs in process only"):
        flower_app.refuse_unsupported({**clock_config(ASYNC_BUFFER=5), "OUTPUT_DIR": "/tmp"})


def clock_rows(accuracies, hours, **columns):
    """History rows of a run on the virtual clock: accuracy and running hours per round, 2 MB
    up and 0.5 M samples trained a round, and the given per-round columns."""
    return [{"round": index + 1, "test_accuracy": accuracy, "mb_up_total": 2.0 * (index + 1),
             "seconds": 1.0, "virtual_hours_total": hour, "samples_trained": 500_000,
             **{name: values[index] for name, values in columns.items()}}
            for index, (accuracy, hour) in enumerate(zip(accuracies, hours))]


def test_the_clock_table_reports_hours_to_target_megabytes_and_stragglers_per_round():
    import comparison

    def config(seed):
        return {"ROUNDS": 2, "SEED": seed, "DEVICE_HETEROGENEITY": "lognormal"}

    groups = {
        "partial": [(config(0), clock_rows([0.7, 0.85], [0.5, 1.0], deadline_dropped=[0, 0],
                                           partial=[3, 5], over_selection_cut=[0, 0])),
                    (config(1), clock_rows([0.82, 0.9], [0.25, 0.5], deadline_dropped=[0, 0],
                                           partial=[2, 2], over_selection_cut=[0, 0]))],
        "fedbuff": [(config(0), clock_rows([0.6, 0.7], [0.1, 0.2], staleness_mean=[1.0, 3.0]))],
    }
    _, _, partial, fedbuff = comparison.clock_table(groups, 0.8).splitlines()
    # Hours to 0.8: 1.0 (round 2) and 0.25 (round 1); partial per round: 4 and 2.
    assert partial == ("| partial | lognormal | 2 | 0.8750 ± 0.0354 | 0.75 ± 0.35 | "
                       "0.62 ± 0.53 (2/2) | 1.00 ± 0.00 | 4.0 ± 0.0 | "
                       "0.0 ± 0.0 / 3.0 ± 1.4 / 0.0 ± 0.0 |  |")
    assert fedbuff == ("| fedbuff | lognormal | 1 | 0.7000 | 0.20 | not reached | 1.00 | 4.0 "
                       "|  | 2.00 |")


def test_the_baseline_trains_as_many_samples_as_partial_clients_did(tmp_path, monkeypatch,
                                                                    tenth_of_the_data):
    """The centralized baseline trains after each round on as many samples as the federation
    trained: a straggler's partial work counts its steps' samples, not its n x E."""
    import centralized_baseline
    import client_host

    asked, trained = [], []
    baseline_train = centralized_baseline.CentralizedBaseline.train
    host_train = client_host.ClientHost.train

    def record_baseline(self, num_samples):
        asked.append(num_samples)
        return baseline_train(self, num_samples)

    def record_clients(self, round_num, clients, global_weights, variate=None, limits=None):
        uploads = host_train(self, round_num, clients, global_weights, variate, limits)
        trained.append(sum(2 * upload.num_examples if upload.client not in (limits or {}) else
                           devices.steps_within(upload.num_examples, 32, 2,
                                                32 * limits[upload.client])[1]
                           for upload in uploads))
        return uploads

    monkeypatch.setattr(centralized_baseline.CentralizedBaseline, "train", record_baseline)
    monkeypatch.setattr(client_host.ClientHost, "train", record_clients)
    run = write_config(tmp_path / "run.csv", OUTPUT_DIR=tmp_path / "out", NUM_CLIENTS=10,
                       CLIENT_FRACTION=1.0, LOCAL_EPOCHS=2, ROUNDS=2,
                       CENTRALIZED_BASELINE=True, DEVICE_HETEROGENEITY="lognormal",
                       ROUND_DEADLINE=4, STRAGGLER_POLICY="partial")
    assert Main.main(["-c", "-f", str(run)]) == 0
    (run_dir,) = (tmp_path / "out").iterdir()
    with open(run_dir / "history.csv") as file:
        rows = list(csv.DictReader(file))
    assert all(int(row["partial"]) > 0 for row in rows), rows
    assert asked == trained and all(0 < count < 2 * int(row["samples"])
                                    for count, row in zip(asked, rows)), (asked, rows)
    # `samples` is the returned clients' n (FedAvg's weights); `samples_trained` their steps'.
    assert [int(row["samples_trained"]) for row in rows] == trained
