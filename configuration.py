"""The constants as runs see them: CSV overrides, one-line checks, repeats, folders, data.

`python Main.py -c -f a.csv b.csv` makes one configuration per file (Main.py's constants with the
file's overrides), checks every value against RULES and the combinations `validate_config`
refuses, expands REPEATS into seeds, names each run's folder by a hash of its constants and
prepares its data, partition and checkpoint, all before anything is written.
"""

import dataclasses
import os
import pathlib

import numpy as np

import algorithms
import attacks
import checkpoints
from constant_rules import (BOOLEAN, device_model, folder, integer, number, one_of,
                            plugin_constants)
import Data_Preprocessing
import devices
import models
import personalization
import privacy
import robust_rules
import secure_aggregation
import Server_side
import upload_format
import Utils


def load_configs(arguments, constants, engine_defaults=None):
    """Return (label, validated config) for every run to make, in order.

    One configuration per CSV, labelled by the file's name (or the constants alone, labelled
    'default', without -c), each made REPEATS times with SEED, SEED + 1, ...

    Args:
        arguments: Main.py's command line (-c, -f).
        constants: Main.py's constants by name (what a CSV may override).
        engine_defaults: constants whose default an engine changes (what a CSV does not set).
    """
    defaults = {**constants, **(engine_defaults or {})}
    if arguments.config:
        sources = [(pathlib.Path(path).stem,
                    {**defaults, **Utils.read_overrides(path, constants)})
                   for path in arguments.file]
    else:
        sources = [("default", defaults)]
    labels = [label for label, _ in sources]
    for position, label in enumerate(labels):
        if label in labels[:position]:
            raise ValueError(f"two config files are named {label}: comparisons label runs by "
                             "file name, so rename one")
    runs = [(label, {**config, "SEED": config["SEED"] + repeat})
            for label, config in sources
            for repeat in range(validate_config(config)["REPEATS"])]
    folders = [run_dir(config) for _, config in runs]
    for position, folder in enumerate(folders):
        if folder in folders[:position]:
            raise ValueError(f"{runs[folders.index(folder)][0]} and {runs[position][0]} would "
                             f"both write {folder}; give them different OUTPUT_DIR values")
    return runs


def validate_config(config):
    """Raise ValueError naming the first constant whose value is not allowed."""
    for name, (is_allowed, allowed) in RULES.items():
        if not is_allowed(config[name]):
            raise ValueError(f"{name} must be {allowed}, got {config[name]!r}")
    # A robust rule and DP's noisy mean replace the server's mean of plain updates.
    averaging = algorithms.get(config["ALGORITHM"]).PLAIN_UPDATES
    if config["AGGREGATION"] != "fedavg" and not averaging:
        raise ValueError(f"AGGREGATION {config['AGGREGATION']} needs ALGORITHM one of "
                         f"{', '.join(PLAIN_ALGORITHMS)} (they average plain updates), got "
                         f"{config['ALGORITHM']}")
    if config["DP_CLIP_NORM"] > 0 and not (averaging and config["AGGREGATION"] == "fedavg"):
        raise ValueError(f"DP_CLIP_NORM > 0 (DP-FedAvg) needs ALGORITHM one of "
                         f"{', '.join(PLAIN_ALGORITHMS)} and AGGREGATION fedavg")
    for name, (allowed, why) in algorithms.get(config["ALGORITHM"]).NEEDS.items():
        if config[name] not in allowed:
            raise ValueError(f"ALGORITHM {config['ALGORITHM']} needs {name} one of "
                             f"{', '.join(map(str, allowed))}, got {config[name]}: {why}")
    if config["SEED"] + config["REPEATS"] > 2**32:
        raise ValueError(f"SEED + REPEATS - 1 must be below 2**32, got {config['SEED']} + "
                         f"{config['REPEATS']} - 1")
    validate_clock(config)
    validate_secure_aggregation(config)
    population = validate_personalization(config)
    per_round = Utils.num_selected_clients(population, config["CLIENT_FRACTION"])
    if config["AGGREGATION"] in robust_rules.KRUM_RULES and per_round < 2 * config["KRUM_F"] + 3:
        raise ValueError(f"KRUM_F must leave at least 2 * KRUM_F + 3 clients a round for Krum; "
                         f"with {per_round} clients a round KRUM_F can be at most "
                         f"{max(0, (per_round - 3) // 2)}, got {config['KRUM_F']}")
    return config


def validate_clock(config):
    """Refuse deadlines and over-selection without devices, or where they break an
    assumption (DP's accountant, Poisson sampling, partial work of two-phase methods)."""
    if config["DEVICE_HETEROGENEITY"] not in devices.MODELS:
        devices.read_profiles(config["DEVICE_HETEROGENEITY"])  # names the file and line
    timed = config["ROUND_DEADLINE"] > 0 or config["OVER_SELECTION"] > 1
    if timed and config["DEVICE_HETEROGENEITY"] == "none":
        raise ValueError("ROUND_DEADLINE and OVER_SELECTION need DEVICE_HETEROGENEITY "
                         "lognormal or a profiles file: they act on the clients' virtual times")
    if config["OVER_SELECTION"] > 1 and config["CLIENT_SAMPLING"] == "poisson":
        raise ValueError("OVER_SELECTION needs CLIENT_SAMPLING fixed: Poisson sampling has no "
                         "fixed m to over-select")
    if timed and config["DP_CLIP_NORM"] > 0:
        raise ValueError("DP_CLIP_NORM > 0 cannot combine with ROUND_DEADLINE or OVER_SELECTION: "
                         "they keep clients by device speed, not at random, which the privacy "
                         "accountant assumes")
    if (config["ROUND_DEADLINE"] > 0 and config["STRAGGLER_POLICY"] == "partial"
            and not personalization.get(config["PERSONALIZATION"]).PARTIAL_WORK):
        raise ValueError(f"STRAGGLER_POLICY partial cannot combine with PERSONALIZATION "
                         f"{config['PERSONALIZATION']}: partial work is defined for the one "
                         "local training whose update is uploaded")
    if config["ASYNC_BUFFER"]:
        validate_fedbuff(config)


# The algorithms whose server step is the mean of plain updates (robust rules, DP, FedBuff).
PLAIN_ALGORITHMS = tuple(name for name in algorithms.NAMES if algorithms.get(name).PLAIN_UPDATES)
# What FedBuff's steps can combine with: (constant, allowed values, why not the others).
FEDBUFF_NEEDS = (
    ("DEVICE_HETEROGENEITY", None, "its arrivals are ordered by the devices' virtual times"),
    ("ALGORITHM", PLAIN_ALGORITHMS, "its buffer averages plain updates"),
    ("AGGREGATION", ("fedavg",), "its buffer averages plain updates"),
    ("DP_CLIP_NORM", (0.0,), "the privacy accountant assumes rounds of sampled clients"),
    ("COMPRESSION", ("none", "int8"), "top-k keeps a residual per client and round"),
    ("PERSONALIZATION", tuple(name for name in personalization.NAMES
                              if personalization.get(name).OWN is None),
     "it keeps no client state"),
    ("CLIENT_DROPOUT", (0.0,), "a client's slot waits for its arrival"),
    ("ROUND_DEADLINE", (0.0,), "there are no rounds to have deadlines"),
    ("OVER_SELECTION", (1.0,), "there are no rounds to over-select"),
)


def validate_fedbuff(config):
    """Refuse what ASYNC_BUFFER (FedBuff) cannot combine with, naming the reason."""
    for name, allowed, why in FEDBUFF_NEEDS:
        if (config[name] == "none") if allowed is None else (config[name] not in allowed):
            wanted = "not none" if allowed is None else "one of " + ", ".join(map(str, allowed))
            raise ValueError(f"ASYNC_BUFFER > 0 (FedBuff) needs {name} {wanted}, got "
                             f"{config[name]}: {why}")
    training = config["NUM_CLIENTS"] - Utils.round_half_up(config["HELD_OUT_CLIENTS"]
                                                           * config["NUM_CLIENTS"])
    if config["MAX_CONCURRENCY"] > training:
        raise ValueError(f"MAX_CONCURRENCY must be at most the {training} clients that train, "
                         f"got {config['MAX_CONCURRENCY']}")


# What the secure sum can combine with: (constant, allowed values, why not the others).
SECURE_SUM_NEEDS = (
    ("ALGORITHM", tuple(name for name in algorithms.NAMES if algorithms.get(name).PLAIN_UPDATES
                        or algorithms.get(name).SUMMABLE),
     "the sum carries each client's update (FedNova's divided by its steps) only, not an "
     "algorithm's uploaded extras or per-client server terms"),
    ("AGGREGATION", ("fedavg",), "a robust rule needs every single update"),
    ("COMPRESSION", ("none",), "secure aggregation quantizes the update itself, and top-k's "
     "indices differ per client"),
    ("ASYNC_BUFFER", (0,), "FedBuff weighs each update by its staleness"),
)


def validate_secure_aggregation(config):
    """Refuse what SECURE_AGGREGATION cannot combine with, naming the reason."""
    if config["SECURE_AGGREGATION"] == "none":
        return
    for name, allowed, why in SECURE_SUM_NEEDS:
        if config[name] not in allowed:
            raise ValueError(f"SECURE_AGGREGATION {config['SECURE_AGGREGATION']} needs {name} "
                             f"one of {', '.join(map(str, allowed))}, got {config[name]}: {why}")
    if config["DP_CLIP_NORM"] > 0:
        shapes = [tuple(weight.shape)
                  for weight in Server_side.create_model(config["MODEL"]).weights]
        margin = secure_aggregation.rounding_margin(config, shapes)
        if margin >= config["DP_CLIP_NORM"]:
            raise ValueError(f"SECAGG_BITS {config['SECAGG_BITS']} is too few for DP_CLIP_NORM "
                             f"{config['DP_CLIP_NORM']}: rounding can move an update by up to "
                             f"{margin:.3g} in L2 norm (2R / (2^b - 1) x the square root of the "
                             "model's weights), which must stay below it; raise SECAGG_BITS or "
                             "lower SECAGG_RANGE")


# What a method that uploads nothing (local) leaves without a job: (constant, its only value).
NOTHING_UPLOADED = (("ALGORITHM", algorithms.DEFAULT), ("SERVER_OPTIMIZER", "sgd"),
                    ("COMPRESSION", "none"), ("DP_CLIP_NORM", 0.0), ("AGGREGATION", "fedavg"),
                    ("MALICIOUS_FRACTION", 0.0), ("SECURE_AGGREGATION", "none"))


def validate_personalization(config):
    """Refuse what per-client evaluation and personalization cannot combine with; return the
    number of clients that train (those not held out)."""
    method, num_clients = config["PERSONALIZATION"], config["NUM_CLIENTS"]
    for name, value in (("PERSONALIZATION", method != "none"),
                        ("HELD_OUT_CLIENTS", config["HELD_OUT_CLIENTS"] > 0)):
        if value and config["LOCAL_TEST_SHARE"] == 0:
            raise ValueError(f"{name} {config[name]} needs LOCAL_TEST_SHARE > 0: it is "
                             "measured on each client's local test data")
    held_out = Utils.round_half_up(config["HELD_OUT_CLIENTS"] * num_clients)
    if held_out >= num_clients:
        raise ValueError(f"HELD_OUT_CLIENTS must leave at least one of the {num_clients} "
                         f"clients to train, got {config['HELD_OUT_CLIENTS']} ({held_out} held "
                         "out)")
    plugin = personalization.get(method)
    if plugin.UPLOADS not in ("model", None) and algorithms.get(config["ALGORITHM"]).WHOLE_MODEL:
        whole = [name for name in algorithms.NAMES if not algorithms.get(name).WHOLE_MODEL]
        raise ValueError(f"PERSONALIZATION {method} needs ALGORITHM one of {', '.join(whole)}: "
                         f"{config['ALGORITHM']}'s state covers the whole model, {method} "
                         f"shares only the {plugin.UPLOADS}")
    for name, value in NOTHING_UPLOADED if plugin.UPLOADS is None else ():
        if config[name] != value:
            raise ValueError(f"PERSONALIZATION local uploads nothing, so {name} "
                             f"{config[name]} has nothing to act on: set it to {value}")
    validate_client_state(config)
    return num_clients - held_out


def validate_client_state(config):
    """Refuse a run whose clients' kept state (the algorithm's CLIENT_STATE, a personal part)
    could outgrow half of this machine's memory."""
    algorithm, method = (algorithms.get(config["ALGORITHM"]),
                         personalization.get(config["PERSONALIZATION"]))
    if method.OWN is None and not algorithm.CLIENT_STATE:
        return
    shapes = [tuple(variable.shape)
              for variable in Server_side.create_model(config["MODEL"]).weights]
    model_bytes = sum(4 * int(np.prod(shape)) for shape in shapes)
    per_client = {"PERSONALIZATION": personalization.state_bytes_per_client(
                      config["PERSONALIZATION"], shapes, models.head_layers(config["MODEL"])),
                  "ALGORITHM": model_bytes * len(algorithm.CLIENT_STATE)}
    needed = config["NUM_CLIENTS"] * sum(per_client.values())
    if needed > personal_state_budget():
        name = max(per_client, key=per_client.get)
        raise ValueError(f"{name} {config[name]} would keep up to {needed / 2**30:.1f} GiB of "
                         f"client state for {config['NUM_CLIENTS']} clients, more than half of "
                         f"this machine's memory ({personal_state_budget() / 2**30:.1f} GiB); "
                         "use fewer clients")


def personal_state_budget():
    """Bytes the clients' personal state may take: half of the machine's memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


# Each constant's rule: (test, what is allowed), checked in this order; the plug-ins' own
# constants (their CONSTANTS) follow.
RULES = {
    "NUM_CLIENTS": integer(1, 60000), "ROUNDS": integer(1),
    "CLIENT_FRACTION": number("(0, 1]"), "CLIENT_SAMPLING": one_of(Server_side.CLIENT_SAMPLINGS),
    "LOCAL_EPOCHS": integer(1), "BATCH_SIZE": integer(0, note=" (0 = all local data)"),
    "LEARNING_RATE": number("> 0"), "LOCAL_MOMENTUM": number("[0, 1)"),
    "ALGORITHM": one_of(algorithms.NAMES),
    "SERVER_OPTIMIZER": one_of(Server_side.SERVER_OPTIMIZERS), "SERVER_LR": number("> 0"),
    "SERVER_MOMENTUM": number("[0, 1)"), "SERVER_BETA1": number("[0, 1)"),
    "SERVER_BETA2": number("[0, 1)"), "SERVER_TAU": number("> 0"),
    "CENTRALIZED_BASELINE": BOOLEAN, "DISTRIBUTION": one_of(Data_Preprocessing.DISTRIBUTIONS),
    "MAX_SAMPLE_SHARE": number("(0, 1]"), "CLASSES_PER_CLIENT": integer(1, 10),
    "DIRICHLET_ALPHA": number("> 0"), "SHARDS_PER_CLIENT": integer(1),
    "SEED": integer(0, 2**32 - 1, "2**32 - 1"), "REPEATS": integer(1, 1000),
    "EVAL_EVERY": integer(1), "CLIENT_DROPOUT": number("[0, 1)"),
    "CHECKPOINT_EVERY": integer(1), "RESUME": BOOLEAN, "DATA_DIR": folder(optional=True),
    "OUTPUT_DIR": folder(optional=False), "TARGET_ACCURACY": number("(0, 1]"),
    "COMPRESSION": one_of(upload_format.COMPRESSIONS), "TOPK_FRACTION": number("(0, 1]"),
    "STOCHASTIC_ROUNDING": BOOLEAN, "DP_CLIP_NORM": number(">= 0"),
    "DP_NOISE_MULTIPLIER": number(">= 0"), "DP_DELTA": number("(0, 1)"),
    "DP_NOISE": one_of(privacy.DP_NOISE_SOURCES),
    "AGGREGATION": one_of(Server_side.AGGREGATIONS), "TRIM_RATIO": number("[0, 0.5)"),
    "KRUM_F": integer(0), "MALICIOUS_FRACTION": number("[0, 1)"),
    "ATTACK": one_of(attacks.ATTACKS), "ATTACK_SCALE": number("> 0"),
    "LOCAL_TEST_SHARE": number("[0, 1)"), "HELD_OUT_CLIENTS": number("[0, 1)"),
    "PERSONALIZATION": one_of(personalization.NAMES), "MODEL": one_of(models.NAMES),
    "DEVICE_HETEROGENEITY": device_model(), "DEVICE_SPEED": number("> 0"),
    "DEVICE_SPEED_SIGMA": number(">= 0"), "DEVICE_DOWN_MBPS": number("> 0"),
    "DEVICE_UP_MBPS": number("> 0"), "DEVICE_BANDWIDTH_SIGMA": number(">= 0"),
    "ROUND_DEADLINE": number(">= 0"), "STRAGGLER_POLICY": one_of(devices.STRAGGLER_POLICIES),
    "OVER_SELECTION": number(">= 1"), "ASYNC_BUFFER": integer(0),
    "MAX_CONCURRENCY": integer(1),
    "SECURE_AGGREGATION": one_of(secure_aggregation.MODES), **secure_aggregation.CONSTANTS,
    **plugin_constants(algorithms), **plugin_constants(personalization),
}


def run_dir(config):
    """Return the run's output folder: OUTPUT_DIR/<readable name>_<hash of every constant>.

    The hash covers every constant that can change results (checkpoints.identity), so two
    different configurations never share a folder, while a resumed run (more ROUNDS) finds its
    own, and a constant added later at its value of before leaves the folder as it was. A
    device profiles file counts by its content too: an edited file is another configuration.
    """
    hashed = config
    if config["DEVICE_HETEROGENEITY"] not in devices.MODELS:
        hashed = {**config, "DEVICE_HETEROGENEITY": (
            f"{config['DEVICE_HETEROGENEITY']} "
            f"sha256:{devices.profiles_digest(config['DEVICE_HETEROGENEITY'])}")}
    digest = Utils.config_hash(checkpoints.identity(hashed))
    return pathlib.Path(config["OUTPUT_DIR"]).expanduser() / f"{Utils.run_name(config)}_{digest}"


@dataclasses.dataclass
class PreparedRun:
    """A checked configuration with its data, its partition, its folder and its checkpoint."""

    config: dict
    data: Data_Preprocessing.FashionMNIST
    client_indices: list
    output_dir: pathlib.Path
    checkpoint: tuple = None


def prepare_run(config, loaded_data):
    """Load data, partition and find the checkpoint: every input check, nothing written yet.

    `loaded_data` caches data sets by DATA_DIR, so a comparison loads them once.
    """
    if config["DATA_DIR"] not in loaded_data:
        loaded_data[config["DATA_DIR"]] = Data_Preprocessing.load_fashion_mnist(config["DATA_DIR"])
    data = loaded_data[config["DATA_DIR"]]
    client_indices = partition_data(config, data.y_train)
    check_secure_sum_capacity(config, client_indices)
    output_dir = run_dir(config)
    return PreparedRun(config, data, client_indices, output_dir,
                       checkpoints.find_checkpoint(config, output_dir))


def check_secure_sum_capacity(config, client_indices):
    """Refuse a secure sum that could wrap around its modulus in some round (the clients'
    weights are their training samples, or 1 under DP)."""
    if config["SECURE_AGGREGATION"] == "none":
        return
    train = client_split(config, client_indices).train
    training = Server_side.training_clients(Server_side.ServerSettings.from_config(config))
    weights = [1 if config["DP_CLIP_NORM"] > 0 else len(train[client]) for client in training]
    per_round = (len(training) if config["CLIENT_SAMPLING"] == "poisson"
                 else len(Server_side.select_clients(len(training), config["CLIENT_FRACTION"],
                                                     np.random.default_rng(0), "fixed",
                                                     config["OVER_SELECTION"])))
    problem = secure_aggregation.capacity_problem(config, weights, per_round)
    if problem:
        raise ValueError(problem)


def prepare_output_dir(config, output_dir):
    """Create the run's output folder and save the config there."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        Utils.save_config(output_dir / "config.json", config)
    except OSError as error:
        raise ValueError(f"OUTPUT_DIR {config['OUTPUT_DIR']} is not writable ({error.strerror})") \
            from None


def client_split(config, client_indices):
    """Split each client's samples into local train and test parts (LOCAL_TEST_SHARE)."""
    return Data_Preprocessing.split_local_test(client_indices, config["LOCAL_TEST_SHARE"],
                                               Utils.rng(config["SEED"], "local_test"))


def partition_data(config, train_labels):
    """Split the training set over the clients as DISTRIBUTION says, from SEED alone."""
    return Data_Preprocessing.partition(
        train_labels, config["NUM_CLIENTS"], config["DISTRIBUTION"],
        Utils.rng(config["SEED"], "partition"),
        max_sample_share=config["MAX_SAMPLE_SHARE"],
        classes_per_client=config["CLASSES_PER_CLIENT"],
        dirichlet_alpha=config["DIRICHLET_ALPHA"],
        shards_per_client=config["SHARDS_PER_CLIENT"])
