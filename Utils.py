"""Small helpers: seeding, CSV overrides, the per-round history and TensorBoard, a run's plots."""

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import numbers
import pathlib
import secrets
import signal

import matplotlib

# Plots are only ever written to files, so the display-free backend is always right and
# nothing can block on a window.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import numpy as np  # noqa: E402

TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")
# One independent random stream per job. New jobs go at the end: a stream is keyed by its
# position, so adding a name never changes the streams before it.
STREAMS = ("partition", "selection", "training", "dropout", "baseline", "attack", "privacy",
           "compression", "local_test", "held_out", "adaptation", "personal", "devices", "async",
           "secagg")


def seed_everything(seed):
    """Seed Python, NumPy and TensorFlow/Keras so model initialisation and dropout repeat."""
    import keras  # Imported here: reading a CSV must not wait for TensorFlow.

    keras.utils.set_random_seed(seed)


def make_deterministic():
    """Make TensorFlow pick deterministic kernels, so a run repeats bit for bit.

    On this project's CPU kernels runs already repeated without it; it guards other machines
    (GPUs, other thread counts). The benchmark measured its cost as within noise on 2 CPU cores.
    """
    import tensorflow as tf  # Imported here: reading a CSV must not wait for TensorFlow.

    tf.config.experimental.enable_op_determinism()


def is_integer(value):
    """True for an integer of any kind (Python or NumPy), but not for a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def round_half_up(value):
    """Round a non-negative share of a count half up, as in school (Python's round goes half to
    even: round(2.5) is 2); the 1e-9 absorbs binary rounding (0.35 * 10 is 3.4999999999999996)."""
    return math.floor(value + 0.5 + 1e-9)


def num_selected_clients(num_clients, client_fraction):
    """Return m = max(1, C * K rounded half up), the clients trained each round (fixed sampling).

    Half up (see round_half_up), not Python's half to even, which gave 2 for K = 5,
    C = 0.5.
    """
    return max(1, round_half_up(client_fraction * num_clients))


def rng(seed, stream, *keys):
    """Return the generator of one job, keyed by (SEED, stream, round, client, ...).

    Every draw in a run comes from such a generator, made where it is needed: the same
    (SEED, round, client) gives the same shuffles, dropout seeds, attack and compression draws
    in whichever process, machine or order a client is trained, and a run resumed from a
    checkpoint needs no generator state. Separate streams keep each job reproducible on its
    own: changing LOCAL_EPOCHS changes the shuffles but not which clients are selected.
    """
    return np.random.default_rng([seed, STREAMS.index(stream), *keys])


class Settings:
    """Base of the settings dataclasses: the constants a module reads, by name.

    The constants' dict stays at the edges (CSV, hash, JSON, messages); inside, code reads named
    fields that a reader can follow back to the constants block.
    """

    @classmethod
    def from_config(cls, config):
        """Build the settings from the constants: field `learning_rate` is LEARNING_RATE; a
        field `options` holds the plug-ins' constants by name (see `option_names`)."""
        values = {field.name: config[field.name.upper()] for field in dataclasses.fields(cls)
                  if field.name != "options"}
        if "options" in {field.name for field in dataclasses.fields(cls)}:
            values["options"] = {name: config[name] for name in cls.option_names()}
        return cls(**values)

    @classmethod
    def option_names(cls):
        """The constants `options` carries: the plug-ins' (their CONSTANTS) and secure
        aggregation's."""
        import constant_rules  # here: it imports this module

        return constant_rules.settings_option_names()


def secret_rng():
    """Return a generator seeded from 256 bits of the operating system's entropy.

    For draws an observer must not be able to regenerate from the published config (DP noise);
    runs that use it are not reproducible bit for bit.
    """
    return np.random.default_rng(secrets.randbits(256))


def convert_value(name, text, default):
    """Convert the CSV text `text` to the type of `default`, the constant it replaces."""
    text = text.strip()
    if isinstance(default, bool):
        if text.lower() in TRUE_WORDS + FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        raise ValueError(f"{name} must be True or False, got {text!r}")
    converters = {int: ("an integer", int), float: ("a number", float)}
    if type(default) in converters:
        kind, convert = converters[type(default)]
        try:
            return convert(text)
        except ValueError:
            raise ValueError(f"{name} must be {kind}, got {text!r}") from None
    if default is None or isinstance(default, str):
        return None if text in ("", "None") and default is None else text
    if isinstance(default, pathlib.Path):
        return pathlib.Path(text)
    raise ValueError(f"{name} cannot be set from a CSV file")


def read_overrides(path, defaults):
    """Read a `param,val` CSV of constant overrides.

    Args:
        path: the CSV file; its header must be `param,val`.
        defaults: the constants by name; each value is typed like the one it replaces.
    Returns:
        dict of the overridden constants only.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    if not rows or [cell.strip() for cell in rows[0]] != ["param", "val"]:
        raise ValueError(f"config file {path} must start with the header line 'param,val'")
    overrides = {}
    for line_num, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise ValueError(f"config file {path}, line {line_num}: expected 'name,value', "
                             f"got {','.join(row)!r}")
        name = row[0].strip()
        if name not in defaults:
            raise ValueError(f"config file {path}, line {line_num}: unknown parameter {name!r}; "
                             f"known: {', '.join(sorted(defaults))}")
        overrides[name] = convert_value(name, row[1], defaults[name])
    return overrides


def run_name(config):
    """Name a run by its configuration and seed, e.g. fedavg_noniid_ib_K100_C0.3_E1_B32_s0.

    Options away from their plain setting are appended: the server optimizer (_fedadam), the
    compression (_int8), DP's noise multiplier (_dp1.0), a robust rule (_median), an attack
    with its share of clients (_sign_flip0.2), the personalization (_ditto) and the devices
    (_lognormal, or _devices for a profiles file).
    """
    name = (f"{config['ALGORITHM']}_{config['DISTRIBUTION']}_K{config['NUM_CLIENTS']}"
            f"_C{config['CLIENT_FRACTION']}_E{config['LOCAL_EPOCHS']}_B{config['BATCH_SIZE']}"
            f"_s{config.get('SEED', 0)}")
    suffixes = [
        config.get("SERVER_OPTIMIZER", "sgd") != "sgd" and config.get("SERVER_OPTIMIZER"),
        config.get("COMPRESSION", "none") != "none" and config.get("COMPRESSION"),
        config.get("DP_CLIP_NORM", 0) > 0 and f"dp{config['DP_NOISE_MULTIPLIER']}",
        config.get("AGGREGATION", "fedavg") != "fedavg" and config.get("AGGREGATION"),
        config.get("MALICIOUS_FRACTION", 0) > 0
        and f"{config['ATTACK']}{config['MALICIOUS_FRACTION']}",
        config.get("PERSONALIZATION", "none") != "none" and config.get("PERSONALIZATION"),
        config.get("DEVICE_HETEROGENEITY", "none") != "none"
        and ("lognormal" if config["DEVICE_HETEROGENEITY"] == "lognormal" else "devices"),
    ]
    return "_".join([name] + [suffix for suffix in suffixes if suffix])


def config_hash(config, ignored=()):
    """Return 8 hex digits of a SHA-256 over every constant except `ignored`, by name and value.

    Paths and other non-JSON values count by their text, so the hash repeats across processes.
    """
    kept = {name: value for name, value in config.items() if name not in ignored}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def history_length(path):
    """Return the number of rounds in a history.csv, 0 when it is missing or holds no rows."""
    if not pathlib.Path(path).is_file():
        return 0
    with open(path, newline="") as file:
        return sum(1 for _ in csv.DictReader(file))


def save_config(path, config):
    """Write every constant of the run as JSON (paths as strings)."""
    serializable = {name: str(value) if isinstance(value, pathlib.Path) else value
                    for name, value in config.items()}
    pathlib.Path(path).write_text(json.dumps(serializable, indent=2, sort_keys=True) + "\n")


class HistoryWriter:
    """Append one CSV row per round, flushed at once so a crash loses no finished round.

    `rows` (from a checkpoint) are written first, so a resumed run's file is whole again.
    """

    def __init__(self, path, columns, rows=()):
        self.columns = list(columns)
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        self._writer.writeheader()
        self._writer.writerows(rows)
        self._file.flush()

    def append(self, row):
        self._writer.writerow(row)
        self._file.flush()

    def close(self):
        self._file.close()


class TensorBoardLog:
    """Write each round's scalars as TensorBoard event files, so `tensorboard --logdir results`
    shows every run side by side.

    `rows` (from a checkpoint) are written first; a resumed run's old event files are removed,
    so no round appears twice.
    """

    SCALARS = ("test_accuracy", "test_loss", "train_loss", "mb_up_total", "mb_down_total",
               "epsilon", "baseline_accuracy", "baseline_loss", "virtual_hours_total") + tuple(
        # client_evaluation's figures (history_columns).
        f"{group}{model}_{figure}" for group in ("", "unseen_") for model in ("local", "personal")
        for figure in ("pooled", "mean", "std", "worst10", "best10"))

    def __init__(self, folder, rows=()):
        import tensorflow as tf  # Imported here: reading a CSV must not wait for TensorFlow.

        self._summary = tf.summary
        folder = pathlib.Path(folder)
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()
        self._writer = tf.summary.create_file_writer(str(folder))
        for row in rows:
            self.append(row)

    def append(self, row):
        """Write the round's scalars that have a value."""
        with self._writer.as_default():
            for name in self.SCALARS:
                if row.get(name) not in (None, ""):
                    self._summary.scalar(name, float(row[name]), step=int(row["round"]))
        self._writer.flush()

    def close(self):
        self._writer.close()


@contextlib.contextmanager
def deferred_interrupts():
    """Hold back Ctrl-C while files are being written; raise it once they are complete."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def format_progress(row, num_rounds):
    """One progress line, e.g. 'round  7/100  acc 0.8123  loss 0.5201  clients 30  ...'."""
    width = len(str(num_rounds))
    tested = (f"acc {row['test_accuracy']:.4f}  loss {row['test_loss']:.4f}"
              if row["test_accuracy"] != "" else "acc -       loss -     ")
    return (f"round {row['round']:>{width}}/{num_rounds}  {tested}  clients {row['clients']}  "
            f"samples {row['samples']:,}  {row['seconds']:.1f} s")


def print_setup(config, source, client_indices, output_dir, training):
    """Print the quantities derived from the constants, before training starts.

    training: how many clients can be selected (all but the held-out ones).
    """
    sizes = [len(indices) for indices in client_indices]
    per_round = (f"{config['CLIENT_FRACTION'] * training:g} expected (poisson)"
                 if config["CLIENT_SAMPLING"] == "poisson" else
                 num_selected_clients(training, config["CLIENT_FRACTION"]))
    print(f"data: {source}  clients: {len(sizes)}  samples per client: min {min(sizes)}, "
          f"max {max(sizes)}, total {sum(sizes):,}  clients per round: {per_round}")
    print(f"algorithm: {config['ALGORITHM']}  server optimizer: {config['SERVER_OPTIMIZER']} "
          f"(lr {config['SERVER_LR']})  output: {output_dir}")
    if config["LOCAL_TEST_SHARE"] > 0:
        print(f"per-client evaluation: {config['LOCAL_TEST_SHARE']:g} of each client's samples "
              f"test it; clients held out: {len(sizes) - training}  personalization: "
              f"{config['PERSONALIZATION']}")
        if config["DP_CLIP_NORM"] > 0:
            print(EPSILON_DOES_NOT_COVER)


# With DP and per-client evaluation: what the (epsilon, delta) guarantee leaves out.
EPSILON_DOES_NOT_COVER = (
    "note: epsilon covers the global model only; local_*, personal_*, unseen_* and clients.csv "
    "are exact accuracies on clients' own data, released without noise")


def print_summary(config, rows, output_dir):
    """Print the final accuracy, traffic, privacy spent and the gap to the baseline."""
    print(f"final test accuracy {rows[-1]['test_accuracy']:.4f} after {config['ROUNDS']} rounds; "
          f"uploaded {rows[-1]['mb_up_total']:.1f} MB, downloaded "
          f"{rows[-1]['mb_down_total']:.1f} MB; results in {output_dir}")
    if config["DP_CLIP_NORM"] > 0:
        print(f"privacy spent: epsilon {rows[-1]['epsilon']:.3f} at delta {config['DP_DELTA']}")
    if "virtual_hours_total" in rows[-1]:
        print(f"virtual time (DEVICE_HETEROGENEITY {config['DEVICE_HETEROGENEITY']}): "
              f"{rows[-1]['virtual_hours_total']:.2f} hours")
    if rows[-1].get("personal_pooled") not in (None, ""):
        last = rows[-1]
        print(f"clients' accuracy on their own test data: global model {last['local_pooled']:.4f} "
              f"pooled, worst tenth {last['local_worst10']:.4f}; own models "
              f"{last['personal_pooled']:.4f} pooled, worst tenth {last['personal_worst10']:.4f}")
    if config["CENTRALIZED_BASELINE"]:
        gap = 100 * (rows[-1]["baseline_accuracy"] - rows[-1]["test_accuracy"])
        print(f"centralized baseline {rows[-1]['baseline_accuracy']:.4f} on the same samples: "
              f"federated is {gap:.2f} percentage points below it")


def plot_distribution(path, counts, title):
    """Save samples per client (seed fig. 3) and the class mix per client (seed fig. 4).

    Args:
        counts: int array (K, 10), samples of each class held by each client.
    """
    figure, (sizes_axis, mix_axis) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    clients = np.arange(len(counts))
    sizes_axis.bar(clients, counts.sum(axis=1), color="tab:blue")
    sizes_axis.set_ylabel("samples")
    sizes_axis.set_title(f"Samples per client ({title})")
    bottom = np.zeros(len(counts))
    colors = plt.get_cmap("tab10").colors
    for label in range(counts.shape[1]):
        mix_axis.bar(clients, counts[:, label], bottom=bottom, color=colors[label],
                     label=str(label), width=1.0)
        bottom += counts[:, label]
    mix_axis.set_xlabel("client")
    mix_axis.set_ylabel("samples per class")
    mix_axis.legend(title="class", ncol=10, fontsize="small", loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def evaluated(rows):
    """The rows of rounds whose global model was tested (see EVAL_EVERY)."""
    return [row for row in rows if row["test_accuracy"] not in ("", None)]


def plot_history(path, rows, title):
    """Save test accuracy and test loss per round, with the centralized baseline if it ran."""
    rows = evaluated(rows)
    rounds = [row["round"] for row in rows]
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for prefix, label, style in (("test", "federated", "-"), ("baseline", "centralized", "--")):
        if f"{prefix}_accuracy" not in rows[0]:
            continue
        accuracy_axis.plot(rounds, [row[f"{prefix}_accuracy"] for row in rows], style,
                           marker=".", label=label)
        loss_axis.plot(rounds, [row[f"{prefix}_loss"] for row in rows], style, marker=".",
                       label=label)
    for axis, quantity in ((accuracy_axis, "test accuracy"), (loss_axis, "test loss")):
        axis.set_xlabel("round")
        axis.set_ylabel(quantity)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_communication(path, rows, title):
    """Save test accuracy against the cumulative megabytes clients uploaded (and against
    virtual hours, with devices on a virtual clock)."""
    rows = evaluated(rows)
    axes_of = [("mb_up_total", "cumulative MB uploaded")] + (
        [("virtual_hours_total", "virtual hours (devices.py)")]
        if "virtual_hours_total" in rows[0] else [])
    figure, axes = plt.subplots(1, len(axes_of), figsize=(6 * len(axes_of), 4), squeeze=False)
    for axis, (column, label) in zip(axes[0], axes_of):
        axis.plot([row[column] for row in rows], [row["test_accuracy"] for row in rows],
                  marker=".")
        axis.set_xlabel(label)
        axis.set_ylabel("test accuracy")
        axis.set_title(title, fontsize="small")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def last_client_rows(path):
    """The rows of a clients.csv (client_evaluation) from its last evaluated round; none when
    the file does not exist or is empty."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    last = max((int(row["round"]) for row in rows), default=None)
    return [row for row in rows if int(row["round"]) == last]


def plot_client_accuracies(path, client_rows, title):
    """Save the CDF of the clients' accuracies (clients.csv rows of one evaluation): the global
    model and each client's own, for trained and unseen clients."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for group in ("eligible", "attacker", "unseen"):
        rows = [row for row in client_rows if row["group"] == group]
        for model, style in (("local", "--"), ("personal", "-")):
            if not rows:
                continue
            accuracies = np.sort([float(row[f"{model}_accuracy"]) for row in rows])
            axis.step(accuracies, np.arange(1, len(accuracies) + 1) / len(accuracies), style,
                      where="post", label=f"{group}: {'global' if model == 'local' else 'own'} "
                                          "model")
    axis.set_xlabel(f"client accuracy on its local test data (round {client_rows[0]['round']})")
    axis.set_ylabel("share of clients at or below")
    axis.set_title(title, fontsize="small")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
