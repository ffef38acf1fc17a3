"""Tests of the Flower engine: the wire format, refusals, and real SuperLink/SuperNode runs.

The slow tests start Flower's own processes on loopback (tests/flower_cluster.py) and check that
a run there is the same experiment as `python Main.py`: the same final weights, bit for bit.
"""

import csv
import json
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import checkpoints
import client_host
import Client_side
import configuration
import flower_app
import flower_records
import Main
import Server_side
import upload_format
from conftest import round_clients, write_config
from flower_cluster import Cluster, make_node_key, make_tls_files

# 20 iid clients of 3,000 samples, 4 a round: a few seconds of training a round.
TINY = {"NUM_CLIENTS": 20, "CLIENT_FRACTION": 0.2, "DISTRIBUTION": "iid", "ROUNDS": 2,
        "SEED": 3}


def history_and_weights(output_dir):
    (run_dir,) = output_dir.iterdir()
    with open(run_dir / "history.csv") as file:
        rows = [{key: value for key, value in row.items() if key != "seconds"}
                for row in csv.DictReader(file)]
    arrays, _ = checkpoints.load_checkpoint(run_dir / checkpoints.CHECKPOINT_NAME)
    return rows, [arrays[name] for name in sorted(arrays) if name.startswith("global")]


def test_the_apps_module_does_not_import_tensorflow():
    """Flower starts a ClientApp process for every message: the partition query and the
    secure-aggregation stages must not wait for TensorFlow's import."""
    code = "import sys, flower_app; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    folder = str(pathlib.Path(flower_app.__file__).parent)
    result = subprocess.run([sys.executable, "-c", code], cwd=folder,
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_client_scores_survive_the_wire_format_and_a_malformed_reply_gives_none():
    from flwr.app import MetricRecord, RecordDict

    from client_evaluation import ClientScore

    scores = [ClientScore(3, 40, 12, 38), ClientScore(7, 5, 0, 5)]
    assert flower_records.scores_from_content(flower_records.content_from_scores(scores)) == scores
    ragged = RecordDict({"scores": MetricRecord({"client": [1, 2], "samples": [3],
                                                 "global_correct": [1], "personal_correct": [1]})})
    assert flower_records.scores_from_content(ragged) == []
    assert flower_records.scores_from_content(RecordDict()) == []


def test_an_upload_survives_the_wire_format():
    rng = np.random.default_rng(0)
    delta = [rng.standard_normal((3, 4)), rng.standard_normal(5)]
    for compression in upload_format.COMPRESSIONS:
        encoded = upload_format.encode_update(delta, compression, rng, topk_fraction=0.5)
        variate = [rng.standard_normal((3, 4)).astype(np.float32), np.zeros(5, np.float32)]
        sent = upload_format.Upload(7, 3, encoded, 120, 8, 0.25, {"variate": variate})
        (received,) = flower_records.uploads_from_content(
            flower_records.content_from_uploads([sent]), round_num=3, node=123456789)
        assert received.node == 123456789
        assert (received.client, received.round_num, received.num_examples,
                received.num_steps, received.train_loss) == (7, 3, 120, 8, 0.25)
        for before, after in zip(upload_format.decode_update(sent.update, [(3, 4), (5,)]),
                                 upload_format.decode_update(received.update, [(3, 4), (5,)])):
            np.testing.assert_array_equal(before, after)
        for before, after in zip(variate, received.extras["variate"]):
            np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("constants, message", [
    ({"OUTPUT_DIR": "results"}, "OUTPUT_DIR must be an absolute path on Flower"),
    ({"DATA_DIR": "data"}, "DATA_DIR must be an absolute path on Flower"),
    ({"RESUME": True, "ALGORITHM": "scaffold"}, "RESUME cannot continue a run on Flower"),
    ({"RESUME": True, "COMPRESSION": "topk"}, "RESUME cannot continue a run on Flower"),
])
def test_what_flower_cannot_run_is_refused_with_the_reason(constants, message):
    config = {**Main.default_config(), **constants}
    with pytest.raises(ValueError, match=message):
        flower_app.refuse_unsupported(config)


def test_flower_draws_dp_noise_from_os_entropy_unless_the_config_asks_for_seeded(tmp_path):
    plain = write_config(tmp_path / "plain.csv", DP_CLIP_NORM=0.1, OUTPUT_DIR=tmp_path / "a")
    seeded = write_config(tmp_path / "seeded.csv", DP_CLIP_NORM=0.1, DP_NOISE="seeded",
                          OUTPUT_DIR=tmp_path / "b")
    arguments = Main.parse_arguments(["-c", "-f", str(plain), str(seeded)])
    on_flower = configuration.load_configs(arguments, Main.default_config(),
                                           flower_app.ENGINE_DEFAULTS)
    assert [config["DP_NOISE"] for _, config in on_flower] == ["secure", "seeded"]
    in_process = configuration.load_configs(arguments, Main.default_config())
    assert [config["DP_NOISE"] for _, config in in_process] == ["seeded", "seeded"]


@pytest.mark.parametrize("run_config, message", [
    ({"config-file": "my.csv"}, "config-file must name absolute paths"),
    ({"num-nodes": 0}, "num-nodes must be an integer >= 1, got 0"),
    ({"num-nodes": "two"}, "num-nodes must be an integer >= 1, got 'two'"),
    ({"num-nodes": 2.5}, "num-nodes must be an integer >= 1, got 2.5"),
    ({"round-timeout": 0}, "round-timeout must be a number of seconds > 0, got 0"),
    ({"round-timeout": "soon"}, "round-timeout must be a number of seconds > 0, got 'soon'"),
])
def test_a_bad_run_config_names_the_key(run_config, message):
    defaults = {"config-file": "/abs/my.csv", "num-nodes": 2, "round-timeout": 600}
    with pytest.raises(ValueError, match=re.escape(message)):
        flower_app.read_run_config({**defaults, **run_config})
    assert flower_app.read_run_config(defaults) == (["/abs/my.csv"], 2, 600.0, None)


@pytest.mark.parametrize("text", ["12:0", "12:0,13:0", "12:0,12:1", "12:0,13:2", "a:0,b:1",
                                  "12:0:1,13:1", "12-0,13-1"])
def test_a_bad_node_partitions_map_names_the_key(text):
    run_config = {"config-file": "", "num-nodes": 2, "round-timeout": 60,
                  "node-partitions": text}
    with pytest.raises(ValueError, match="node-partitions must be '<node id>:<partition>,...' "
                                         "with every partition 0..1 once"):
        flower_app.read_run_config(run_config)
    run_config["node-partitions"] = " 12:1,13:0 "
    assert flower_app.read_run_config(run_config)[3] == {12: 1, 13: 0}


def test_an_impostor_claiming_a_held_partition_gets_no_work_and_is_logged_once(caplog):
    roster = flower_app.NodeRoster(2)
    for node, partition in [(11, 0), (22, 1), (33, 0)]:  # 33 answers last, claiming 0
        roster.claim(node, partition)
    for round_num in (1, 2):
        assert roster.hosts(round_num, [11, 22, 33]) == {11: 0, 22: 1}
    impostor_lines = [record.getMessage() for record in caplog.records
                      if "impostor" in record.getMessage()]
    assert impostor_lines == ["round 1: node 33 claims partition 0, which node 11 holds: it "
                              "gets no work (a possible impostor)"]


def test_a_claimant_takes_over_only_when_the_holder_has_left():
    """A restarted node gets a new id; it hosts its partition once the old id is gone."""
    roster = flower_app.NodeRoster(2)
    roster.claim(11, 0), roster.claim(22, 1)
    assert roster.hosts(1, [11, 22]) == {11: 0, 22: 1}
    roster.claim(44, 1)  # node 22 restarted as 44, while 22 is still listed
    assert roster.hosts(2, [11, 22, 44]) == {11: 0, 22: 1}
    assert roster.hosts(3, [11, 44]) == {11: 0, 44: 1}
    assert roster.unknown([11, 44, 55]) == [55]


@pytest.mark.parametrize("claim, why", [(None, "did not say which partition it hosts"),
                                        (2, "claims partition 2, not one of 0..1")])
def test_a_node_without_a_valid_claim_gets_no_work(caplog, claim, why):
    roster = flower_app.NodeRoster(2)
    roster.claim(11, 0), roster.claim(33, claim)
    assert roster.hosts(1, [11, 33]) == {11: 0}
    assert f"node 33 {why}" in caplog.text


def test_a_pinned_map_decides_and_refuses_an_unmapped_node(caplog):
    roster = flower_app.NodeRoster(2, pinned={11: 1, 22: 0})
    assert roster.unknown([11, 22, 33]) == []  # nobody is asked: the operator decided
    roster.claim(33, 0)
    assert roster.hosts(1, [11, 22, 33]) == {11: 1, 22: 0}
    assert "node 33 is not in node-partitions: it gets no work" in caplog.text


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("flower")).start()
    yield cluster
    cluster.stop()


@pytest.mark.slow
@pytest.mark.parametrize("constants", [
    {}, {"ALGORITHM": "scaffold", "COMPRESSION": "topk", "TOPK_FRACTION": 0.1},
    {"PERSONALIZATION": "fedper", "LOCAL_TEST_SHARE": 0.25, "HELD_OUT_CLIENTS": 0.1},
    {"ALGORITHM": "feddyn"}, {"ALGORITHM": "moon"},
    {"PERSONALIZATION": "apfl", "LOCAL_TEST_SHARE": 0.25, "HELD_OUT_CLIENTS": 0.1},
    {"PERSONALIZATION": "perfedavg", "LOCAL_TEST_SHARE": 0.25, "HELD_OUT_CLIENTS": 0.1}],
    ids=["fedavg", "scaffold_topk", "fedper_held_out", "feddyn", "moon", "apfl", "perfedavg"])
def test_a_run_on_flower_equals_the_in_process_run(cluster, tmp_path, real_data_once,
                                                     constants):
    """Two SuperNodes, each hosting half the clients in its own processes, give the weights
    of `python Main.py` bit for bit; with SCAFFOLD and top-k a client selected twice carries
    its variate and residual on its node from round 1 to round 2 (FedDyn: its gradient g_k,
    and the server its h; MOON: its previous model; APFL: its own model v); with FedPer it
    keeps its head there, and the nodes' per-client scores (clients.csv) equal the in-process
    ones."""
    setting = {**TINY, **constants}
    config = {**Main.default_config(), **setting}
    first, second = (set(round_clients(config, round_num)[1].tolist())
                     for round_num in (1, 2))
    assert first & second, "the test needs a client that trains in both rounds"
    flower_csv = write_config(tmp_path / "flower.csv", OUTPUT_DIR=tmp_path / "flower",
                              **setting)
    result = cluster.run_app(flower_csv, round_timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "round 2/2" in result.stdout
    local_csv = write_config(tmp_path / "local.csv", OUTPUT_DIR=tmp_path / "local", **setting)
    assert Main.main(["-c", "-f", str(local_csv)]) == 0
    flower_rows, flower_weights = history_and_weights(tmp_path / "flower")
    local_rows, local_weights = history_and_weights(tmp_path / "local")
    assert flower_rows == local_rows
    for on_flower, in_process in zip(flower_weights, local_weights, strict=True):
        np.testing.assert_array_equal(on_flower, in_process)
    if "LOCAL_TEST_SHARE" in constants:
        (flower_dir,) = (tmp_path / "flower").iterdir()
        (local_dir,) = (tmp_path / "local").iterdir()
        flower_clients = (flower_dir / "clients.csv").read_text()
        assert flower_clients == (local_dir / "clients.csv").read_text()
        assert flower_clients.count("unseen") == 2 * 2  # 2 held-out clients, 2 evaluations


@pytest.mark.slow
def test_bad_input_on_flower_gives_one_line_and_no_run(cluster, tmp_path):
    bad = write_config(tmp_path / "bad.csv", OUTPUT_DIR=tmp_path / "out", CLIENT_FRACTION=2)
    result = cluster.run_app(bad, timeout=300)
    assert "error: CLIENT_FRACTION must be a number in (0, 1], got 2.0" in result.stdout
    assert not (tmp_path / "out").exists()
    # `flwr run` itself exits 0; the run's status carries Main.py's exit code.
    runs = json.loads(cluster.flwr("ls", "test", "--format", "json").stdout)["runs"]
    assert any(run["status"] == "finished:failed"
               and "Main.py exit code 2 (bad input)" in run["status-details"] for run in runs)


def wait_for_rows(output_dir, count, process, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended early"
        histories = list(output_dir.glob("*/history.csv"))
        if histories and len(histories[0].read_text().splitlines()) > count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"no round {count} within {timeout} s")


@pytest.mark.slow
def test_a_killed_node_drops_its_clients_and_a_restarted_node_rejoins(tmp_path_factory,
                                                                       tmp_path):
    """SIGKILL node 1 after round 1: round 2 waits out the timeout and goes on with node 0's
    clients; node 1, restarted (it gets a new node id), trains its clients again later."""
    cluster = Cluster(tmp_path_factory.mktemp("flower_failure")).start()
    try:
        path = write_config(tmp_path / "failure.csv", OUTPUT_DIR=tmp_path / "out",
                            **{**TINY, "ROUNDS": 5})
        process = cluster.start_app(path, round_timeout=40)
        wait_for_rows(tmp_path / "out", 1, process)
        cluster.kill_node(1)
        wait_for_rows(tmp_path / "out", 2, process)
        cluster.start_node(1)
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-3000:]
    finally:
        cluster.stop()
    (history,) = (tmp_path / "out").glob("*/history.csv")
    rows = list(csv.DictReader(history.open()))
    config = {**Main.default_config(), **TINY}
    on_node_one = [sum(int(client) % 2 == 1 for client in
                       round_clients(config, round_num)[1])
                   for round_num in range(1, 6)]
    returned = [int(row["returned"]) for row in rows]
    selected = [int(row["clients"]) for row in rows]
    assert on_node_one[1] > 0, "the test needs node 1 to host a client of round 2"
    assert len(rows) == 5 and returned[0] == selected[0]
    assert returned[1] == selected[1] - on_node_one[1], "round 2 had node 1's clients"
    assert returned[-1] == selected[-1], "the restarted node did not rejoin"
    assert "no upload from clients" in output


@pytest.mark.slow
def test_tls_and_node_authentication_let_registered_nodes_in_and_no_stranger(tmp_path_factory,
                                                                             tmp_path):
    """SuperLink, SuperNodes and the flwr CLI talk TLS (a throwaway CA); the SuperLink admits
    only SuperNodes whose public key was registered."""
    home = tmp_path_factory.mktemp("flower_tls")
    keys = [make_node_key(home / f"node{partition}") for partition in range(3)]
    cluster = Cluster(home, tls=make_tls_files(home), node_keys=keys[:2]).start()
    try:
        # The refused SuperNode exits at once; its flower-superexec child lingers, retrying,
        # so the test watches the log and then ends the whole process group.
        cluster.start_node(0, key=keys[2], name="stranger")
        deadline = time.monotonic() + 120
        while "Failed to activate SuperNode" not in cluster.log("stranger"):
            assert time.monotonic() < deadline, cluster.log("stranger")[-2000:]
            time.sleep(0.5)
        assert "No SuperNode found with the given public key" in cluster.log("superlink")
        assert cluster.log("superlink").count("Activated node_id") == 2
        path = write_config(tmp_path / "tls.csv", OUTPUT_DIR=tmp_path / "out",
                            **{**TINY, "ROUNDS": 1})
        result = cluster.run_app(path, round_timeout=300)
        assert result.returncode == 0 and "round 1/1" in result.stdout, result.stdout[-3000:]
    finally:
        cluster.stop()
    assert "--insecure" not in " ".join(cluster.node_command(0))


@pytest.mark.slow
def test_a_node_sending_garbage_is_rejected_and_the_run_finishes(tmp_path_factory, tmp_path):
    """Node 1 sends a NaN layer under an unknown name for every client it trains: the server
    rejects each such upload, counts it in history.csv and learns from node 0's clients."""
    cluster = Cluster(tmp_path_factory.mktemp("flower_garbage"),
                      extra_node_config={1: "corrupt-uploads=true"}).start()
    try:
        path = write_config(tmp_path / "garbage.csv", OUTPUT_DIR=tmp_path / "out", **TINY)
        result = cluster.run_app(path, round_timeout=300)
    finally:
        cluster.stop()
    assert result.returncode == 0 and "round 2/2" in result.stdout, result.stdout[-3000:]
    (history,) = (tmp_path / "out").glob("*/history.csv")
    rows = list(csv.DictReader(history.open()))
    config = {**Main.default_config(), **TINY}
    for row in rows:
        returning = round_clients(config, int(row["round"]))[1]
        on_node_one = sum(int(client) % 2 == 1 for client in returning)
        assert int(row["rejected"]) == on_node_one > 0
        assert int(row["returned"]) == len(returning) - on_node_one
    assert re.search(r"from node \d+: layer 0 holds \['garbage'\]", result.stdout)
    assert float(rows[-1]["test_accuracy"]) > 0.5


@pytest.mark.slow
def test_an_impostor_claiming_partition_0_changes_nothing_and_is_named_in_the_log(
        tmp_path_factory, tmp_path, real_data_once):
    """A third node joins after round 1 claiming node 0's partition, and sends garbage for any
    client it is given: it gets no work, so the run's history and weights equal the in-process
    run's, and the ServerApp's log names it once. (Before, every node got every round's
    message and its garbage uploads were counted as rejections.)"""
    cluster = Cluster(tmp_path_factory.mktemp("flower_impostor")).start()
    setting = {**TINY, "ROUNDS": 4}
    try:
        path = write_config(tmp_path / "impostor.csv", OUTPUT_DIR=tmp_path / "flower",
                            **setting)
        process = cluster.start_app(path, round_timeout=120)
        wait_for_rows(tmp_path / "flower", 1, process)
        cluster.start_node(0, name="impostor", extra="corrupt-uploads=true")
        cluster.wait_for_nodes(3)
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-3000:]
    finally:
        cluster.stop()
    impostor = re.findall(r"round (\d+): node (\d+) claims partition 0, which node (\d+) "
                          r"holds: it gets no work \(a possible impostor\)", output)
    assert len(impostor) == 1 and int(impostor[0][0]) < 4, output[-3000:]
    local_csv = write_config(tmp_path / "local.csv", OUTPUT_DIR=tmp_path / "local", **setting)
    assert Main.main(["-c", "-f", str(local_csv)]) == 0
    flower_rows, flower_weights = history_and_weights(tmp_path / "flower")
    local_rows, local_weights = history_and_weights(tmp_path / "local")
    assert flower_rows == local_rows
    assert all(row["rejected"] == "0" for row in flower_rows)
    for on_flower, in_process in zip(flower_weights, local_weights, strict=True):
        np.testing.assert_array_equal(on_flower, in_process)


@pytest.mark.slow
def test_a_pinned_node_map_gives_no_work_to_a_registered_impostor(tmp_path_factory, tmp_path):
    """With SuperNode authentication the operator pins node ids to partitions: a third node,
    registered but not in the map, claims partition 0 from the start and gets no work."""
    home = tmp_path_factory.mktemp("flower_pinned")
    keys = [make_node_key(home / f"node{partition}") for partition in range(3)]
    cluster = Cluster(home, tls=make_tls_files(home), node_keys=keys[:2]).start()
    try:
        impostor_id = cluster.register(keys[2])
        cluster.start_node(0, key=keys[2], name="impostor", extra="corrupt-uploads=true")
        cluster.wait_for_nodes(3)
        pinned = ",".join(f"{cluster.node_ids[key]}:{partition}"
                          for partition, key in enumerate(keys[:2]))
        path = write_config(tmp_path / "pinned.csv", OUTPUT_DIR=tmp_path / "out", **TINY)
        result = cluster.run_app(path, round_timeout=300, node_partitions=f'"{pinned}"')
    finally:
        cluster.stop()
    assert result.returncode == 0 and "round 2/2" in result.stdout, (result.stdout[-3000:]
                                                                       + result.stderr[-3000:])
    assert (f"round 1: node {impostor_id} is not in node-partitions: it gets no work"
            in result.stdout)
    (history,) = (tmp_path / "out").glob("*/history.csv")
    rows = list(csv.DictReader(history.open()))
    assert all(row["rejected"] == "0" and row["returned"] == row["clients"] for row in rows)


class LosingEngine:
    """In process, but the uploads of node 1's clients (odd ids) in round 2 never arrive."""

    def __init__(self, config, data):
        self.host = client_host.ClientHost(Client_side.ClientSettings.from_config(config),
                                           Server_side.create_model(), data.x_train,
                                           data.y_train,
                                           configuration.partition_data(config, data.y_train))

    def train(self, round_num, clients, global_weights, received=None, step_limits=None):
        uploads = self.host.train(round_num, clients, global_weights, received,
                                  step_limits)
        return [upload for upload in uploads if round_num != 2 or upload.client % 2 == 0]

    def settle(self, round_num, accepted_clients):
        self.host.settle(round_num, accepted_clients)


@pytest.mark.slow
def test_a_node_whose_reply_is_lost_keeps_no_client_state_from_that_round(tmp_path,
                                                                        real_data_once,
                                                                        fashion_mnist):
    """SCAFFOLD with top-k on the Flower engine (ServerApp and ClientApp code, the grid in
    process): node 1 trains round 2 but its reply is lost. Its clients' new c_i and residuals
    of round 2 must not count: the run equals an in-process run where those uploads never
    arrived, in which the clients keep their state from before round 2."""
    from fake_grid import FakeGrid

    setting = {"NUM_CLIENTS": 100, "CLIENT_FRACTION": 0.2, "DISTRIBUTION": "iid", "ROUNDS": 4,
               "SEED": 2, "ALGORITHM": "scaffold", "COMPRESSION": "topk",
               "TOPK_FRACTION": 0.1}
    config = {**Main.default_config(), **setting}
    returning = [set(round_clients(config, round_num)[1].tolist())
                 for round_num in range(1, 5)]
    assert {client for client in returning[1] if client % 2} & (returning[2] | returning[3])
    cache = str(tmp_path / "cache")
    grid = FakeGrid({11: {"partition-id": 0, "num-partitions": 2, "cache-dir": cache},
                     22: {"partition-id": 1, "num-partitions": 2, "cache-dir": cache}},
                    lose={(22, 2)})
    flower_csv = write_config(tmp_path / "flower.csv", OUTPUT_DIR=tmp_path / "flower", **setting)
    assert Main.main(["-c", "-f", str(flower_csv)], lambda constants: flower_app.FlowerEngine(
        grid, flower_app.NodeRoster(2), 0.5, constants), flower_app.ENGINE_DEFAULTS) == 0
    local_csv = write_config(tmp_path / "local.csv", OUTPUT_DIR=tmp_path / "local", **setting)
    assert Main.main(["-c", "-f", str(local_csv)],
                     lambda constants: LosingEngine(constants, fashion_mnist)) == 0
    flower_rows, flower_weights = history_and_weights(tmp_path / "flower")
    local_rows, local_weights = history_and_weights(tmp_path / "local")
    assert flower_rows == local_rows
    assert int(flower_rows[1]["returned"]) < int(flower_rows[1]["clients"])
    for on_flower, in_process in zip(flower_weights, local_weights, strict=True):
        np.testing.assert_array_equal(on_flower, in_process)
