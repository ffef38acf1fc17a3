"""Run Main.py's federation across machines on Flower's Deployment Engine (flwr 1.42).

The ServerApp is `Main.main` with another engine: instead of training the round's clients in its
own process, it sends every hosting SuperNode one message a round (the global weights and the
clients it hosts), and each node's ClientApp runs `client_host.ClientHost.train` for them, as
`python Main.py` does. Selection, dropout, decoding, aggregation, server optimizers, DP,
evaluation, history, plots and checkpoints are the project's own code on the server side; Flower
only carries the messages. Partition p of N holds the clients c with c mod N == p; which node
hosts which partition is the server's decision (`NodeRoster`), and an upload is accepted only
from the node its client was sent to. A node loads its own copy of the data, partitions it from
SEED and keeps its clients' state (SCAFFOLD's c_i, top-k residuals) between rounds in its context.

Run on one machine (docs/across_machines.md has TLS and authentication):
    flower-superlink --insecure --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:8000 --port 9094 \
        --node-config "partition-id=0 num-partitions=2"        (and partition-id=1, port 9095)
    flwr run . local-deployment --stream --run-config 'config-file="/abs/path/my.csv"'
"""

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import sys
import time

# As in Main.py: quiet TensorFlow's C++ start-up lines unless the user chose a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402 (after the log level above)
from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

# Flower starts a new ClientApp process for every message, and the partition query and the
# secure-aggregation stages need no TensorFlow: what imports it (training, evaluation, Main.main;
# about 4 s a process) is imported in the functions that run it.
import algorithms  # noqa: E402
import client_state  # noqa: E402
import flower_records  # noqa: E402
import flower_secagg  # noqa: E402
import screening  # noqa: E402
import secure_aggregation  # noqa: E402
import Utils  # noqa: E402
import upload_format  # noqa: E402

MESSAGE_TYPE = "train.round"
QUERY_TYPE = "query.partition"
EVALUATE_TYPE = "evaluate.clients"
# The ServerApp asks the SuperLink for replies this often (Grid.send_and_receive waits 3 s).
POLL_SECONDS = 0.2
LOGGER = logging.getLogger("flower_app")
# Across machines the published config must not let anyone regenerate the DP noise; a config
# file that sets DP_NOISE seeded (to reproduce a simulation) still gets seeded noise.
ENGINE_DEFAULTS = {"DP_NOISE": "secure"}

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def server_main(grid, context):
    """Run Main.main on the run config's CSV(s), training clients on the SuperNodes."""
    import Main  # noqa: PLC0415 (TensorFlow: see the imports)

    try:
        files, num_nodes, timeout, pinned = read_run_config(context.run_config)
    except ValueError as error:
        print(f"error: {error}", flush=True)
        raise RunFailed(f"Main.py exit code {Main.EXIT_BAD_INPUT} (bad input)") from None

    def make_engine(config):
        refuse_unsupported(config)
        if config["SECURE_AGGREGATION"] != "none" and num_nodes < flower_secagg.MIN_CONTRIBUTORS:
            raise ValueError(f"SECURE_AGGREGATION {config['SECURE_AGGREGATION']} needs num-nodes "
                             f">= {flower_secagg.MIN_CONTRIBUTORS}: one node's sum is its input")
        return FlowerEngine(grid, NodeRoster(num_nodes, pinned), timeout, config)

    # Flower streams the ServerApp's standard output to `flwr run --stream`; Main.py's one-line
    # errors go to standard error, so they are sent there too.
    with contextlib.redirect_stderr(sys.stdout):
        exit_code = Main.main(["-c", "-f", *files] if files else [], make_engine,
                              ENGINE_DEFAULTS)
    if exit_code:
        # Flower marks a run failed, with this text, when the ServerApp raises (sys.exit would
        # kill the process before its status and logs are sent).
        meanings = {Main.EXIT_BAD_INPUT: "bad input", Main.EXIT_DIVERGED: "diverged",
                    Main.EXIT_INTERRUPTED: "interrupted"}
        raise RunFailed(f"Main.py exit code {exit_code} ({meanings[exit_code]})")


def read_run_config(run_config):
    """Return (config files, num-nodes, round-timeout, node-partitions) from the run config.

    node-partitions is None (nodes claim their partition) or {node id: partition}.
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
    pinned = parse_node_partitions(run_config.get("node-partitions", ""), num_nodes)
    return files, num_nodes, float(timeout), pinned


def parse_node_partitions(text, num_nodes):
    """Read node-partitions '<node id>:<partition>,...' into {node id: partition}; '' is None.

    Every partition 0..N-1 must have exactly one node, so no client is left without a host.
    """
    text = str(text).strip()
    if not text:
        return None
    allowed = (f"node-partitions must be '<node id>:<partition>,...' with every partition "
               f"0..{num_nodes - 1} once (node ids as `flwr supernode list` shows them)")
    try:
        pairs = [tuple(int(part) for part in item.split(":")) for item in text.split(",")]
        pinned = dict(pairs)
    except ValueError:
        raise ValueError(f"{allowed}, got {text!r}") from None
    if (any(len(pair) != 2 for pair in pairs) or len(pinned) != len(pairs)
            or sorted(pinned.values()) != list(range(num_nodes))):
        raise ValueError(f"{allowed}, got {text!r}")
    return pinned


class RunFailed(Exception):
    """Main.main ended with a non-zero exit code on Flower."""


class NodeRoster:
    """Which SuperNode hosts which partition: the server's decision, not a node's claim.

    Partition p of N holds the clients c with c mod N == p. Without a pinned map, the server
    asks every new node which partition it hosts (its node config `partition-id`) and gives a
    free partition to the first live node that claims it; a node claiming a partition that a
    live node already holds gets no work (logged once), and takes over only when the holder
    leaves Flower's list of live nodes (e.g. a restarted node, which gets a new id). With a
    pinned map (run config node-partitions, for SuperNode authentication, where a node id is
    tied to a registered key) the map decides and a node not in it gets no work.
    """

    def __init__(self, num_nodes, pinned=None):
        self.num_nodes, self.pinned = num_nodes, pinned
        self.claims = {}  # node id -> the partition it claimed, in the order they answered
        self.holders = {}  # partition -> node id
        self.refused = set()  # nodes already logged as given no work

    def unknown(self, live_nodes):
        """Return the live nodes to ask for their partition (none with a pinned map)."""
        return [] if self.pinned else [node for node in live_nodes if node not in self.claims]

    def claim(self, node, partition):
        """Record what `node` says it hosts (None when it gave no readable answer)."""
        self.claims[node] = partition

    def hosts(self, round_num, live_nodes):
        """Return {node id: partition} of the nodes that get work this round."""
        live = set(live_nodes)
        if self.pinned:
            for node in sorted(live - set(self.pinned)):
                self._refuse(round_num, node, "is not in node-partitions")
            return {node: partition for node, partition in self.pinned.items() if node in live}
        self.holders = {partition: node for partition, node in self.holders.items()
                        if node in live}
        for node, partition in self.claims.items():
            if node not in live or self.holders.get(partition) == node:
                continue
            if partition is None:
                self._refuse(round_num, node, "did not say which partition it hosts")
            elif not (Utils.is_integer(partition) and 0 <= partition < self.num_nodes):
                self._refuse(round_num, node, f"claims partition {partition!r}, not one of "
                                              f"0..{self.num_nodes - 1}")
            elif partition in self.holders:
                self._refuse(round_num, node, f"claims partition {partition}, which node "
                                              f"{self.holders[partition]} holds")
            else:
                self.holders[partition] = node
        return {node: partition for partition, node in self.holders.items()}

    def _refuse(self, round_num, node, why):
        if node not in self.refused:
            self.refused.add(node)
            LOGGER.warning("round %d: node %d %s: it gets no work (a possible impostor)",
                           round_num, node, why)


class FlowerEngine:
    """Train a round's clients on the SuperNodes: one message per hosting node and round.

    Args:
        grid: Flower's Grid of the ServerApp.
        roster: the NodeRoster deciding which node hosts which clients.
        timeout: seconds a round waits for replies; a node silent by then counts as dropped.
        config: the run's constants, shipped to the nodes with every round.
    """

    def __init__(self, grid, roster, timeout, config):
        self.grid, self.roster, self.timeout = grid, roster, timeout
        self.config = config
        self.accepted = {}  # round -> the clients whose uploads the server accepted
        self.advertised = {}  # under secure aggregation: node -> its keys, this round
        # node -> {round: clients sent}: rounds whose outcome the node has not yet been told.
        self.unsettled = {}

    def settle(self, round_num, accepted_clients):
        """Note which uploads of `round_num` the server accepted; each node learns it with its
        next message and keeps the new state of those clients only (client_host.ClientHost)."""
        needed = {past for rounds in self.unsettled.values() for past in rounds}
        self.accepted = {past: clients for past, clients in self.accepted.items()
                         if past in needed}
        self.accepted[round_num] = {int(client) for client in accepted_clients}

    def train(self, round_num, clients, global_weights, received=None, step_limits=None):
        """Send each hosting node its clients of the round; return what came back: Uploads,
        and Rejections for what could not be read or came for a client not sent to that node.

        Everything else is checked by screening.screen_uploads, as in process."""
        if len(clients) == 0:
            return []
        work = self._work(round_num, [int(client) for client in clients])
        messages = self._messages(round_num, work, MESSAGE_TYPE, lambda node, node_clients:
                                  self._round_content(round_num, node, node_clients,
                                                      global_weights, received,
                                                      step_limits))
        for node, node_clients in work.items():
            self.unsettled.setdefault(node, {})[round_num] = node_clients
        delivered, self.advertised = [], {}
        secure = self.config["SECURE_AGGREGATION"] != "none"
        for node, content in self._replies(round_num, messages, "replied with error"):
            # Its reply shows that the node read the outcomes of its earlier rounds.
            self.unsettled[node] = {round_num: work[node]} if node in work else {}
            items = [self._sent_to(item, work.get(node, ()))
                     for item in flower_records.uploads_from_content(content, round_num, node)]
            if secure:  # The updates stay on the node until the protocol sums them.
                items = [dataclasses.replace(item, update=secure_aggregation.HELD)
                         if isinstance(item, upload_format.Upload) else item for item in items]
                keys = flower_secagg.advertised_keys(content)
                if keys and node in work:
                    self.advertised[node] = keys
            delivered += items
        missing = sorted(set(int(client) for client in clients)
                         - {item.client for item in delivered})
        if missing:
            LOGGER.warning("round %d: no upload from clients %s within %.0f s (their node is "
                           "down, late or failed)", round_num, missing, self.timeout)
        return delivered

    def secure_sum(self, round_num, accepted, shapes):
        """The modular sum of the accepted clients' contributions, by SecAgg+'s protocol among
        the round's nodes (flower_secagg.py): a secure_aggregation.SecureSum."""
        return flower_secagg.secure_sum(self, round_num, accepted, shapes, self.advertised)

    def evaluate(self, round_num, clients, global_weights):
        """Ask each hosting node to score its clients' models on their local test data;
        return the ClientScores that came back (the server checks them).

        The message also tells each node which of its uploads were accepted, so it scores
        the own models the server's view says its clients have (as in process)."""
        work = self._work(round_num, [int(client) for client in clients])
        messages = self._messages(round_num, work, EVALUATE_TYPE, lambda node, node_clients:
                                  self._round_content(round_num, node, node_clients,
                                                      global_weights))
        scores = []
        for node, content in self._replies(round_num, messages, "could not evaluate:"):
            self.unsettled[node] = {}  # It settled its rounds before scoring.
            sent = set(work.get(node, ()))
            reported = flower_records.scores_from_content(content)
            foreign = sorted({score.client for score in reported} - sent)
            if foreign:
                LOGGER.warning("round %d: node %d reported scores of clients %s, not sent to "
                               "it: ignored", round_num, node, foreign)
            scores += [score for score in reported if score.client in sent]
        return scores

    def _round_content(self, round_num, node, node_clients, global_weights,
                       received=None, step_limits=None):
        """The message content for `node`: its clients, their step limits, its outcomes."""
        limits = {str(client): step_limits[client] for client in node_clients
                  if client in (step_limits or {})}
        return flower_records.round_content(self.config, self.roster.num_nodes, round_num,
                                            node_clients, global_weights, received,
                                            self._outcomes(node), limits)

    @staticmethod
    def _messages(round_num, work, message_type, content_of):
        """One message of `message_type` to each node of `work`, content_of(node, its clients)."""
        return [Message(content_of(node, node_clients), dst_node_id=node,
                        message_type=message_type, group_id=str(round_num))
                for node, node_clients in sorted(work.items())]

    def _replies(self, round_num, messages, failure):
        """Send the messages; yield (node, content) of each reply, logging error replies
        ("round r: node n <failure> <reason>") and leaving them out."""
        for reply in self._send_and_receive(messages):
            node = reply.metadata.src_node_id
            if reply.has_error():
                LOGGER.warning("round %d: node %d %s %s", round_num, node, failure,
                               reply.error.reason)
                continue
            yield node, reply.content

    def _work(self, round_num, clients):
        """Return {node id: its clients this round}, asking new nodes for their partition."""
        live = sorted(self.grid.get_node_ids())
        unknown = self.roster.unknown(live)
        if unknown:
            queries = [Message(RecordDict(), dst_node_id=node, message_type=QUERY_TYPE,
                               group_id=str(round_num)) for node in unknown]
            # A node that does not answer within the timeout claims nothing: asking it again
            # every round would cost every round the timeout.
            answers = {reply.metadata.src_node_id: flower_records.partition_of(reply.content)
                       for reply in self._send_and_receive(queries) if not reply.has_error()}
            for node in unknown:
                self.roster.claim(node, answers.get(node))
        hosts = self.roster.hosts(round_num, live)
        work = {node: [client for client in clients
                       if client % self.roster.num_nodes == partition]
                for node, partition in hosts.items()}
        return {node: node_clients for node, node_clients in work.items() if node_clients}

    def _outcomes(self, node):
        """Return {round: accepted clients} for the node's rounds it has not been told about."""
        return {str(past): sorted(self.accepted.get(past, set()) & set(clients))
                for past, clients in self.unsettled.get(node, {}).items()}

    @staticmethod
    def _sent_to(item, node_clients):
        """Refuse an upload for a client that was not sent to the node it came from."""
        if isinstance(item, upload_format.Upload) and item.client not in node_clients:
            return screening.Rejection(item.round_num, item.client, item.node,
                                       f"client {item.client} was not sent to that node")
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

def refuse_unsupported(config):
    """Raise ValueError for what cannot run on Flower, saying why."""
    import personalization  # noqa: PLC0415 (TensorFlow: see the imports)

    paths = ("OUTPUT_DIR", "DATA_DIR") + (
        ("DEVICE_HETEROGENEITY",) if config["DEVICE_HETEROGENEITY"] not in ("none", "lognormal")
        else ())
    for name in paths:
        if config[name] is not None and not pathlib.Path(config[name]).expanduser().is_absolute():
            raise ValueError(f"{name} must be an absolute path on Flower (the ServerApp runs in "
                             f"Flower's own folder), got {config[name]}")
    if config["ASYNC_BUFFER"]:
        raise ValueError("ASYNC_BUFFER > 0 (FedBuff) runs in process only: the Flower engine "
                         "runs synchronous rounds (use python Main.py)")
    kept = client_state.kept_state_names(algorithms.get(config["ALGORITHM"]),
                                         config["COMPRESSION"],
                                         personalization.get(config["PERSONALIZATION"]))
    if config["RESUME"] and kept:
        raise ValueError(f"RESUME cannot continue a run on Flower that keeps client state "
                         f"({', '.join(kept)}): it lives on the SuperNodes and ends with their "
                         "run; resume it with python Main.py, or start over")


@client_app.query("partition")
def client_partition(message, context):
    """Tell the server which partition this node claims (its node config); the server decides."""
    return Message(RecordDict({"node": ConfigRecord(
        {"partition-id": int(context.node_config["partition-id"])})}), reply_to=message)


def node_host(settings, context):
    """The node's ClientHost for the run in `settings`, with its clients' kept state."""
    import client_host  # noqa: PLC0415 (TensorFlow: see the imports)
    import Client_side  # noqa: PLC0415
    import configuration  # noqa: PLC0415
    import node_cache  # noqa: PLC0415
    import Server_side  # noqa: PLC0415

    config = json.loads(settings["config"])
    num_partitions = int(context.node_config["num-partitions"])
    if num_partitions != settings["num-nodes"]:
        raise ValueError(f"this SuperNode's num-partitions is {num_partitions} but the run's "
                         f"num-nodes is {settings['num-nodes']}")
    # Loaded and partitioned once per node, then read from the node's disk (node_cache).
    data, client_indices = node_cache.load_data_and_partition(
        config, context.node_config.get("data-dir") or config["DATA_DIR"],
        context.node_config.get("cache-dir") or node_cache.default_cache_dir())
    split = configuration.client_split(config, client_indices)
    Utils.make_deterministic()
    Utils.seed_everything(config["SEED"])
    host = client_host.ClientHost(Client_side.ClientSettings.from_config(config),
                                  Server_side.create_model(config["MODEL"]), data.x_train,
                                  data.y_train, split.train,
                                  split.test if config["LOCAL_TEST_SHARE"] > 0 else None)
    flower_records.restore_client_state(host, context.state)
    return host


@client_app.evaluate("clients")
def client_evaluate(message, context):
    """Score the global model and each of the sent clients' own models on their local test
    data with client_host.ClientHost.evaluate; nothing is kept."""
    settings = message.content["settings"]
    host = node_host(settings, context)
    settle_pending(host, settings)
    flower_records.save_client_state(host, context.state)
    scores = host.evaluate(settings["round"], list(settings["clients"]),
                           message.content["global"].to_numpy_ndarrays())
    return Message(flower_records.content_from_scores(scores), reply_to=message)


@client_app.train("round")
def client_train(message, context):
    """Train the clients the server sent this node with client_host.ClientHost.train."""
    settings = message.content["settings"]
    host = node_host(settings, context)
    settle_pending(host, settings)
    step_limits = {int(client): int(limit)
                   for client, limit in json.loads(settings["step-limits"]).items()}
    uploads = host.train(settings["round"], list(settings["clients"]),
                         message.content["global"].to_numpy_ndarrays(),
                         flower_records.received_from_content(message.content), step_limits)
    flower_records.save_client_state(host, context.state)
    if context.node_config.get("corrupt-uploads"):
        uploads = [corrupted(upload) for upload in uploads]
    config, keys = json.loads(settings["config"]), None
    if config["SECURE_AGGREGATION"] != "none":
        uploads, keys = flower_secagg.hold(uploads, config, context)
    content = flower_records.content_from_uploads(uploads)
    if keys is not None:
        content[flower_secagg.KEYS] = keys
    return Message(content, reply_to=message)


client_app.query("secagg_share")(flower_secagg.client_share_keys)
client_app.query("secagg_mask")(flower_secagg.client_masked_input)
client_app.query("secagg_unmask")(flower_secagg.client_unmask)


def settle_pending(host, settings):
    """Keep the state of last time's clients only where the server accepted their uploads."""
    outcomes = json.loads(settings["accepted"])
    host.settle(host.pending_round, outcomes.get(str(host.pending_round), []))


def corrupted(upload):
    """What a broken or hostile node might send: a first layer of NaN under an unknown name.

    Only a node started with the node config 'corrupt-uploads=true' does this; it lets the
    tests show that the server rejects such uploads and goes on.
    """
    layers = [{"garbage": np.full(5, np.nan, np.float32)}] + list(upload.update[1:])
    return dataclasses.replace(upload, update=layers)
