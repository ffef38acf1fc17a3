"""Tests of per-client evaluation (LOCAL_TEST_SHARE, HELD_OUT_CLIENTS) and personalization."""

import csv
import math

import keras
import numpy as np
import pytest

import checkpoints
import client_evaluation
import Client_side
import configuration
import Data_Preprocessing
import flower_app
import Main
import node_cache
import personalization
import Server_side
import upload_format
import Utils
from client_evaluation import ClientScore
from personalization import ditto
from conftest import assert_refused, round_clients, run_whole_and_resumed, write_config

# 6 clients holding 2 classes each of a tenth of the data, all trained every round.
SMALL = {"NUM_CLIENTS": 6, "CLIENT_FRACTION": 1.0, "DISTRIBUTION": "noniid_bi",
         "CLASSES_PER_CLIENT": 2, "LOCAL_TEST_SHARE": 0.25, "LEARNING_RATE": 0.05, "SEED": 4,
         "ROUNDS": 2}


def federation_for(data, **constants):
    config = {**Main.default_config(), **SMALL, **constants}
    configuration.validate_config(config)
    return config, Main.build_federation(config, data,
                                         configuration.partition_data(config, data.y_train))


def run_outputs(output_dir, ending=""):
    """(history rows without seconds, global weights, clients.csv rows) of the one run there
    whose name (before its hash) ends with `ending`."""
    (run_dir,) = [folder for folder in output_dir.iterdir()
                  if folder.is_dir() and folder.name.rsplit("_", 1)[0].endswith(ending)]
    with open(run_dir / "history.csv") as file:
        rows = [{key: value for key, value in row.items() if key != "seconds"}
                for row in csv.DictReader(file)]
    with open(run_dir / "clients.csv") as file:
        client_rows = list(csv.DictReader(file))
    arrays, _ = checkpoints.load_checkpoint(run_dir / checkpoints.CHECKPOINT_NAME)
    weights = [arrays[f"global_{index}"] for index in range(6)]
    return rows, weights, client_rows


# --- The split and the figures ------------------------------------------------------------------

def test_the_local_test_split_is_seeded_disjoint_and_covers_every_sample():
    labels = np.arange(3000) % 10
    partition = Data_Preprocessing.partition(labels, 8, "dirichlet", np.random.default_rng(0),
                                             dirichlet_alpha=0.3)
    partition += [np.array([2999 + 1]), np.array([3001, 3002])]  # clients of 1 and 2 samples
    split = Data_Preprocessing.split_local_test(partition, 0.25, np.random.default_rng(7))
    for indices, train, test in zip(partition, split.train, split.test, strict=True):
        assert sorted(np.concatenate([train, test]).tolist()) == sorted(indices.tolist())
        assert not set(train.tolist()) & set(test.tolist())
        assert len(test) == min(math.floor(0.25 * len(indices)), len(indices) - 1)
        assert len(train) >= 1
    assert [len(test) for test in split.test[-2:]] == [0, 0]
    again = Data_Preprocessing.split_local_test(partition, 0.25, np.random.default_rng(7))
    other = Data_Preprocessing.split_local_test(partition, 0.25, np.random.default_rng(8))
    assert all(np.array_equal(a, b) for a, b in zip(split.test, again.test))
    assert not all(np.array_equal(a, b) for a, b in zip(split.test, other.test))
    off = Data_Preprocessing.split_local_test(partition, 0.0, np.random.default_rng(7))
    assert all(a is b for a, b in zip(off.train, partition)) and not any(map(len, off.test))


def test_per_client_figures_match_a_hand_computation():
    # 11 clients: the tenth is ceil(1.1) = 2 clients.
    samples = [10, 4, 20, 5, 8, 10, 10, 10, 10, 10, 3]
    global_correct = [5, 4, 2, 5, 4, 7, 9, 1, 10, 6, 0]
    scores = [ClientScore(client, n, right, n) for client, (n, right)
              in enumerate(zip(samples, global_correct))]
    figures = client_evaluation.summarize(scores)
    accuracies = sorted(right / n for n, right in zip(samples, global_correct))
    assert figures["local_pooled"] == round(sum(global_correct) / sum(samples), 6)
    assert figures["local_mean"] == round(sum(accuracies) / 11, 6)
    mean = sum(accuracies) / 11
    assert figures["local_std"] == round(math.sqrt(sum((a - mean) ** 2 for a in accuracies) / 11),
                                         6)
    assert figures["local_worst10"] == round((0 / 3 + 2 / 20) / 2, 6)
    assert figures["local_best10"] == round((1 + 1) / 2, 6)
    assert figures["personal_pooled"] == figures["personal_worst10"] == 1.0


def test_client_reports_outside_what_a_client_holds_are_refused():
    test_indices = [np.arange(10), np.arange(4), np.arange(0), np.arange(6)]
    reports = [ClientScore(0, 10, 7, 8), ClientScore(1, 5, 1, 1), ClientScore(0, 10, 1, 1),
               ClientScore(3, 6, 7, 1), "garbage", ClientScore(9, 1, 0, 0)]
    figures, rows, refused = client_evaluation.round_figures(5, reports, test_indices, set())
    assert len(refused) == 6
    assert "9 is not a client of this run" in refused[4]
    assert "client 1 reports 5 local test samples, it holds 4" in refused[0]
    assert "client 0 reported twice" in refused[1]
    assert "client 3's global_correct 7 is outside 0..6" in refused[2]
    assert "no evaluation from clients [1, 3]" in refused[-1]
    assert [row["client"] for row in rows] == [0]
    assert figures["local_pooled"] == 0.7 and figures["personal_pooled"] == 0.8


def test_the_epochs_a_round_count_each_methods_extra_training():
    config = {**Main.default_config(), "LOCAL_EPOCHS": 2, "HEAD_EPOCHS": 10,
              "PERSONAL_EPOCHS": 3, "FINETUNE_EPOCHS": 4}
    expected = {"none": "2", "fedper": "2", "local": "2", "fedrep": "12", "ditto": "5",
                "finetune": "2 + 4 per evaluation", "apfl": "2",
                "perfedavg": "2 + 1 step per evaluation"}
    for method, epochs in expected.items():
        assert personalization.epochs_per_round({**config, "PERSONALIZATION": method}) == epochs


def test_a_report_for_a_client_without_local_test_data_is_refused():
    """A node could stop the server: a score of 0 samples for a client with no local test data
    passed as counts in 0..0 and then divided by zero. The server never asks such a client."""
    test_indices = [np.arange(4), np.arange(0), np.arange(2)]
    reports = [ClientScore(0, 4, 3, 4), ClientScore(1, 0, 0, 0), ClientScore(2, 2, 1, 2)]
    figures, rows, refused = client_evaluation.round_figures(3, reports, test_indices, set())
    assert refused == ["round 3: refused a client evaluation: client 1 holds no local test "
                       "data; it was not asked for a score"]
    assert [row["client"] for row in rows] == [0, 2]
    assert figures["local_pooled"] == round(4 / 6, 6) and figures["evaluated"] == 2


def test_attackers_and_held_out_clients_are_reported_apart_with_their_counts():
    """Ditto's paper reports benign devices: with attackers, local_* and personal_* are over
    the honest eligible clients; attackers are marked in clients.csv; each group says how many
    clients it holds, so a missing report shows in the data."""
    test_indices = [np.arange(10)] * 4 + [np.arange(0)]
    reports = [ClientScore(0, 10, 9, 9), ClientScore(1, 10, 1, 2), ClientScore(2, 10, 5, 6),
               ClientScore(3, 10, 7, 7)]
    figures, rows, refused = client_evaluation.round_figures(
        1, reports, test_indices, held_out={3}, attackers={1})
    assert figures["local_pooled"] == 0.7 and figures["personal_pooled"] == 0.75
    assert figures["evaluated"] == 2 and figures["unseen_evaluated"] == 1
    assert figures["unseen_local_pooled"] == 0.7
    assert [row["group"] for row in rows] == ["eligible", "attacker", "eligible", "unseen"]
    assert refused == []
    # Client 0's report is missing: the count says so.
    figures, _, refused = client_evaluation.round_figures(
        2, reports[1:], test_indices, held_out={3}, attackers={1})
    assert figures["evaluated"] == 1 and "no evaluation from clients [0]" in refused[0]


def test_the_scorer_counts_what_keras_predicts(fashion_mnist):
    model = Server_side.create_model()
    scorer = client_evaluation.Scorer(model, fashion_mnist.x_train[:3000],
                                      fashion_mnist.y_train[:3000])
    first = model.get_weights()
    second = [layer + np.random.default_rng(1).normal(0, 0.05, layer.shape).astype(np.float32)
              for layer in first]
    rows = [np.arange(0, 700), np.arange(900, 1000), np.arange(2000, 2999)]
    counts = scorer.count_correct([first, second, first], rows)
    for weights, indices, count in zip([first, second, first], rows, counts):
        model.set_weights(weights)
        predicted = np.argmax(model.predict(fashion_mnist.x_train[indices], verbose=0), axis=1)
        assert count == np.sum(predicted == fashion_mnist.y_train[indices])
    np.testing.assert_array_equal(scorer.count_correct([second], rows),
                                  scorer.count_correct([second] * 3, rows))


# --- The methods' mechanics ---------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fedper", "fedrep"])
def test_fedper_and_fedrep_never_upload_the_head_and_average_the_body_as_fedavg(
        tenth_of_the_data, method):
    config, federation = federation_for(tenth_of_the_data, PERSONALIZATION=method)
    start = federation.global_model.get_weights()
    clients = list(range(6))
    uploads = federation.host.train(1, clients, start)
    body_shapes = [layer.shape for layer in start[:4]]
    assert all(len(upload.update) == 4 for upload in uploads)
    new, report = federation.server.round(1, start, uploads, clients, len(clients))
    deltas = [upload_format.decode_update(upload.update, body_shapes) for upload in uploads]
    expected = Server_side.fedavg(deltas, [upload.num_examples for upload in uploads])
    for layer in range(4):
        np.testing.assert_allclose(new[layer], start[layer] + expected[layer], atol=1e-7)
    for layer in (4, 5):
        np.testing.assert_array_equal(new[layer], start[layer])
    body_bytes = sum(4 * layer.size for layer in start[:4])
    assert report.bytes_up == report.bytes_down == 6 * body_bytes
    federation.host.settle(1, [upload.client for upload in report.accepted])
    heads = [federation.host.memory["own"].get(client) for client in clients]
    assert all(not np.array_equal(head[0], start[4]) for head in heads)


def test_fedrep_trains_the_head_with_the_body_frozen_then_the_body_with_the_head_frozen(
        tenth_of_the_data):
    config, federation = federation_for(tenth_of_the_data, PERSONALIZATION="fedrep",
                                        HEAD_EPOCHS=2)
    trainers = federation.host.trainers
    start = federation.global_model.get_weights()
    indices = [federation.split.train[0]]
    (head_phase,) = trainers["head"].train_many(start, indices, [np.random.default_rng(0)])
    for layer in range(4):
        np.testing.assert_array_equal(head_phase.new_weights[layer], start[layer])
    assert head_phase.num_steps == 2 * math.ceil(len(indices[0]) / 32)
    (body_phase,) = trainers["main"].train_many(start, indices, [np.random.default_rng(0)],
                                                starts=[head_phase.new_weights])
    for layer in (4, 5):
        np.testing.assert_array_equal(body_phase.new_weights[layer], head_phase.new_weights[layer])
    assert not np.array_equal(body_phase.new_weights[0], start[0])


def test_dittos_personal_step_matches_a_numpy_reference(fashion_mnist):
    """Softmax regression, so the gradient is written by hand: v <- v - eta (grad F_i(v) +
    lambda (v - w_global)), batch by batch over the trainer's own shuffles."""
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    x, y = fashion_mnist.x_train[:60], fashion_mnist.y_train[:60]
    trainer = Client_side.LocalTrainer(model, x, y, learning_rate=0.1, momentum=0.0,
                                       batch_size=8, local_epochs=2, prox_mu=0.5)
    noise = np.random.default_rng(3)
    global_weights = [noise.normal(0, 0.01, (784, 10)).astype(np.float32),
                      noise.normal(0, 0.01, 10).astype(np.float32)]
    own = [noise.normal(0, 0.01, (784, 10)).astype(np.float32),
           noise.normal(0, 0.01, 10).astype(np.float32)]
    indices = np.arange(5, 55)
    (result,) = ditto.personal_step(trainer, global_weights, [indices], [own],
                                              [np.random.default_rng(11)])
    draws = np.random.default_rng(11)
    draws.integers(2**31)  # the dropout seed
    kernel, bias = np.float64(own[0]), np.float64(own[1])
    for _ in range(2):
        order = draws.permutation(indices)
        for start in range(0, len(order), 8):
            batch = order[start:start + 8]
            images = x[batch].reshape(len(batch), -1).astype(np.float64)
            logits = images @ kernel + bias
            probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities /= probabilities.sum(axis=1, keepdims=True)
            probabilities[np.arange(len(batch)), y[batch]] -= 1
            kernel_gradient = images.T @ probabilities / len(batch) + 0.5 * (kernel
                                                                            - global_weights[0])
            bias_gradient = probabilities.mean(axis=0) + 0.5 * (bias - global_weights[1])
            kernel, bias = kernel - 0.1 * kernel_gradient, bias - 0.1 * bias_gradient
    np.testing.assert_allclose(result.new_weights[0], kernel, atol=2e-6)
    np.testing.assert_allclose(result.new_weights[1], bias, atol=2e-6)


def test_local_uploads_nothing_and_leaves_the_global_model_as_it_was(tenth_of_the_data):
    config, federation = federation_for(tenth_of_the_data, PERSONALIZATION="local")
    start = federation.global_model.get_weights()
    uploads = federation.host.train(1, [0, 3], start)
    assert [upload.update for upload in uploads] == [[], []]
    new, report = federation.server.round(1, start, uploads, [0, 3], 2)
    assert all(a is b for a, b in zip(new, start))
    assert (report.bytes_up, report.bytes_down, len(report.accepted)) == (0, 0, 2)
    federation.host.settle(1, [0, 3])
    own = federation.host.memory["own"]
    assert 0 in own and 3 in own and 1 not in own
    assert not np.array_equal(own.get(0)[0], start[0])


def test_held_out_clients_are_never_selected():
    for sampling in ("fixed", "poisson"):
        config = {**Main.default_config(), "NUM_CLIENTS": 20, "HELD_OUT_CLIENTS": 0.25,
                  "CLIENT_FRACTION": 0.5, "CLIENT_SAMPLING": sampling}
        held_out = set(Server_side.held_out_clients(20, 0.25, 0).tolist())
        assert len(held_out) == 5
        selected = set()
        for round_num in range(1, 40):
            selected |= set(round_clients(config, round_num)[0].tolist())
        assert selected == set(range(20)) - held_out


def test_a_memory_hungry_configuration_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(configuration, "personal_state_budget", lambda: 10**6)
    config = {**Main.default_config(), "LOCAL_TEST_SHARE": 0.2, "PERSONALIZATION": "ditto"}
    per_client = personalization.state_bytes_per_client(
        "ditto", [variable.shape for variable in Server_side.create_model().weights], 2)
    assert per_client == 4 * 34826
    with pytest.raises(ValueError, match="PERSONALIZATION ditto would keep up to 0.0 GiB"):
        configuration.validate_config(config)


@pytest.mark.parametrize("constants, message", [
    ({"LOCAL_TEST_SHARE": 1.0}, "LOCAL_TEST_SHARE must be a number in [0, 1), got 1.0"),
    ({"LOCAL_TEST_SHARE": -0.1}, "LOCAL_TEST_SHARE must be a number in [0, 1), got -0.1"),
    ({"HELD_OUT_CLIENTS": 1.5}, "HELD_OUT_CLIENTS must be a number in [0, 1), got 1.5"),
    ({"PERSONALIZATION": "fedbn"},
     f"PERSONALIZATION must be one of {', '.join(personalization.NAMES)}, got 'fedbn'"),
    ({"FINETUNE_EPOCHS": 0}, "FINETUNE_EPOCHS must be an integer >= 1, got 0"),
    ({"HEAD_EPOCHS": 1.5}, "HEAD_EPOCHS must be an integer, got '1.5'"),
    ({"PERSONAL_EPOCHS": "two"}, "PERSONAL_EPOCHS must be an integer, got 'two'"),
    ({"DITTO_LAMBDA": -1}, "DITTO_LAMBDA must be a number >= 0, got -1"),
    ({"PERSONALIZATION": "ditto"}, "PERSONALIZATION ditto needs LOCAL_TEST_SHARE > 0"),
    ({"HELD_OUT_CLIENTS": 0.1}, "HELD_OUT_CLIENTS 0.1 needs LOCAL_TEST_SHARE > 0"),
    ({"LOCAL_TEST_SHARE": 0.2, "HELD_OUT_CLIENTS": 0.996},
     "HELD_OUT_CLIENTS must leave at least one of the 100 clients to train"),
    ({"LOCAL_TEST_SHARE": 0.2, "PERSONALIZATION": "fedrep", "ALGORITHM": "scaffold"},
     "PERSONALIZATION fedrep needs ALGORITHM one of fedavg"),
    ({"LOCAL_TEST_SHARE": 0.2, "PERSONALIZATION": "local", "COMPRESSION": "int8"},
     "PERSONALIZATION local uploads nothing, so COMPRESSION int8 has nothing to act on"),
])
def test_bad_new_constants_give_one_line_and_exit_two(tmp_path, capsys, constants, message):
    assert_refused(tmp_path, capsys, message, **constants)


@pytest.mark.parametrize("method", ["fedper", "fedrep"])
def test_label_flipping_attackers_keep_honest_own_heads(tenth_of_the_data, method):
    """By hand: 2 clients of 2 classes, one flips its labels (9 - y), 3 rounds. Its upload is
    trained on flipped labels, but its own head is trained on its true ones: before the fix its
    own model scored 0.0 on its true test labels (the head predicted the flipped classes)."""
    config, federation = federation_for(tenth_of_the_data, PERSONALIZATION=method,
                                        NUM_CLIENTS=2, MALICIOUS_FRACTION=0.5,
                                        ATTACK="label_flip")
    (attacker,) = federation.malicious
    # Its upload still attacks: in round 1 it differs from the same client's honest upload,
    # while the honest client's is the same with or without an attacker beside it.
    _, honest_federation = federation_for(tenth_of_the_data, PERSONALIZATION=method,
                                          NUM_CLIENTS=2)
    start = honest_federation.global_model.get_weights()
    clients = [0, 1]
    attacked = federation.host.train(1, clients, start)
    honest = honest_federation.host.train(1, clients, start)
    body_shapes = [layer.shape for layer in start[:4]]
    for attacked_upload, honest_upload in zip(attacked, honest):
        same = all(np.array_equal(a, b) for a, b in zip(
            upload_format.decode_update(attacked_upload.update, body_shapes),
            upload_format.decode_update(honest_upload.update, body_shapes)))
        assert same == (attacked_upload.client != attacker)
    weights = federation.global_model.get_weights()
    for round_num in (1, 2, 3):
        uploads = federation.host.train(round_num, clients, weights)
        weights, report = federation.server.round(round_num, weights, uploads, clients, 2)
        federation.host.settle(round_num, [upload.client for upload in report.accepted])
    scores = {score.client: score for score in federation.host.evaluate(4, clients, weights)}
    assert scores[attacker].personal_correct / scores[attacker].samples > 0.8, scores


# --- Whole runs ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_every_client_is_evaluated_and_unseen_clients_are_reported_apart(tmp_path,
                                                                         tenth_of_the_data):
    path = write_config(tmp_path / "run.csv", OUTPUT_DIR=tmp_path / "run", **SMALL,
                        HELD_OUT_CLIENTS=0.34, PERSONALIZATION="fedper")
    assert Main.main(["-c", "-f", str(path)]) == 0
    rows, weights, client_rows = run_outputs(tmp_path / "run")
    held_out = set(Server_side.held_out_clients(6, 0.34, SMALL["SEED"]).tolist())
    assert len(held_out) == 2 and all(int(row["clients"]) == 4 for row in rows)
    assert [row["round"] for row in client_rows] == ["1"] * 6 + ["2"] * 6
    assert {int(row["client"]) for row in client_rows if row["group"] == "unseen"} == held_out
    last = rows[-1]
    trained = [row for row in client_rows[6:] if row["group"] == "eligible"]
    assert float(last["personal_mean"]) == pytest.approx(
        np.mean([float(row["personal_accuracy"]) for row in trained]), abs=1e-6)
    # Own heads on 2-class clients beat the global model's untrained head by far.
    assert float(last["personal_pooled"]) > float(last["local_pooled"]) + 0.3
    assert float(last["unseen_personal_pooled"]) > 0.5
    (run_dir,) = (tmp_path / "run").iterdir()
    arrays, _ = checkpoints.load_checkpoint(run_dir / checkpoints.CHECKPOINT_NAME)
    assert set(arrays["client_own_0"].tolist()) == set(range(6)) - held_out
    assert (run_dir / "clients.png").exists()


@pytest.mark.slow
def test_with_none_the_personal_figures_are_the_global_ones_and_ditto_keeps_fedavgs_model(
        tmp_path, tenth_of_the_data):
    """Compared in one call: comparison.md gains the per-client table, and a box plot."""
    paths = [write_config(tmp_path / f"{method}.csv", OUTPUT_DIR=tmp_path / "runs", **SMALL,
                          PERSONALIZATION=method) for method in ("none", "ditto")]
    assert Main.main(["-c", "-f", *map(str, paths)]) == 0
    none_rows, none_weights, _ = run_outputs(tmp_path / "runs", "_s4")
    ditto_rows, ditto_weights, _ = run_outputs(tmp_path / "runs", "_ditto")
    for figure in client_evaluation.FIGURES:
        assert none_rows[-1][f"local_{figure}"] == none_rows[-1][f"personal_{figure}"]
    for ours, fedavg in zip(ditto_weights, none_weights, strict=True):
        np.testing.assert_array_equal(ours, fedavg)
    assert [row["test_accuracy"] for row in ditto_rows] == [row["test_accuracy"]
                                                             for row in none_rows]
    assert float(ditto_rows[-1]["personal_pooled"]) > float(ditto_rows[-1]["local_pooled"])
    table = (tmp_path / "runs" / "comparison.md").read_text()
    # Ditto trains its own model an epoch beside its global update: 2 epochs a round.
    ditto_line = next(line for line in table.splitlines()
                      if line.startswith("| ditto | ditto | 2 |"))
    assert f"| {float(ditto_rows[-1]['personal_pooled']):.4f} |" in ditto_line
    assert (tmp_path / "runs" / "comparison_clients.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ditto", "fedrep", "finetune"])
def test_a_resumed_run_with_personal_state_equals_one_run(tmp_path, tenth_of_the_data, method):
    setting = {**SMALL, "ROUNDS": 3, "PERSONALIZATION": method}
    run_whole_and_resumed(tmp_path, setting, 2)
    whole_rows, whole_weights, whole_clients = run_outputs(tmp_path / "whole")
    part_rows, part_weights, part_clients = run_outputs(tmp_path / "parts")
    assert part_rows == whole_rows and part_clients == whole_clients
    for resumed, straight in zip(part_weights, whole_weights, strict=True):
        np.testing.assert_array_equal(resumed, straight)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedper", "ditto"])
def test_personalization_on_the_flower_engine_equals_the_in_process_run(
        tmp_path, monkeypatch, tenth_of_the_data, method):
    """The Flower apps' own handlers behind an in-process grid (tests/fake_grid.py): nodes
    keep their clients' own models in their state and report per-client scores."""
    from fake_grid import FakeGrid

    monkeypatch.setattr(node_cache, "load_data_and_partition", lambda config, *folders: (
        tenth_of_the_data, configuration.partition_data(config, tenth_of_the_data.y_train)))

    setting = {**SMALL, "ROUNDS": 3, "CLIENT_FRACTION": 0.5, "PERSONALIZATION": method,
               "DP_NOISE": "seeded"}
    config = {**Main.default_config(), **setting}
    assert len(set.union(*(set(round_clients(config, round_num)[1].tolist())
                           for round_num in (1, 2)))) > 3
    cache = str(tmp_path / "cache")
    grid = FakeGrid({11: {"partition-id": 0, "num-partitions": 2, "cache-dir": cache},
                     22: {"partition-id": 1, "num-partitions": 2, "cache-dir": cache}})
    flower_csv = write_config(tmp_path / "flower.csv", OUTPUT_DIR=tmp_path / "flower", **setting)
    assert Main.main(["-c", "-f", str(flower_csv)], lambda constants: flower_app.FlowerEngine(
        grid, flower_app.NodeRoster(2), 60, constants), flower_app.ENGINE_DEFAULTS) == 0
    local_csv = write_config(tmp_path / "local.csv", OUTPUT_DIR=tmp_path / "local", **setting)
    assert Main.main(["-c", "-f", str(local_csv)]) == 0
    flower = run_outputs(tmp_path / "flower")
    local = run_outputs(tmp_path / "local")
    assert flower[0] == local[0] and flower[2] == local[2]
    for on_flower, in_process in zip(flower[1], local[1], strict=True):
        np.testing.assert_array_equal(on_flower, in_process)


@pytest.mark.slow
@pytest.mark.parametrize("constants", [
    {"PERSONALIZATION": "fedper", "ALGORITHM": "fedprox", "COMPRESSION": "int8"},
    {"PERSONALIZATION": "fedrep", "ALGORITHM": "fednova", "SERVER_OPTIMIZER": "fedadam",
     "SERVER_LR": 0.01, "CLIENT_DROPOUT": 0.3},
    {"PERSONALIZATION": "fedper", "DP_CLIP_NORM": 1.0, "CLIENT_SAMPLING": "poisson",
     "CLIENT_FRACTION": 0.6, "HELD_OUT_CLIENTS": 0.2},
    {"PERSONALIZATION": "fedrep", "COMPRESSION": "topk", "TOPK_FRACTION": 0.1,
     "AGGREGATION": "median", "MALICIOUS_FRACTION": 0.2, "ATTACK": "label_flip"},
    {"PERSONALIZATION": "ditto", "ALGORITHM": "scaffold", "LOCAL_MOMENTUM": 0.5},
    {"PERSONALIZATION": "ditto", "AGGREGATION": "krum", "KRUM_F": 1, "MALICIOUS_FRACTION": 0.2,
     "ATTACK": "sign_flip", "PERSONAL_EPOCHS": 2, "DITTO_LAMBDA": 0.0},
    {"PERSONALIZATION": "finetune", "ALGORITHM": "scaffold", "COMPRESSION": "topk",
     "FINETUNE_EPOCHS": 2, "CENTRALIZED_BASELINE": True},
    {"PERSONALIZATION": "local", "BATCH_SIZE": 0, "LOCAL_EPOCHS": 2, "HELD_OUT_CLIENTS": 0.3},
], ids=["fedper_prox_int8", "fedrep_nova_adam_dropout", "fedper_dp_held_out",
        "fedrep_topk_median_label_flip", "ditto_scaffold", "ditto_krum_sign_flip",
        "finetune_scaffold_topk_baseline", "local_fedsgd_held_out"])
def test_personalization_combines_with_the_other_options(tmp_path, capsys, tenth_of_the_data,
                                                         constants):
    """Two rounds of each combination run through, every client is scored every round, and
    the layers a method keeps on the clients never move in the global model. With DP the run
    says that epsilon does not cover the per-client figures."""
    setting = {**SMALL, "NUM_CLIENTS": 10, **constants}
    path = write_config(tmp_path / "run.csv", OUTPUT_DIR=tmp_path / "run", **setting)
    assert Main.main(["-c", "-f", str(path)]) == 0
    printed = capsys.readouterr().out
    assert (Utils.EPSILON_DOES_NOT_COVER in printed) == ("DP_CLIP_NORM" in constants)
    rows, weights, client_rows = run_outputs(tmp_path / "run")
    assert len(client_rows) == 2 * 10 and all(rows[-1][f"personal_{figure}"] != ""
                                             for figure in client_evaluation.FIGURES)
    _, federation = federation_for(tenth_of_the_data, **setting)
    initial = federation.global_model.get_weights()
    # The layers the method declares shared move; the others keep their initial values.
    shared = {"model": range(6), "body": range(4), "head": range(4, 6), None: ()}[
        personalization.get(setting["PERSONALIZATION"]).UPLOADS]
    for index in range(6):
        kept = index not in shared
        assert np.array_equal(weights[index], initial[index]) == kept
