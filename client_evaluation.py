"""Every client's accuracy on its own test data: the global model's and its own model's.

With LOCAL_TEST_SHARE > 0 every client keeps part of its samples as a local test set
(Data_Preprocessing.split_local_test). At every evaluation each client counts how many of its
local test samples the global model and its own model (personalization.personal_models) get
right; the server checks those counts like any upload (`score_problem`) and summarises them per
group of clients into the figures of history.csv: the eligible clients (those selection draws
from, trained yet or not; with attackers, the honest ones only, as Ditto's paper reports benign
devices) and the held-out ones (`unseen_`):

  pooled   correct over all local test samples of the group
  mean     mean over clients of each client's accuracy
  std      their standard deviation (population)
  worst10  mean of the lowest tenth of the clients' accuracies (at least one client; the
           measure of q-FFL, Li et al. 2020)
  best10   mean of the highest tenth

for `local_` (the global model) and `personal_` (each client's own; equal with "none"), and
`evaluated`, the clients the group's figures cover. Clients without local test samples
(floor(s n) = 0: n <= 3 at s = 0.25) are neither asked nor evaluated.
"""

import csv
import dataclasses
import math
import pathlib

import numpy as np
import tensorflow as tf

import Utils

FIGURES = ("pooled", "mean", "std", "worst10", "best10")
MODELS = ("local", "personal")
CLIENT_COLUMNS = ("round", "client", "group", "samples", "local_accuracy", "personal_accuracy")


def history_columns(held_out):
    """history.csv's per-client columns: local_pooled, ..., personal_best10, evaluated (and
    unseen_*)."""
    columns = tuple(f"{model}_{figure}" for model in MODELS for figure in FIGURES) + (
        "evaluated",)
    return columns + (tuple(f"unseen_{column}" for column in columns) if held_out else ())


@dataclasses.dataclass
class ClientScore:
    """A client's counts on its local test data: samples, right by the global model, right by
    its own model."""

    client: int
    samples: int
    global_correct: int
    personal_correct: int


class Scorer:
    """Count correct predictions of many models on many clients' rows in one compiled call.

    Args:
        model: a Keras model of the global architecture (its weights are overwritten).
        x, y: the whole training set, where every client's local test rows are.
    """

    def __init__(self, model, x, y):
        self.model = model
        self.x, self.y = tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y, tf.int32)
        stacked = [tf.TensorSpec([None, *variable.shape], variable.dtype)
                   for variable in model.trainable_variables]
        self._count = tf.function(self._count_steps, input_signature=[
            stacked, tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32)])

    def count_correct(self, models, clients_rows):
        """Return each client's number of correct predictions, an int array.

        models: one list of layer arrays per client, or a single list that all share.
        """
        stacks = [np.stack(layers).astype(np.float32) for layers in zip(*models)]
        counts = self._count(stacks,
                             np.concatenate([np.asarray(rows) for rows in clients_rows])
                             .astype(np.int32),
                             np.asarray([len(rows) for rows in clients_rows], np.int32))
        return counts.numpy().astype(np.int64)

    def _count_steps(self, stacks, flat_rows, sizes):
        counts = tf.TensorArray(tf.int32, size=tf.shape(sizes)[0])
        offset = tf.constant(0)
        for position in tf.range(tf.shape(sizes)[0]):
            row = tf.minimum(position, tf.shape(stacks[0])[0] - 1)
            for variable, stack in zip(self.model.trainable_variables, stacks):
                variable.assign(stack[row])
            rows = flat_rows[offset:offset + sizes[position]]
            offset += sizes[position]
            predicted = tf.argmax(self.model(tf.gather(self.x, rows), training=False), axis=1,
                                  output_type=tf.int32)
            right = tf.reduce_sum(tf.cast(predicted == tf.gather(self.y, rows), tf.int32))
            counts = counts.write(position, right)
        return counts.stack()


def score_problem(score, test_sizes):
    """Why the server refuses a client's reported score, or None: its sample count must be the
    client's local test size and its counts integers in 0..samples."""
    if not (isinstance(score.client, (int, np.integer)) and 0 <= score.client < len(test_sizes)):
        return f"{score.client!r} is not a client of this run"
    samples = test_sizes[score.client]
    if samples == 0:
        return f"client {score.client} holds no local test data; it was not asked for a score"
    if score.samples != samples:
        return (f"client {score.client} reports {score.samples} local test samples, "
                f"it holds {samples}")
    for name in ("global_correct", "personal_correct"):
        value = getattr(score, name)
        if not (isinstance(value, (int, np.integer)) and 0 <= value <= samples):
            return f"client {score.client}'s {name} {value!r} is outside 0..{samples}"
    return None


def summarize(scores, prefix=""):
    """The history figures of a group of clients' scores (see the module's text)."""
    figures = {}
    for model, field in zip(MODELS, ("global_correct", "personal_correct")):
        correct = np.array([getattr(score, field) for score in scores], np.float64)
        samples = np.array([score.samples for score in scores], np.float64)
        for figure, value in group_figures(correct, samples).items():
            figures[f"{prefix}{model}_{figure}"] = round(value, 6)
    figures[f"{prefix}evaluated"] = len(scores)
    return figures


def group_figures(correct, samples):
    """pooled, mean, std, worst10, best10 of one model over a group of clients."""
    accuracies = np.sort(correct / samples)
    tenth = max(1, math.ceil(len(accuracies) / 10))
    return {"pooled": float(correct.sum() / samples.sum()), "mean": float(accuracies.mean()),
            "std": float(accuracies.std()), "worst10": float(accuracies[:tenth].mean()),
            "best10": float(accuracies[-tenth:].mean())}


def client_group(client, held_out, attackers):
    """A client's group in clients.csv: unseen (held out), attacker, or eligible (selection
    draws from it, whether it has trained yet or not)."""
    if client in held_out:
        return "unseen"
    return "attacker" if client in attackers else "eligible"


def client_rows(round_num, scores, held_out, attackers=()):
    """clients.csv's rows of one evaluation: one per client."""
    return [{"round": round_num, "client": score.client,
             "group": client_group(score.client, held_out, attackers),
             "samples": score.samples,
             "local_accuracy": round(score.global_correct / score.samples, 6),
             "personal_accuracy": round(score.personal_correct / score.samples, 6)}
            for score in scores]


def round_figures(round_num, scores, test_indices, held_out, attackers=()):
    """Check the clients' reported scores and summarise them.

    Args:
        scores: what the engine delivered (ClientScore objects; anything else is refused).
        test_indices: every client's local test rows (the server knows the split).
        held_out: the held-out clients, reported as unseen_*; attackers: the malicious
            clients, left out of the figures (their rows in clients.csv are marked).
    Returns:
        (history figures, clients.csv rows, one line per refused or missing report).
    """
    test_sizes = [len(rows) for rows in test_indices]
    accepted, refused = {}, []
    for score in scores:
        problem = (score_problem(score, test_sizes) if isinstance(score, ClientScore)
                   else "not a client score")
        if problem is None and score.client in accepted:
            problem = f"client {score.client} reported twice"
        if problem is None:
            accepted[score.client] = score
        else:
            refused.append(f"round {round_num}: refused a client evaluation: {problem}")
    missing = [client for client, size in enumerate(test_sizes)
               if size and client not in accepted]
    if missing:
        refused.append(f"round {round_num}: no evaluation from clients {missing}; the "
                       "per-client figures leave them out")
    ordered = [accepted[client] for client in sorted(accepted)]
    groups = {"eligible": "", "unseen": "unseen_"}
    figures = {}
    for group, prefix in groups.items():
        members = [score for score in ordered
                   if client_group(score.client, held_out, attackers) == group]
        if members:
            figures.update(summarize(members, prefix))
    return figures, client_rows(round_num, ordered, held_out, attackers), refused


class ClientsLog:
    """clients.csv: a row per evaluated client and evaluation, flushed each round.

    A resumed run keeps the rows of the rounds its checkpoint holds and drops later ones.
    Without per-client evaluation (`enabled` False) it writes nothing.
    """

    def __init__(self, path, rounds_done, enabled):
        self.path, self.enabled, self._file = pathlib.Path(path), enabled, None
        if not enabled:
            return
        kept = []
        if rounds_done and self.path.exists():
            with open(self.path, newline="") as file:
                kept = [row for row in csv.DictReader(file) if int(row["round"]) <= rounds_done]
        self._file = open(self.path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=CLIENT_COLUMNS)
        self._writer.writeheader()
        self._writer.writerows(kept)
        self._file.flush()

    def append(self, rows):
        if self._file is not None:
            self._writer.writerows(rows)
            self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()

    def plot(self, path, title):
        """Draw the clients' accuracies at the last evaluation as CDFs, one per model and
        group (the spread that the means hide)."""
        rows = Utils.last_client_rows(self.path) if self.enabled else []
        if rows:
            Utils.plot_client_accuracies(path, rows, title)
