"""Devices on a virtual clock: each client's compute speed and bandwidth, and a round's time.

Real federations are made of devices that differ by an order of magnitude in compute and
bandwidth (FedScale, Lai et al. 2022; Bonawitz et al. 2019). With DEVICE_HETEROGENEITY each
client gets a device profile, from SEED, and every round is timed on a virtual clock, the same
whichever engine or machine trains it:

    client seconds = 8 bytes down / (down Mbit/s 1e6) + samples trained / (samples/s)
                     + 8 bytes up / (up Mbit/s 1e6)

where bytes are what the client actually receives and sends (compression counts) and samples
trained are its local epochs over its data (with FedRep's head epochs and Ditto's personal
epochs). The round takes as long as its slowest returning client: the server waits for every
selected client (a client that drops out is known not to return).

"lognormal": speed and bandwidths are log-normal around the DEVICE_* medians with log-space
spread DEVICE_*_SIGMA (sigma 1: the middle 90 % of devices span a factor of 27). The defaults
are stated assumptions, not measurements: 100 samples/s for training this 35k-weight CNN on a
phone-class CPU, 20 Mbit/s down and 5 Mbit/s up (mobile links are asymmetric).
A CSV path: rows `samples_per_second,down_mbps,up_mbps` (a header line with those names), each
client drawing one row at random from SEED.
"""

import csv
import pathlib
import typing

import numpy as np

import Utils

MODELS = ("none", "lognormal")
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


def trained_samples(config, num_examples):
    """Samples a client's round passes through its model: its epochs over its n samples, with
    FedRep's head epochs and Ditto's personal epochs."""
    epochs = config["LOCAL_EPOCHS"]
    if config["PERSONALIZATION"] == "fedrep":
        epochs += config["HEAD_EPOCHS"]
    elif config["PERSONALIZATION"] == "ditto":
        epochs += config["PERSONAL_EPOCHS"]
    return num_examples * epochs


def client_seconds(profiles, client, bytes_down, samples, bytes_up):
    """A client's virtual seconds for a round: download, local training, upload."""
    return (8 * bytes_down / (profiles.down[client] * 1e6) + samples / profiles.speed[client]
            + 8 * bytes_up / (profiles.up[client] * 1e6))


def round_seconds(profiles, config, uploads, bytes_down_each, bytes_up_of):
    """The round's virtual seconds: its slowest returning client (0 when none returned).

    Args:
        uploads: the round's accepted uploads.
        bytes_down_each: what each selected client receives.
        bytes_up_of: function upload -> the bytes it carried.
    """
    return max((client_seconds(profiles, upload.client, bytes_down_each,
                               trained_samples(config, upload.num_examples), bytes_up_of(upload))
                for upload in uploads), default=0.0)
