"""Run Main.py's federation across machines on Flower's Deployment Engine (flwr 1.42).

The ServerApp is `Main.main` with another engine: instead of training the round's clients in its
own process, it sends every SuperNode one message a round (the global weights and the clients it
hosts), and each node's ClientApp runs `Client_side.ClientHost.train` for them, as
`python Main.py` does. Selection, dropout, decoding, aggregation, server optimizers, DP,
evaluation, history, plots and checkpoints are the project's own code on the server side; Flower
only carries the messages. SuperNode p of N hosts the clients c with c mod N == p (its node
config), loads its own copy of the data, partitions it from SEED and keeps its clients' state
(SCAFFOLD's c_i, top-k residuals) between rounds in its context.

Run on one machine (the README's "Across machines" section has TLS and authentication):
    flower-superlink --insecure --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:8000 --port 9094 \
        --node-config "partition-id=0 num-partitions=2"        (and partition-id=1, port 9095)
    flwr run . local-deployment --stream --run-config 'config-file="/abs/path/my.csv"'
"""

import contextlib
import dataclasses
import json
import logging
import pathlib
import sys
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

import Client_side
import Data_Preprocessing
import Main
import Server_side
import Utils

MESSAGE_TYPE = "train.round"
# The ServerApp asks the SuperLink for replies this often (Grid.send_and_receive waits 3 s).
POLL_SECONDS = 0.2
LOGGER = logging.getLogger("flower_app")
EXIT_MEANINGS = {Main.EXIT_BAD_INPUT: "bad input", Main.EXIT_DIVERGED: "diverged",
                 Main.EXIT_INTERRUPTED: "interrupted"}

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def server_main(grid, context):
    """Run Main.main on the run config's CSV(s), training clients on the SuperNodes."""
    try:
        files, num_nodes, timeout = read_run_config(context.run_config)
    except ValueError as error:
        print(f"error: {error}", flush=True)
        raise RunFailed(f"Main.py exit code {Main.EXIT_BAD_INPUT} (bad input)") from None

    def make_engine(config):
        refuse_unsupported(config)
        return FlowerEngine(grid, num_nodes, timeout, config).train

    # Flower streams the ServerApp's standard output to `flwr run --stream`; Main.py's one-line
    # errors go to standard error, so they are sent there too.
    with contextlib.redirect_stderr(sys.stdout):
        exit_code = Main.main(["-c", "-f", *files] if files else [], make_engine)
    if exit_code:
        # Flower marks a run failed, with this text, when the ServerApp raises (sys.exit would
        # kill the process before its status and logs are sent).
        raise RunFailed(f"Main.py exit code {exit_code} ({EXIT_MEANINGS[exit_code]})")


def read_run_config(run_config):
    """Return (config files, num-nodes, round-timeout) from `flwr run`'s run config.

    Raises ValueError naming the key and what it allows.
    """
    files = str(run_config.get("config-file", "")).split()
    relative = [path for path in files if not pathlib.Path(path).expanduser().is_absolute()]
    if relative:
        raise ValueError(f"config-file must name absolute paths on the SuperLink's machine (the "
                         f"ServerApp runs in Flower's own folder), got {', '.join(relative)}")
    num_nodes, timeout = run_config.get("num-nodes"), run_config.get("round-timeout")
    if not Utils.is_integer(num_nodes) or num_nodes < 1:
        raise ValueError(f"num-nodes must be an integer >= 1, got {num_nodes!r}")
    if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
            or not 0 < timeout < float("inf")):
        raise ValueError(f"round-timeout must be a number of seconds > 0, got {timeout!r}")
    return files, num_nodes, float(timeout)


class RunFailed(Exception):
    """Main.main ended with a non-zero exit code on Flower."""


class FlowerEngine:
    """Train a round's clients on the SuperNodes: one message per node and round.

    Args:
        grid: Flower's Grid of the ServerApp.
        num_nodes: N, how many SuperNodes share the K clients (client c on node c mod N).
        timeout: seconds a round waits for replies; a node silent by then counts as dropped.
        config: the run's constants, shipped to the nodes with every round.
    """

    def __init__(self, grid, num_nodes, timeout, config):
        self.grid, self.num_nodes, self.timeout = grid, num_nodes, timeout
        self.config = config

    def train(self, round_num, clients, global_weights, server_variate=None):
        """Send the round to every node; return what came back: Uploads, and Rejections for
        what could not be read or came from a node that does not host that client.

        Everything else is checked by Server_side.screen_uploads, as in process."""
        if len(clients) == 0:
            return []
        messages = [Message(self._content(round_num, clients, global_weights, server_variate),
                            dst_node_id=node, message_type=MESSAGE_TYPE,
                            group_id=str(round_num))
                    for node in sorted(self.grid.get_node_ids())]
        delivered = []
        for reply in self._send_and_receive(messages):
            if reply.has_error():
                LOGGER.warning("round %d: node %d replied with error %s", round_num,
                               reply.metadata.src_node_id, reply.error.reason)
                continue
            delivered += [self._owned(item) for item in uploads_from_content(reply.content,
                                                                            round_num)]
        answered = {item.client for item in delivered}
        missing = sorted({int(client) for client in clients} - answered)
        if missing:
            LOGGER.warning("round %d: no upload from clients %s within %.0f s (their node is "
                           "down, late or failed)", round_num, missing, self.timeout)
        return delivered

    def _owned(self, item):
        """Refuse an upload for a client that the node it came from does not host."""
        if isinstance(item, Client_side.Upload) and (
                item.node is None or item.client % self.num_nodes != item.node):
            return Server_side.Rejection(item.round_num, item.client, item.node,
                                         f"client {item.client} is not hosted by that node "
                                         f"(clients c mod {self.num_nodes} = node)")
        return item

    def _send_and_receive(self, messages):
        """Grid.send_and_receive, polling every POLL_SECONDS instead of its fixed 3 s."""
        waiting = set(self.grid.push_messages(messages))
        deadline, replies = time.monotonic() + self.timeout, []
        while waiting and time.monotonic() < deadline:
            received = list(self.grid.pull_messages(waiting))
            replies += received
            waiting -= {reply.metadata.reply_to_message_id for reply in received}
            if waiting:
                time.sleep(POLL_SECONDS)
        return replies

    def _content(self, round_num, clients, global_weights, server_variate):
        settings = {"config": json.dumps(self.config, default=str), "round": int(round_num),
                    "clients": [int(client) for client in clients],
                    "num-nodes": self.num_nodes}
        content = RecordDict({"settings": ConfigRecord(settings),
                              "global": ArrayRecord(list(global_weights))})
        if server_variate is not None:
            content["variate"] = ArrayRecord(list(server_variate))
        return content


def refuse_unsupported(config):
    """Raise ValueError for what cannot run on Flower, saying why."""
    for name in ("OUTPUT_DIR", "DATA_DIR"):
        if config[name] is not None and not pathlib.Path(config[name]).expanduser().is_absolute():
            raise ValueError(f"{name} must be an absolute path on Flower (the ServerApp runs in "
                             f"Flower's own folder), got {config[name]}")
    kept = Client_side.kept_state_names(config)
    if config["RESUME"] and kept:
        raise ValueError(f"RESUME cannot continue a run on Flower that keeps client state "
                         f"({', '.join(kept)}): it lives on the SuperNodes and ends with their "
                         "run; resume it with python Main.py, or start over")


def uploads_from_content(content, round_num=None):
    """Read what a node's reply carries (records 'upload.<c>', 'metrics.<c>' and 'node').

    A node can send anything: an upload that cannot be read becomes a Rejection saying why.
    """
    node = _partition_of(content)
    items = []
    for name, record in content.array_records.items():
        if not name.startswith("upload."):
            continue
        client = name.split(".", 1)[1]
        try:
            upload = Client_side.Upload.from_arrays(
                {key: array.numpy() for key, array in record.items()},
                content.metric_records[f"metrics.{client}"])
        except Exception as error:  # noqa: BLE001 (any malformed content is a rejection)
            items.append(Server_side.Rejection(round_num, client, node,
                                               f"unreadable upload ({type(error).__name__})"))
            continue
        upload.node = node
        items.append(upload)
    return items


def _partition_of(content):
    """The partition id the replying node states, or None when it states none."""
    try:
        return int(content.config_records["node"]["partition-id"])
    except (KeyError, TypeError, ValueError):
        return None


def content_from_uploads(uploads, partition_id):
    """The reply of a node: its partition, and one ArrayRecord and MetricRecord per client."""
    content = RecordDict({"node": ConfigRecord({"partition-id": int(partition_id)})})
    for upload in uploads:
        arrays, metrics = upload.to_arrays()
        content[f"upload.{upload.client}"] = ArrayRecord(
            {name: Array(array) for name, array in arrays.items()})
        content[f"metrics.{upload.client}"] = MetricRecord(metrics)
    return content


@client_app.train("round")
def client_train(message, context):
    """Train this node's share of the round's clients with Client_side.ClientHost.train."""
    settings = message.content["settings"]
    config = json.loads(settings["config"])
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    if num_partitions != settings["num-nodes"]:
        raise ValueError(f"this SuperNode's num-partitions is {num_partitions} but the run's "
                         f"num-nodes is {settings['num-nodes']}")
    data = Data_Preprocessing.load_fashion_mnist(
        context.node_config.get("data-dir") or config["DATA_DIR"])
    Utils.make_deterministic()
    Utils.seed_everything(config["SEED"])
    host = Client_side.ClientHost(config, Server_side.create_model(), data.x_train,
                                  data.y_train, Main.partition_data(config, data.y_train))
    for name, memory in host.memory.items():
        if f"memory.{name}" in context.state:
            memory.set_state(context.state[f"memory.{name}"].to_numpy_ndarrays())
    mine = [client for client in settings["clients"] if client % num_partitions == partition_id]
    variate = (message.content["variate"].to_numpy_ndarrays()
               if "variate" in message.content else None)
    uploads = host.train(settings["round"], mine,
                         message.content["global"].to_numpy_ndarrays(), variate)
    for name, memory in host.memory.items():
        context.state[f"memory.{name}"] = ArrayRecord(memory.get_state())
    if context.node_config.get("corrupt-uploads"):
        uploads = [corrupted(upload) for upload in uploads]
    return Message(content_from_uploads(uploads, partition_id), reply_to=message)


def corrupted(upload):
    """What a broken or hostile node might send: a first layer of NaN under an unknown name.

    Only a node started with the node config 'corrupt-uploads=true' does this; it lets the
    tests show that the server rejects such uploads and goes on.
    """
    layers = [{"garbage": np.full(5, np.nan, np.float32)}] + list(upload.update[1:])
    return dataclasses.replace(upload, update=layers)
