"""Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022) on the virtual clock.

With ASYNC_BUFFER = K > 0 there are no synchronous rounds. MAX_CONCURRENCY clients train at
once, each from the global model current when it starts; it finishes after its virtual time
(devices.py: download, local training, upload). Arrivals are taken in order of (finish time,
client id); each enters a buffer, and its slot goes at once to a new client, drawn from SEED and
the start's count among the training clients not already running, which starts from the
then-current model. Every K arrivals the server applies the buffer,

    Delta = (1/K) sum_i Delta_i / sqrt(1 + s_i),   s_i = server steps since client i started,

with its server optimizer (FedBuff's staleness weighting), and the freed slots start from the
new model. A "round" in history.csv is one server step.

The simulation is deterministic: a client's update depends only on the model it started from
and its draws, keyed by (SEED, its start's count, client), so it is trained when it starts and
waits in the event queue, checked by the server as any upload, until it arrives. The queue
(in-flight clients with their updates, the clock, the server's version) is checkpointed.
"""

import heapq
import typing

import numpy as np

import devices
import divergence
import screening
import Server_side
import upload_format
import Utils


# A step gives up (the run diverged) after this many refused arrivals per buffered update.
MAX_REFUSED = 10


class InFlight(typing.NamedTuple):
    """A client on its way: ordered by (finish, client) in the event queue.

    start_version: the server steps done when it started; count: its start's number (its
    draws' key); delta: its decoded update, or None when the server refused the upload.
    """

    finish: float
    client: int
    start_version: int
    count: int
    delta: list
    samples: int
    steps: int
    train_loss: float


class EventQueue:
    """The in-flight clients of FedBuff and the server's clock; a checkpointed component."""

    def __init__(self, shapes):
        self.shapes = [tuple(shape) for shape in shapes]
        self.entries, self.clock, self.version, self.starts = [], 0.0, 0, 0

    def get_state(self):
        meta = np.array([[entry.finish, entry.client, entry.start_version, entry.count,
                          entry.delta is not None, entry.samples, entry.steps, entry.train_loss]
                         for entry in self.entries], np.float64).reshape(-1, 8)
        deltas = [np.stack([entry.delta[layer] if entry.delta is not None else np.zeros(shape)
                            for entry in self.entries]) if self.entries
                  else np.zeros((0, *shape)) for layer, shape in enumerate(self.shapes)]
        return [np.array([self.clock, self.version, self.starts], np.float64), meta] + deltas

    def set_state(self, arrays):
        (clock, version, starts), meta, deltas = arrays[0], arrays[1], arrays[2:]
        self.clock, self.version, self.starts = float(clock), int(version), int(starts)
        self.entries = [InFlight(row[0], int(row[1]), int(row[2]), int(row[3]),
                                 [layer[position] for layer in deltas] if row[4] else None,
                                 int(row[5]), int(row[6]), float(row[7]))
                        for position, row in enumerate(meta)]
        heapq.heapify(self.entries)


def server_step(config, federation, global_weights, engine):
    """One FedBuff server step: fill the free slots, take arrivals until K are buffered, apply.

    Returns:
        (new weights, Server_side.RoundReport of the step, clients started, clock columns).
    """
    queue, server = federation.async_queue, federation.server
    started, refused, buffer = 0, [], []
    while len(queue.entries) < config["MAX_CONCURRENCY"]:
        refused += start_client(config, federation, global_weights, engine)
        started += 1
    before, refused_arrivals = queue.clock, 0
    while len(buffer) < config["ASYNC_BUFFER"]:
        entry = heapq.heappop(queue.entries)
        queue.clock = entry.finish
        if entry.delta is None:
            refused_arrivals += 1
            if refused_arrivals >= MAX_REFUSED * config["ASYNC_BUFFER"]:
                raise divergence.ClientsDiverged(
                    f"{refused_arrivals} refused uploads arrived before {len(buffer)} "
                    f"acceptable ones of the {config['ASYNC_BUFFER']} a step needs")
        else:
            buffer.append(entry)
        if len(buffer) < config["ASYNC_BUFFER"]:
            refused += start_client(config, federation, global_weights, engine)
            started += 1
    staleness = [queue.version - entry.start_version for entry in buffer]
    delta = [sum(entry.delta[layer] / np.sqrt(1 + stale)
                 for entry, stale in zip(buffer, staleness)) / len(buffer)
             for layer in range(len(server.upload_shapes))]
    new_weights = server.optimizer.step(global_weights, server.whole(delta))
    queue.version += 1
    bytes_down, bytes_up = server.client_traffic()
    # What the history row needs of the buffered uploads (their arrays are decoded already).
    accepted = [upload_format.Upload(entry.client, entry.count, [], entry.samples, entry.steps,
                                     entry.train_loss) for entry in buffer]
    report = Server_side.RoundReport(accepted, refused, False, None,
                                     started * bytes_down, len(buffer) * bytes_up)
    return new_weights, report, started, {
        "virtual_seconds": round(queue.clock - before, 3),
        "staleness_mean": round(float(np.mean(staleness)), 3),
        "staleness_max": int(max(staleness))}


def start_client(config, federation, global_weights, engine):
    """Start the next client from the current model: train it now (its update depends only on
    that model and its draws), screen it, and queue its arrival; return the rejections."""
    queue, server = federation.async_queue, federation.server
    running = {entry.client for entry in queue.entries}
    free = [client for client in Server_side.training_clients(server.settings)
            if client not in running]
    count = queue.starts
    client = int(Utils.rng(config["SEED"], "async", count).choice(free))
    queue.starts += 1
    delivered = engine.train(count, [client], global_weights)
    accepted, rejections = screening.screen_uploads(
        server.settings, count, delivered, [client], server.client_sizes, server.upload_shapes)
    engine.settle(count, [upload.client for upload in accepted])
    bytes_down, bytes_up = server.client_traffic()
    seconds = devices.client_seconds(federation.devices, client, bytes_down,
                                     devices.trained_samples(config, server.client_sizes[client]),
                                     bytes_up)
    upload = accepted[0] if accepted else None
    heapq.heappush(queue.entries, InFlight(
        queue.clock + seconds, client, queue.version, count,
        upload_format.decode_update(upload.update, server.upload_shapes) if upload else None,
        upload.num_examples if upload else 0, upload.num_steps if upload else 0,
        upload.train_loss if upload else 0.0))
    return rejections
