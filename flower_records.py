"""What flower_app's ServerApp and ClientApps send each other, as Flower records.

The server's round message, a node's uploads and scores, a node's answer about its partition,
and the client state a node keeps in its Flower context between rounds. Each reader accepts
anything a node might send: what it cannot read becomes a Rejection or is left out.
"""

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

import screening
import upload_format


def round_content(config, num_nodes, round_num, clients, global_weights, received,
                  outcomes, step_limits=None):
    """The server's message to a node: the run's config, the round, its clients there, the
    global weights (and what the algorithm sends with them, e.g. SCAFFOLD's c, as records
    'sent.<name>'), the outcomes of its earlier rounds, step limits."""
    settings = {"config": json.dumps(config, default=str), "round": int(round_num),
                "clients": clients, "num-nodes": num_nodes,
                "accepted": json.dumps(outcomes),
                "step-limits": json.dumps(step_limits or {})}
    content = RecordDict({"settings": ConfigRecord(settings),
                          "global": ArrayRecord(list(global_weights))})
    for name, arrays in (received or {}).items():
        content[f"sent.{name}"] = ArrayRecord(list(arrays))
    return content


def received_from_content(content):
    """What the algorithm sent with the weights, {name: arrays}, from round_content's records."""
    return {name.split(".", 1)[1]: record.to_numpy_ndarrays()
            for name, record in content.array_records.items() if name.startswith("sent.")}


def uploads_from_content(content, round_num=None, node=None):
    """Read what a node's reply carries (records 'upload.<c>' and 'metrics.<c>').

    A node can send anything: an upload that cannot be read becomes a Rejection saying why.
    `node` is the node id Flower names as the reply's source; each upload carries it.
    """
    items = []
    for name, record in content.array_records.items():
        if not name.startswith("upload."):
            continue
        client = name.split(".", 1)[1]
        try:
            upload = upload_format.Upload.from_arrays(
                {key: array.numpy() for key, array in record.items()},
                content.metric_records[f"metrics.{client}"])
        except Exception as error:  # noqa: BLE001 (any malformed content is a rejection)
            items.append(screening.Rejection(round_num, client, node,
                                             f"unreadable upload ({type(error).__name__})"))
            continue
        upload.node = node
        items.append(upload)
    return items


def partition_of(content):
    """The partition id a node states in its answer, or None when it states none."""
    try:
        return int(content.config_records["node"]["partition-id"])
    except (KeyError, TypeError, ValueError):
        return None


SCORE_FIELDS = ("client", "samples", "global_correct", "personal_correct")


def content_from_scores(scores):
    """A node's evaluation reply: one integer list per ClientScore field."""
    return RecordDict({"scores": MetricRecord(
        {field: [int(getattr(score, field)) for score in scores] for field in SCORE_FIELDS})})


def scores_from_content(content):
    """Read a node's evaluation reply into ClientScores; an unreadable reply gives none (its
    clients then count as not evaluated)."""
    # Here, not at the top: it imports TensorFlow, which flower_app's secure-aggregation
    # stages need not wait for.
    import client_evaluation  # noqa: PLC0415

    try:
        record = content.metric_records["scores"]
        columns = [list(record[field]) for field in SCORE_FIELDS]
        if len({len(column) for column in columns}) != 1:
            return []
        return [client_evaluation.ClientScore(*values) for values in zip(*columns)]
    except (KeyError, TypeError):
        return []


def content_from_uploads(uploads):
    """The reply of a node: one ArrayRecord and MetricRecord per client."""
    content = RecordDict()
    for upload in uploads:
        arrays, metrics = upload.to_arrays()
        content[f"upload.{upload.client}"] = ArrayRecord(
            {name: Array(array) for name, array in arrays.items()})
        content[f"metrics.{upload.client}"] = MetricRecord(metrics)
    return content


def save_client_state(host, state):
    """Put the host's kept and pending client state into the node's Flower context state."""
    for name in host.memory:
        state[f"memory.{name}"] = ArrayRecord(host.memory[name].get_state())
        state[f"pending.{name}"] = ArrayRecord(host.pending[name].get_state())
    state["pending"] = ConfigRecord({"round": host.pending_round or 0})


def restore_client_state(host, state):
    """Load what save_client_state put into the context state (nothing on the first round)."""
    for name in host.memory:
        if f"memory.{name}" in state:
            host.memory[name].set_state(state[f"memory.{name}"].to_numpy_ndarrays())
            host.pending[name].set_state(state[f"pending.{name}"].to_numpy_ndarrays())
    if "pending" in state:
        host.pending_round = int(state["pending"]["round"]) or None
