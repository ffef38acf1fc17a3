"""The server: the global model, client sampling, aggregation, server optimizers and evaluation.

FedAvg is Algorithm 1 of McMahan et al. (2017), "Communication-Efficient Learning of Deep
Networks from Decentralized Data": the next global model is the average of the returned client
models, weighted by each client's number of training examples. The server step is written as in
Reddi et al. (2021), "Adaptive Federated Optimization": clients' updates y_i - x are aggregated
into a pseudo-gradient Delta and a server optimizer moves x along it (plain FedAvg is SGD with
server learning rate 1). FedNova (Wang et al. 2020) and SCAFFOLD (Karimireddy et al. 2020) change
how Delta is formed.

`Server.round` is the server's whole round, from what the engine delivered to the next global
weights (screen, aggregate, count traffic and privacy): both engines (`python Main.py` in one
process, the Flower ServerApp) call it. Uploads are combined in client-id order and every
server-side draw (selection, dropout, seeded DP noise) is keyed by (SEED, round), so the result
does not depend on the order replies arrive in. What it delegates has homes of its own:
screening.py (checks of what arrived), robust_rules.py, privacy.py (DP noise and accounting).
"""

import dataclasses
import math

import numpy as np
import tensorflow as tf

import algorithms
import models
import personalization
import privacy
import robust_rules
import screening
import secure_aggregation
import upload_format
import Utils

# Test images are pushed through the model in chunks this large: big enough that per-call
# overhead vanishes, small enough to keep activations in cache-friendly sizes (measured fastest).
EVAL_BATCH_SIZE = 5000
# Keras clips probabilities to this before the log in its cross-entropy; we match it.
PROBABILITY_EPSILON = 1e-7


def create_model(model_name=models.DEFAULT):
    """Build the global model: MODEL's architecture, from its plug-in in models/."""
    return models.build(model_name)


CLIENT_SAMPLINGS = ("fixed", "poisson")


def select_clients(num_clients, client_fraction, rng, sampling="fixed", over_selection=1.0):
    """Draw the round's distinct clients at random.

    fixed: m = Utils.num_selected_clients(K, C) clients without replacement (McMahan et al. 2017);
    with over-selection f > 1, min(K, ceil(f m)) of them (Bonawitz et al. 2019).
    poisson: each client independently with probability C (DP-FedAvg, McMahan et al. 2018);
    the count varies and can be zero.
    Returns:
        int64 array of sorted client ids in [0, num_clients).
    """
    if sampling == "poisson":
        return np.flatnonzero(rng.random(num_clients) < client_fraction).astype(np.int64)
    if sampling != "fixed":
        raise ValueError(f"CLIENT_SAMPLING must be one of {', '.join(CLIENT_SAMPLINGS)}, "
                         f"got {sampling!r}")
    count = Utils.num_selected_clients(num_clients, client_fraction)
    if over_selection > 1:
        count = min(num_clients, math.ceil(over_selection * count - 1e-9))
    return np.sort(rng.choice(num_clients, size=count, replace=False))


def surviving_clients(selected, dropout_probability, rng):
    """Drop each selected client independently with `dropout_probability` (it disconnects).

    Returns:
        the subset of `selected` that returns an update, in the same order.
    """
    if dropout_probability == 0:
        return selected
    return selected[rng.random(len(selected)) >= dropout_probability]


SERVER_OPTIMIZERS = ("sgd", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


class ServerOptimizer:
    """Apply the aggregated pseudo-gradient Delta to the global weights x (Reddi et al. 2021).

    sgd:        x <- x + lr * Delta                    (FedAvg when lr = 1)
    fedavgm:    v <- momentum * v + Delta;  x <- x + lr * v          (Hsu et al. 2019)
    fedadagrad: v <- v + Delta^2
    fedyogi:    v <- v - (1 - beta2) * Delta^2 * sign(v - Delta^2)
    fedadam:    v <- beta2 * v + (1 - beta2) * Delta^2
    and for the last three m <- beta1 * m + (1 - beta1) * Delta; x <- x + lr * m / (sqrt(v) + tau),
    starting from m = 0 and v = tau^2 as in Algorithm 2 of the paper (no bias correction).
    """

    def __init__(self, name, shapes, learning_rate=1.0, momentum=0.9, beta1=0.9, beta2=0.99,
                 tau=1e-3):
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"SERVER_OPTIMIZER must be one of {', '.join(SERVER_OPTIMIZERS)}, "
                             f"got {name!r}")
        self.name, self.learning_rate, self.momentum = name, learning_rate, momentum
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.first_moment = [np.zeros(shape) for shape in shapes]
        self.second_moment = [np.full(shape, tau ** 2) for shape in shapes]

    def step(self, global_weights, delta):
        """Return the new global weights (float32) after one server step along `delta`."""
        return [(np.float64(weights) + self.learning_rate * self._direction(layer, np.float64(d)))
                .astype(np.float32)
                for layer, (weights, d) in enumerate(zip(global_weights, delta))]

    def _direction(self, layer, delta):
        if self.name == "sgd":
            return delta
        if self.name == "fedavgm":
            self.first_moment[layer] = self.momentum * self.first_moment[layer] + delta
            return self.first_moment[layer]
        self.first_moment[layer] = self.beta1 * self.first_moment[layer] + (1 - self.beta1) * delta
        squared, second = delta ** 2, self.second_moment[layer]
        if self.name == "fedadagrad":
            second = second + squared
        elif self.name == "fedyogi":
            second = second - (1 - self.beta2) * squared * np.sign(second - squared)
        else:
            second = self.beta2 * second + (1 - self.beta2) * squared
        self.second_moment[layer] = second
        return self.first_moment[layer] / (np.sqrt(second) + self.tau)

    def get_state(self):
        return self.first_moment + self.second_moment

    def set_state(self, arrays):
        half = len(arrays) // 2
        self.first_moment = [np.array(array) for array in arrays[:half]]
        self.second_moment = [np.array(array) for array in arrays[half:]]


# The n-weighted mean, FedAvg's aggregation, and the uniform one (robust rules, DP): the
# algorithms' own maths, used here too.
fedavg, uniform_mean = algorithms.weighted_mean, algorithms.uniform_mean
AGGREGATIONS = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum")


@dataclasses.dataclass(frozen=True)
class ServerSettings(Utils.Settings):
    """The constants the server reads, by name; built from the constants at the edge."""

    num_clients: int
    client_fraction: float
    client_sampling: str
    client_dropout: float
    seed: int
    algorithm: str
    aggregation: str
    trim_ratio: float
    krum_f: int
    server_optimizer: str
    server_lr: float
    server_momentum: float
    server_beta1: float
    server_beta2: float
    server_tau: float
    dp_clip_norm: float
    dp_noise_multiplier: float
    dp_delta: float
    dp_noise: str
    batch_size: int
    local_epochs: int
    local_momentum: float
    learning_rate: float
    compression: str
    topk_fraction: float
    held_out_clients: float
    personalization: str
    over_selection: float
    model: str
    secure_aggregation: str
    options: dict  # the plug-ins' and secure aggregation's constants by name


def held_out_clients(num_clients, share, seed):
    """The clients never selected for training (HELD_OUT_CLIENTS of them), drawn from SEED."""
    count = Utils.round_half_up(share * num_clients)
    return np.sort(Utils.rng(seed, "held_out").choice(num_clients, count, replace=False))


def training_clients(settings):
    """The clients that can be selected: all but the held-out ones, sorted."""
    if settings.held_out_clients == 0:
        return np.arange(settings.num_clients)
    return np.setdiff1d(np.arange(settings.num_clients),
                        held_out_clients(settings.num_clients, settings.held_out_clients,
                                         settings.seed))


def round_clients(settings, round_num):
    """Return (selected, returning): the round's sampled clients, drawn from the training
    clients, and those whose update comes back (each selected client drops out independently
    with CLIENT_DROPOUT)."""
    pool = training_clients(settings)
    selected = pool[select_clients(len(pool), settings.client_fraction,
                                   Utils.rng(settings.seed, "selection", round_num),
                                   settings.client_sampling, settings.over_selection)]
    returning = surviving_clients(selected, settings.client_dropout,
                                  Utils.rng(settings.seed, "dropout", round_num))
    return selected, returning


@dataclasses.dataclass
class RoundReport:
    """What the server's round saw and did, for the round's history row.

    accepted: the uploads it used; rejections: those it refused (screening.Rejection);
    diverged: every upload was refused for NaN or infinity (local training diverged);
    krum_skipped: Krum had too few updates and the model was kept (None without Krum);
    bytes_down / bytes_up: the round's traffic; epsilon: the privacy spent so far under DP,
    else None.
    """

    accepted: list
    rejections: list
    diverged: bool
    krum_skipped: bool
    bytes_down: int
    bytes_up: int
    epsilon: float = None


class Server:
    """The server's state across rounds and its round: screen, decode, aggregate, step.

    Args:
        settings: ServerSettings.
        shapes: the global model's layer shapes.
        client_sizes: how many samples every client trains on (the server knows the
            partition); needed by `round` to check sample counts.

    Under personalization clients send only the uploaded layers (none with "local"); the
    others (their own part) get no update and keep their initial values in the global model.
    """

    def __init__(self, settings, shapes, client_sizes=None):
        if settings.aggregation not in AGGREGATIONS:
            raise ValueError(f"AGGREGATION must be one of {', '.join(AGGREGATIONS)}")
        self.settings, self.shapes = settings, [tuple(shape) for shape in shapes]
        self.client_sizes = client_sizes
        self.uploaded = personalization.build(settings, len(self.shapes)).uploaded_layers
        self.upload_shapes = [self.shapes[index] for index in self.uploaded]
        # What travels: float32 arrays of the uploaded layers.
        self.model_bytes = sum(4 * int(np.prod(shape)) for shape in self.upload_shapes)
        # Those who can be sampled: SCAFFOLD's N and the DP accountant's K.
        self.population = len(training_clients(settings))
        self.optimizer = ServerOptimizer(
            settings.server_optimizer, shapes, settings.server_lr, settings.server_momentum,
            settings.server_beta1, settings.server_beta2, settings.server_tau)
        self.algorithm = algorithms.build(settings, self.shapes)
        # What travels besides the update, float32: each array the algorithm sends down with
        # the weights, and each it uploads with the update (whole-model shapes).
        whole_bytes = sum(4 * int(np.prod(shape)) for shape in self.shapes)
        self.extra_bytes_down = whole_bytes * len(self.algorithm.SENT)
        self.extra_bytes_up = whole_bytes * len(self.algorithm.UPLOADED)
        # What a secure sum carries per client: the update, then the extras (in the sum).
        self.sum_shapes = secure_aggregation.sum_shapes(self.upload_shapes,
                                                        self.algorithm.UPLOADED)
        if secure_aggregation.is_on(settings):
            self.extra_bytes_up = 0

    def round(self, round_num, global_weights, delivered, expected_clients, num_selected,
              step_limits=None, secure_sum=None):
        """The server's part of a round, from what the engine delivered to the next weights.

        Nothing a client sends is trusted: a malformed, stale or foreign upload is dropped as
        if its client had not returned (see `screening.screen_uploads`).
        Returns:
            (new float32 layer arrays, RoundReport).
        """
        settings = self.settings
        accepted, rejections = screening.screen_uploads(
            settings, round_num, delivered, expected_clients, self.client_sizes,
            self.upload_shapes, step_limits)
        diverged = bool(rejections) and not accepted and all(
            rejection.kind == upload_format.NON_FINITE for rejection in rejections)
        summed, protocol_bytes, unmasked = None, (0, 0), True
        if secure_sum is not None and accepted and secure_aggregation.is_on(settings):
            # The protocol (on Flower) sums the accepted updates on their nodes; a node that
            # drops out takes its clients out of the sum, and below its threshold nothing is.
            outcome = secure_sum(round_num, accepted, self.sum_shapes)
            rejections += [screening.Rejection(round_num, upload.client, upload.node,
                                               outcome.why_left_out[upload.client],
                                               screening.LEFT_OUT)
                           for upload in accepted if upload.client not in outcome.clients]
            accepted = [upload for upload in accepted if upload.client in outcome.clients]
            summed, unmasked = outcome.total, outcome.total is not None
            protocol_bytes = (outcome.bytes_down, outcome.bytes_up)
        new_weights = (global_weights if diverged or not unmasked
                       else self.aggregate(round_num, global_weights, accepted, summed))
        epsilon = (privacy.privacy_spent(settings.dp_noise_multiplier, settings.client_sampling,
                                         self.population, settings.client_fraction,
                                         round_num, settings.dp_delta)
                   if settings.dp_clip_norm > 0 else None)
        return new_weights, RoundReport(
            accepted, rejections, diverged,
            (robust_rules.too_few_for_krum(settings.aggregation, settings.krum_f,
                                           len(accepted))
             if settings.aggregation in robust_rules.KRUM_RULES else None),
            **self.round_traffic(num_selected, accepted, protocol_bytes), epsilon=epsilon)

    def client_traffic(self):
        """(bytes down, bytes up) of one client's round, known before it trains: the model
        and what the configured encoding sends, with the algorithm's extras."""
        sent = (secure_aggregation.encoded_size(self.settings.options, self.sum_shapes)
                if secure_aggregation.is_on(self.settings)
                else upload_format.encoded_size(self.settings.compression, self.upload_shapes,
                                                self.settings.topk_fraction))
        return self.model_bytes + self.extra_bytes_down, sent + self.extra_bytes_up

    def round_traffic(self, num_selected, uploads, protocol_bytes=(0, 0)):
        """Count bytes down (the global model and the algorithm's extras to every selected
        client) and up (what clients sent: encoded updates and extras), plus (down, up) of a
        secure aggregation protocol's messages, whose uploads' updates stay on their nodes."""
        return {"bytes_down": num_selected * (self.model_bytes + self.extra_bytes_down)
                + protocol_bytes[0],
                "bytes_up": sum(secure_aggregation.upload_bytes(upload.update)
                                + self.extra_bytes_up for upload in uploads)
                + protocol_bytes[1]}

    def sent_to_clients(self):
        """What the algorithm sends clients with the weights ({} for most; SCAFFOLD's c)."""
        return self.algorithm.sent()

    def aggregate(self, round_num, global_weights, uploads, summed=None):
        """Combine the round's uploads into the next global weights (float32 layer arrays);
        under secure aggregation `summed` is their modular sum when a protocol took it.

        A round with no upload keeps the model, except under DP with Poisson sampling, whose
        accounted mechanism adds its noise whatever the sample.
        """
        uploads = sorted(uploads, key=lambda upload: upload.client)
        settings = self.settings
        private = settings.dp_clip_norm > 0
        if not self.uploaded or (
                not uploads and not (private and settings.client_sampling == "poisson")):
            return global_weights
        if robust_rules.too_few_for_krum(settings.aggregation, settings.krum_f, len(uploads)):
            return global_weights
        if secure_aggregation.is_on(settings):
            delta = self.secure_mean(round_num, uploads, summed)
            return self.optimizer.step(global_weights, self.whole(delta))
        deltas = [upload_format.decode_update(upload.update, self.upload_shapes)
                  for upload in uploads]
        if settings.aggregation != "fedavg":
            delta = robust_aggregate(deltas, settings)
        elif private:
            denominator = privacy.dp_denominator(settings.client_sampling, len(deltas),
                                                 self.population, settings.client_fraction,
                                                 settings.client_dropout)
            noise = privacy.noise_generator(settings.dp_noise, settings.seed, round_num)
            delta = privacy.dp_noisy_mean(deltas, self.upload_shapes, settings.dp_clip_norm,
                                          settings.dp_noise_multiplier, denominator, noise)
        else:
            delta = self.algorithm.combine(deltas, uploads, self.population)
        return self.optimizer.step(global_weights, self.whole(delta))

    def secure_mean(self, round_num, uploads, summed=None):
        """The round's mean update from the modular sum of the contributions alone (taken
        here from the uploads unless given): weighted by samples, or DP-FedAvg's noisy mean of
        the clients' clipped updates."""
        settings = self.settings
        private = settings.dp_clip_norm > 0
        total_weight = len(uploads) if private else sum(
            self.algorithm.sum_weight(upload.num_examples) for upload in uploads)
        if uploads and summed is None:
            summed = secure_aggregation.modular_sum([upload.update for upload in uploads],
                                                    settings.options)
        summed = (secure_aggregation.decode_sum(summed, total_weight, settings.options)
                  if uploads else [np.zeros(shape) for shape in self.sum_shapes])
        if not private:
            return self.algorithm.from_secure_mean([layer / total_weight for layer in summed],
                                                   uploads, self.population)
        denominator = privacy.dp_denominator(settings.client_sampling, len(uploads),
                                             self.population, settings.client_fraction,
                                             settings.client_dropout)
        return privacy.noisy_mean_of_sum(
            summed, settings.dp_clip_norm, settings.dp_noise_multiplier, denominator,
            privacy.noise_generator(settings.dp_noise, settings.seed, round_num))

    def whole(self, delta):
        """The pseudo-gradient over every layer: zero for the layers nobody uploads."""
        if len(self.uploaded) == len(self.shapes):
            return delta
        whole = [np.zeros(shape) for shape in self.shapes]
        for index, layer in zip(self.uploaded, delta, strict=True):
            whole[index] = layer
        return whole

    def get_state(self):
        """The optimizer's moments, then the algorithm's named state (SERVER_STATE order)."""
        return self.optimizer.get_state() + self.algorithm.get_state()

    def set_state(self, arrays):
        num_optimizer = 2 * len(self.shapes)
        self.optimizer.set_state(arrays[:num_optimizer])
        self.algorithm.set_state(arrays[num_optimizer:])


def robust_aggregate(deltas, settings):
    """Apply AGGREGATION's robust rule (median, trimmed_mean, krum, multi_krum) to the updates."""
    rule = settings.aggregation
    if rule == "median":
        return robust_rules.coordinate_median(deltas)
    if rule == "trimmed_mean":
        return robust_rules.trimmed_mean(deltas, settings.trim_ratio)
    keep = 1 if rule == "krum" else max(1, len(deltas) - settings.krum_f)
    return uniform_mean([deltas[position] for position in
                         robust_rules.multi_krum_choice(deltas, settings.krum_f, keep)])


def cross_entropy(probabilities, labels):
    """Mean cross-entropy of softmax outputs, clipped as Keras clips them.

    Args:
        probabilities: float array (N, classes), rows summing to 1.
        labels: int array (N,).
    Returns:
        float, the mean of -log p[label].
    """
    picked = np.asarray(probabilities, np.float64)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(picked, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON))))


class Evaluator:
    """Evaluate weights of `model` on a fixed test set with one compiled forward pass."""

    def __init__(self, model, x_test, y_test):
        self.model = model
        self.x_test = tf.convert_to_tensor(x_test)
        self.y_test = np.asarray(y_test)
        # The model's softmax outputs (not logits: the seed wrongly used from_logits=True).
        self._predict = tf.function(
            lambda images: model(images, training=False),
            input_signature=[tf.TensorSpec([None, *x_test.shape[1:]], tf.float32)])

    def __call__(self, weights):
        """Return (test_loss, test_accuracy) of the model holding `weights`."""
        self.model.set_weights(weights)
        probabilities = np.concatenate([
            self._predict(self.x_test[start:start + EVAL_BATCH_SIZE]).numpy()
            for start in range(0, len(self.y_test), EVAL_BATCH_SIZE)])
        accuracy = float(np.mean(np.argmax(probabilities, axis=1) == self.y_test))
        return cross_entropy(probabilities, self.y_test), accuracy
