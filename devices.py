"""Devices on a virtual clock: each client's compute speed and bandwidth, and a round's time.

Real federations are made of devices that differ by an order of magnitude in compute and
bandwidth (FedScale, Lai et al. 2022; Bonawitz et al. 2019). With DEVICE_HETEROGENEITY each
client gets a device profile, from SEED, and every round is timed on a virtual clock, the same
whichever engine or machine trains it:

    client seconds = 8 bytes down / (down Mbit/s 1e6) + samples trained / (samples/s)
                     + 8 bytes up / (up Mbit/s 1e6)

where bytes are what the client receives and sends (the encoding's size: compression counts)
and samples trained are its local steps' samples (with FedRep's head epochs and Ditto's personal
epochs). All of it is known before the round trains, so the server plans it (`plan_round`):
which clients count (ROUND_DEADLINE, STRAGGLER_POLICY, OVER_SELECTION), how many steps a
straggler takes, and how long the round lasts: until its slowest counted client (a client that
drops out is known not to return), or the deadline when it dropped someone and fewer than the
m clients it wants arrived in time.

"lognormal": speed and bandwidths are log-normal around the DEVICE_* medians with log-space
spread DEVICE_*_SIGMA (sigma 1: the middle 90 % of devices span a factor of 27). The defaults
are stated assumptions, not measurements: 100 samples/s for training this 35k-weight CNN on a
phone-class CPU, 20 Mbit/s down and 5 Mbit/s up (mobile links are asymmetric).
A CSV path: rows `samples_per_second,down_mbps,up_mbps` (a header line with those names), each
client drawing one row at random from SEED.
"""

import csv
import hashlib
import pathlib
import typing

import numpy as np

import personalization
import upload_format
import Utils

MODELS = ("none", "lognormal")
STRAGGLER_POLICIES = ("drop", "partial")
PROFILE_COLUMNS = ("samples_per_second", "down_mbps", "up_mbps")


class DeviceProfiles(typing.NamedTuple):
    """Every client's device: float arrays (K,) of samples per second, down and up Mbit/s."""

    speed: np.ndarray
    down: np.ndarray
    up: np.ndarray


def device_profiles(config):
    """The clients' devices as DEVICE_HETEROGENEITY says, from SEED; None for "none"."""
    model, num_clients = config["DEVICE_HETEROGENEITY"], config["NUM_CLIENTS"]
    if model == "none":
        return None
    rng = Utils.rng(config["SEED"], "devices")
    if model == "lognormal":
        def draw(median, sigma):
            return median * np.exp(sigma * rng.standard_normal(num_clients))
        return DeviceProfiles(draw(config["DEVICE_SPEED"], config["DEVICE_SPEED_SIGMA"]),
                              draw(config["DEVICE_DOWN_MBPS"], config["DEVICE_BANDWIDTH_SIGMA"]),
                              draw(config["DEVICE_UP_MBPS"], config["DEVICE_BANDWIDTH_SIGMA"]))
    rows = read_profiles(model)
    chosen = rng.integers(len(rows), size=num_clients)
    return DeviceProfiles(*(rows[chosen, column] for column in range(3)))


def read_profiles(path):
    """Read a device-profile CSV into a float array (rows, 3).

    Raises ValueError naming the file (and line) when it is missing, malformed or holds a
    speed or bandwidth that is not a finite number > 0.
    """
    path = pathlib.Path(path).expanduser()
    try:
        with open(path, newline="") as file:
            lines = list(csv.reader(file))
    except OSError as error:
        raise ValueError(f"DEVICE_HETEROGENEITY: device profiles {path} cannot be read "
                         f"({error.strerror}); give none, lognormal or a CSV path") from None
    header = [name.strip() for name in lines[0]] if lines else []
    if header != list(PROFILE_COLUMNS):
        raise ValueError(f"device profiles {path}, line 1: the header must be "
                         f"{','.join(PROFILE_COLUMNS)}, got {','.join(header) or 'nothing'}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not any(cell.strip() for cell in line):
            continue
        try:
            values = [float(cell) for cell in line]
        except ValueError:
            values = []
        if len(values) != 3 or not all(np.isfinite(value) and value > 0 for value in values):
            raise ValueError(f"device profiles {path}, line {number}: expected three numbers "
                             f"> 0 ({','.join(PROFILE_COLUMNS)}), got {','.join(line)!r}")
        rows.append(values)
    if not rows:
        raise ValueError(f"device profiles {path} holds no device")
    return np.array(rows, np.float64)


def profiles_digest(path):
    """SHA-256 of a device profiles file's bytes (hex): its content names the run, not its
    path alone."""
    return hashlib.sha256(pathlib.Path(path).expanduser().read_bytes()).hexdigest()


def trained_samples(config, num_examples):
    """Samples a client's round passes through its model: its epochs over its n samples, with
    FedRep's head epochs and Ditto's personal epochs."""
    return num_examples * (config["LOCAL_EPOCHS"] + personalization.extra_epochs(config))


def samples_trained(config, uploads):
    """The samples the uploads' local steps took in all: a straggler's partial work counts its
    steps only, and FedRep's head and Ditto's personal epochs count too (what `samples`,
    the clients' n that FedAvg weights by, does not say)."""
    return (upload_format.samples_in_uploads(uploads, config["BATCH_SIZE"])
            + personalization.extra_epochs(config) * sum(upload.num_examples
                                                         for upload in uploads))


def client_seconds(profiles, client, bytes_down, samples, bytes_up):
    """A client's virtual seconds for a round: download, local training, upload."""
    return (8 * bytes_down / (profiles.down[client] * 1e6) + samples / profiles.speed[client]
            + 8 * bytes_up / (profiles.up[client] * 1e6))


class RoundPlan(typing.NamedTuple):
    """Who the server waits for in a round, and how long the round takes.

    clients: those that train and upload (sorted); step_limits: {client: its partial step
    count} (STRAGGLER_POLICY partial); dropped: left out by the deadline (drop); partial:
    how many train partially; cut: returned after the first m (OVER_SELECTION); seconds: the
    round's virtual seconds.
    """

    clients: np.ndarray
    step_limits: dict
    dropped: int
    partial: int
    cut: int
    seconds: float


def plan_round(profiles, config, returning, sizes, bytes_down, bytes_up, wanted):
    """Decide, before training, which returning clients count and how much each trains.

    Every time is known in advance: the server knows each client's device, its sample count
    and what the configured encoding sends. With a deadline (ROUND_DEADLINE > 0) a client that
    cannot finish by it sends nothing ("drop") or the local steps that fit ("partial"; a client
    that cannot finish one step in time is dropped), so a round never outlasts the deadline;
    with over-selection the first `wanted` clients to finish count (ties by client id), the
    rest are cut, and the round closes at the m-th arrival.

    Args:
        returning: the selected clients that do not drop out; sizes: every client's n.
        bytes_down, bytes_up: what each client receives and sends.
        wanted: m, the clients a round aggregates (OVER_SELECTION selects more).
    """
    deadline, policy = config["ROUND_DEADLINE"], config["STRAGGLER_POLICY"]
    finish, limits, dropped = {}, {}, 0
    for client in (int(client) for client in returning):
        transfer = (8 * bytes_down / (profiles.down[client] * 1e6)
                    + 8 * bytes_up / (profiles.up[client] * 1e6))
        samples = trained_samples(config, sizes[client])
        finish[client] = transfer + samples / profiles.speed[client]
        if deadline == 0 or finish[client] <= deadline:
            continue
        budget = max(0.0, (deadline - transfer) * profiles.speed[client])
        steps, used = steps_within(sizes[client], config["BATCH_SIZE"], config["LOCAL_EPOCHS"],
                                   budget)
        if policy == "drop" or steps == 0:  # not even one step fits: nothing arrives in time
            del finish[client]
            dropped += 1
            continue
        limits[client] = steps
        finish[client] = transfer + used / profiles.speed[client]
    order = sorted(finish, key=lambda client: (finish[client], client))
    kept = sorted(order[:wanted])
    seconds = max((finish[client] for client in kept), default=0.0)
    if dropped and len(kept) < wanted:
        # Fewer than m arrived: the server waited until the deadline for the dropped ones.
        # With enough in time (over-selection), the round closes at the m-th arrival.
        seconds = max(seconds, deadline)
    return RoundPlan(np.array(kept, np.int64), {client: limits[client] for client in kept
                                                 if client in limits},
                     dropped, sum(client in limits for client in kept), len(order) - len(kept),
                     seconds)


def steps_within(num_examples, batch_size, local_epochs, budget):
    """The SGD steps (in epoch order) whose samples fit in `budget`, and the samples they
    take; (0, 0) when not even the first step fits."""
    batch_size = batch_size or num_examples
    per_epoch = -(-num_examples // batch_size)
    last = num_examples - (per_epoch - 1) * batch_size
    steps = used = 0
    for _ in range(local_epochs):
        for step in range(per_epoch):
            size = batch_size if step < per_epoch - 1 else last
            if used + size > budget:
                return steps, used
            steps, used = steps + 1, used + size
    return steps, used
