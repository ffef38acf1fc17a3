"""SecAgg+ on the Flower engine (flower_secagg.py): the protocol's messages between our ServerApp
and ClientApp give the in-process run's weights bit for bit, a node that fails after sharing its
keys is unmasked from the others' shares and its clients are left out, below the threshold the
round keeps the model, and what the server receives from a node is not its sum.

The first tests run the apps' own handlers behind an in-process grid (tests/fake_grid.py), the
last ones on real SuperLink and SuperNode processes on loopback."""

import numpy as np
import pytest

import client_host
import Client_side
import configuration
import flower_app
import flower_secagg
import Main
import node_cache
import secure_aggregation
import Server_side
import Utils
from conftest import round_clients, write_config
from flower_cluster import Cluster
from test_flower_app import history_and_weights

# 6 iid clients of a tenth of the data, all trained every round, on 2 or 3 nodes.
SMALL = {"NUM_CLIENTS": 6, "CLIENT_FRACTION": 1.0, "DISTRIBUTION": "iid", "SEED": 5,
         "ROUNDS": 2, "LEARNING_RATE": 0.05, "SECURE_AGGREGATION": "secagg+"}
BYTES = ("bytes_up", "bytes_down", "mb_up_total", "mb_down_total")


def without_bytes(rows):
    """History rows without the traffic: the protocol's messages count on Flower only."""
    return [{key: value for key, value in row.items() if key not in BYTES} for row in rows]


def assert_equals_in_process(tmp_path, setting):
    """Run `setting` in process into tmp_path/local: its history (but the bytes) and weights
    equal the Flower run's in tmp_path/flower. Returns (Flower rows, local rows, weights)."""
    local = write_config(tmp_path / "local.csv", OUTPUT_DIR=tmp_path / "local", **setting)
    assert Main.main(["-c", "-f", str(local)]) == 0
    flower_rows, flower_weights = history_and_weights(tmp_path / "flower")
    local_rows, local_weights = history_and_weights(tmp_path / "local")
    assert without_bytes(flower_rows) == without_bytes(local_rows)
    for on_flower, in_process in zip(flower_weights, local_weights, strict=True):
        np.testing.assert_array_equal(on_flower, in_process)
    return flower_rows, local_rows, flower_weights


def assert_equals_in_process_without(flower_dir, tmp_path, setting, data, nodes, lost):
    """The Flower run in `flower_dir` has the weights of an in-process run (into
    tmp_path/local) where partition `lost`'s clients never deliver. Returns both histories."""
    config = {**Main.default_config(), **setting}
    local = write_config(tmp_path / "local.csv", OUTPUT_DIR=tmp_path / "local", **setting)
    assert Main.main(["-c", "-f", str(local)], lambda constants: LosingEngine(
        config, data, nodes, lost)) == 0
    flower_rows, flower_weights = history_and_weights(flower_dir)
    local_rows, local_weights = history_and_weights(tmp_path / "local")
    for on_flower, in_process in zip(flower_weights, local_weights, strict=True):
        np.testing.assert_array_equal(on_flower, in_process)
    return flower_rows, local_rows


def grid_for(monkeypatch, data, tmp_path, nodes, failing=()):
    """A FakeGrid of `nodes` nodes (ids 11, 22, ...) serving `data`; `failing` partitions fail
    after sharing their keys."""
    from fake_grid import FakeGrid

    monkeypatch.setattr(node_cache, "load_data_and_partition", lambda config, *folders: (
        data, configuration.partition_data(config, data.y_train)))
    cache = str(tmp_path / "cache")
    return FakeGrid({11 * (partition + 1): {
        "partition-id": partition, "num-partitions": nodes, "cache-dir": cache,
        **({"secagg-fail-after-sharing": True} if partition in failing else {})}
        for partition in range(nodes)})


def run_on(grid, nodes, tmp_path, name, **setting):
    path = write_config(tmp_path / f"{name}.csv", OUTPUT_DIR=tmp_path / name, **setting)
    return Main.main(["-c", "-f", str(path)], lambda constants: flower_app.FlowerEngine(
        grid, flower_app.NodeRoster(nodes), 60, constants), flower_app.ENGINE_DEFAULTS)


def initial_weights(seed):
    """The global model a run of SEED `seed` starts from."""
    Utils.seed_everything(seed)
    return Server_side.create_model().get_weights()


class LosingEngine:
    """In process, but the uploads of the clients of partition `lost` of `nodes` never
    arrive: what a round is without a node that dropped out."""

    def __init__(self, config, data, nodes, lost):
        self.nodes, self.lost = nodes, lost
        self.host = client_host.ClientHost(Client_side.ClientSettings.from_config(config),
                                           Server_side.create_model(), data.x_train,
                                           data.y_train,
                                           configuration.partition_data(config, data.y_train))

    def train(self, round_num, clients, global_weights, received=None, step_limits=None):
        uploads = self.host.train(round_num, clients, global_weights, received, step_limits)
        return [upload for upload in uploads if upload.client % self.nodes != self.lost]

    def settle(self, round_num, accepted_clients):
        self.host.settle(round_num, accepted_clients)


@pytest.mark.slow
@pytest.mark.parametrize("constants", [{}, {"DP_CLIP_NORM": 0.5, "DP_NOISE": "seeded",
                                            "CLIENT_SAMPLING": "poisson",
                                            "CLIENT_FRACTION": 0.9,
                                            "SERVER_OPTIMIZER": "fedadam", "SERVER_LR": 0.01},
                                       {"ALGORITHM": "fednova", "LOCAL_MOMENTUM": 0.5,
                                        "DISTRIBUTION": "noniid_ib"},
                                       {"ALGORITHM": "scaffold", "CLIENT_FRACTION": 0.5,
                                        "ROUNDS": 3},
                                       {"PERSONALIZATION": "fedper", "LOCAL_TEST_SHARE": 0.25}],
                         ids=["fedavg", "dp_poisson_fedadam", "fednova", "scaffold", "fedper"])
def test_secagg_on_flower_equals_the_in_process_run(monkeypatch, tmp_path, tenth_of_the_data,
                                                    constants):
    setting = {**SMALL, **constants}
    grid = grid_for(monkeypatch, tenth_of_the_data, tmp_path, nodes=3)
    assert run_on(grid, 3, tmp_path, "flower", **setting) == 0
    flower_rows, local_rows, flower_weights = assert_equals_in_process(tmp_path, setting)
    # Three nodes send one masked sum each, not six contributions, plus keys and shares.
    sums = secure_aggregation.encoded_size(Main.default_config(),
                                           [weights.shape for weights in flower_weights])
    assert 3 * sums < int(flower_rows[0]["bytes_up"]) < 3 * sums + 10_000 < int(
        local_rows[0]["bytes_up"]) or constants


@pytest.mark.slow
def test_secagg_a_node_failing_after_sharing_keys_is_unmasked_and_its_clients_left_out(
        monkeypatch, tmp_path, tenth_of_the_data, capsys):
    """Node 33 (partition 2 of 3) fails every round between sharing its keys and sending its
    input; 2 of 3 nodes reach the threshold (0.6 x 3 -> 2): each round's aggregate is the
    in-process one without node 33's clients, whose uploads never arrive there."""
    grid = grid_for(monkeypatch, tenth_of_the_data, tmp_path, nodes=3, failing=(2,))
    assert run_on(grid, 3, tmp_path, "flower", **SMALL) == 0
    assert "clients [2, 5] left out of the secure sum: " + flower_secagg.DROPPED in (
        capsys.readouterr().err)
    flower_rows, local_rows = assert_equals_in_process_without(
        tmp_path / "flower", tmp_path, SMALL, tenth_of_the_data, 3, 2)
    assert [row["test_accuracy"] for row in flower_rows] == [
        row["test_accuracy"] for row in local_rows]
    assert all(row["rejected"] == "2" for row in flower_rows)


@pytest.mark.slow
def test_secagg_below_the_threshold_the_round_keeps_the_model(monkeypatch, tmp_path,
                                                              tenth_of_the_data, capsys):
    """Of 2 nodes, one fails after sharing its keys: 1 share, fewer than 0.6 x 2 -> 2."""
    grid = grid_for(monkeypatch, tenth_of_the_data, tmp_path, nodes=2, failing=(1,))
    assert run_on(grid, 2, tmp_path, "flower", **{**SMALL, "ROUNDS": 1}) == 0
    assert "nothing was unmasked" in capsys.readouterr().err
    _, weights = history_and_weights(tmp_path / "flower")
    for kept, first in zip(weights, initial_weights(SMALL["SEED"]), strict=True):
        np.testing.assert_array_equal(kept, first)


@pytest.mark.slow
def test_secagg_what_the_server_receives_from_a_node_is_not_its_sum(monkeypatch, tmp_path,
                                                                    tenth_of_the_data):
    """The masked input a node sends differs from the sum of its clients' contributions in
    nearly every entry and is uncorrelated with it."""
    grid = grid_for(monkeypatch, tenth_of_the_data, tmp_path, nodes=2)
    seen = []
    handle = flower_secagg.client_masked_input

    def spy(message, context):
        stored = [record.to_numpy_ndarrays() for name, record
                  in context.state.array_records.items()
                  if name.startswith(flower_secagg.CONTRIBUTION)]
        own = [sum(np.uint64(layer) for layer in layers) & np.uint64(2**32 - 1)
               for layers in zip(*stored)]
        reply = handle(message, context)
        seen.append((own, reply.content.array_records[flower_secagg.MASKED].to_numpy_ndarrays()))
        return reply

    import fake_grid
    monkeypatch.setitem(fake_grid.HANDLERS, flower_secagg.MASK_TYPE, spy)
    assert run_on(grid, 2, tmp_path, "flower", **{**SMALL, "ROUNDS": 1}) == 0
    assert len(seen) == 2
    for own, sent in seen:
        own, sent = (np.concatenate([np.ravel(layer) for layer in layers]).astype(float)
                     for layers in (own, sent))
        assert np.mean(own == sent) < 0.01
        assert abs(np.corrcoef(own, sent)[0, 1]) < 0.1


# --- On real SuperLink and SuperNode processes --------------------------------------------

@pytest.mark.slow
def test_secagg_on_real_nodes_equals_the_in_process_run(tmp_path_factory, tmp_path,
                                                        real_data_once):
    """Two SuperNodes on loopback run the four stages; history (but its bytes) and weights
    equal `python Main.py`'s."""
    setting = {"NUM_CLIENTS": 20, "CLIENT_FRACTION": 0.2, "DISTRIBUTION": "iid", "ROUNDS": 2,
               "SEED": 3, "SECURE_AGGREGATION": "secagg+"}
    config = {**Main.default_config(), **setting}
    assert {int(client) % 2 for client in round_clients(config, 1)[1]} == {0, 1}
    cluster = Cluster(tmp_path_factory.mktemp("flower_secagg")).start()
    try:
        flower_csv = write_config(tmp_path / "flower.csv", OUTPUT_DIR=tmp_path / "flower",
                                  **setting)
        result = cluster.run_app(flower_csv, round_timeout=300)
    finally:
        cluster.stop()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_equals_in_process(tmp_path, setting)


@pytest.mark.slow
def test_secagg_on_real_nodes_a_failing_node_is_unmasked_or_the_round_kept(
        tmp_path_factory, tmp_path, real_data_once, fashion_mnist):
    """Three SuperNodes; node 2 fails after sharing its keys whenever it has clients (round 2
    of seed 3: clients 0, 7, 13 and 14 on nodes 0, 1, 1, 2). With SECAGG_THRESHOLD 0.6 (2 of
    3) nodes 0 and 1 make round 2, as in process without client 14; with 1.0 (3 of 3) nothing
    is unmasked and round 2 keeps round 1's model."""
    setting = {"NUM_CLIENTS": 20, "CLIENT_FRACTION": 0.2, "DISTRIBUTION": "iid", "ROUNDS": 2,
               "SEED": 3, "SECURE_AGGREGATION": "secagg+"}
    config = {**Main.default_config(), **setting}
    assert {int(client) % 3 for client in round_clients(config, 2)[1]} == {0, 1, 2}
    cluster = Cluster(tmp_path_factory.mktemp("flower_secagg_drop"), num_nodes=3,
                      extra_node_config={2: "secagg-fail-after-sharing=true"}).start()
    try:
        results = {}
        for threshold in (0.6, 1.0):
            path = write_config(tmp_path / f"t{threshold}.csv",
                                OUTPUT_DIR=tmp_path / f"t{threshold}", **setting,
                                SECAGG_THRESHOLD=threshold)
            results[threshold] = cluster.run_app(path, round_timeout=300)
    finally:
        cluster.stop()
    for result in results.values():
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "clients [14] left out of the secure sum: " + flower_secagg.DROPPED in (
        results[0.6].stdout)
    assert "nothing was unmasked" in results[1.0].stdout
    assert_equals_in_process_without(tmp_path / "t0.6", tmp_path, setting, fashion_mnist, 3, 2)
    kept, _ = history_and_weights(tmp_path / "t1.0")
    assert kept[1]["test_loss"] == kept[0]["test_loss"]
    assert kept[1]["test_accuracy"] == kept[0]["test_accuracy"]


def test_secagg_on_one_node_is_refused_in_one_line(tmp_path, capsys):
    """One node's sum is its input: a SecAgg+ run on a single node is refused before training."""
    from flwr.app import Context, RecordDict

    path = write_config(tmp_path / "one.csv", OUTPUT_DIR=tmp_path / "out",
                        SECURE_AGGREGATION="secagg+")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={
        "config-file": str(path), "num-nodes": 1, "round-timeout": 60})
    with pytest.raises(flower_app.RunFailed, match="exit code 2"):
        flower_app.server_main(None, context)
    assert "error: SECURE_AGGREGATION secagg+ needs num-nodes >= 2" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
