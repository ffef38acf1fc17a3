"""The server: the global CNN, client sampling, aggregation, server optimizers and evaluation.

FedAvg is Algorithm 1 of McMahan et al. (2017), "Communication-Efficient Learning of Deep
Networks from Decentralized Data": the next global model is the average of the returned client
models, weighted by each client's number of training examples. The server step is written as in
Reddi et al. (2021), "Adaptive Federated Optimization": clients' updates y_i - x are aggregated
into a pseudo-gradient Delta and a server optimizer moves x along it (plain FedAvg is SGD with
server learning rate 1). FedNova (Wang et al. 2020) and SCAFFOLD (Karimireddy et al. 2020) change
how Delta is formed.
"""

import numpy as np
import tensorflow as tf
import keras

# Test images are pushed through the model in chunks this large: big enough that per-call
# overhead vanishes, small enough to keep activations in cache-friendly sizes (measured fastest).
EVAL_BATCH_SIZE = 5000
# Keras clips probabilities to this before the log in its cross-entropy; we match it.
PROBABILITY_EPSILON = 1e-7


def create_model():
    """Build the seed's CNN; the only place the architecture is defined."""
    return keras.Sequential([
        keras.Input(shape=(28, 28, 1)),
        keras.layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        keras.layers.MaxPooling2D(pool_size=(2, 2)),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(10, activation="softmax"),
    ])


def num_selected_clients(num_clients, client_fraction):
    """Return m = max(1, round(C * K)), the number of clients trained each round."""
    return max(1, int(round(client_fraction * num_clients)))


def select_clients(num_clients, client_fraction, rng):
    """Draw the round's distinct clients at random.

    Returns:
        int64 array of m sorted client ids in [0, num_clients).
    """
    count = num_selected_clients(num_clients, client_fraction)
    return np.sort(rng.choice(num_clients, size=count, replace=False))


def surviving_clients(selected, dropout_probability, rng):
    """Drop each selected client independently with `dropout_probability` (it disconnects).

    Returns:
        the subset of `selected` that returns an update, in the same order.
    """
    if dropout_probability == 0:
        return selected
    return selected[rng.random(len(selected)) >= dropout_probability]


def fedavg(client_weights, num_examples):
    """Average client models weighted by their number of training examples.

    Args:
        client_weights: one list of layer arrays per client, all with the same shapes.
        num_examples: one positive count per client.
    Returns:
        list of layer arrays: sum_k n_k * w_k / sum_k n_k, accumulated in float64 and returned in
        the clients' dtype.
    """
    if len(client_weights) == 0 or len(client_weights) != len(num_examples):
        raise ValueError("fedavg needs one example count per client and at least one client")
    coefficients = np.asarray(num_examples, dtype=np.float64)
    coefficients = coefficients / coefficients.sum()
    return [
        sum(coefficient * np.asarray(layers[layer], dtype=np.float64)
            for coefficient, layers in zip(coefficients, client_weights))
        .astype(np.asarray(client_weights[0][layer]).dtype)
        for layer in range(len(client_weights[0]))
    ]


def uniform_mean(updates):
    """Average updates with equal weights, as SCAFFOLD, DP-FedAvg and Multi-Krum do."""
    return fedavg(updates, [1] * len(updates))


def client_deltas(client_weights, global_weights):
    """Return each client's update y_i - x as float64 layer arrays."""
    return [[np.float64(new) - np.float64(start) for new, start in zip(weights, global_weights)]
            for weights in client_weights]


def fednova_normalizer(num_steps, momentum):
    """FedNova's ||a_i||_1 for tau local SGD steps with momentum rho (Wang et al. 2020, eq. 9).

    Plain SGD gives tau; momentum rho gives (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho).
    """
    if momentum == 0:
        return float(num_steps)
    return (num_steps - momentum * (1 - momentum ** num_steps) / (1 - momentum)) / (1 - momentum)


def fednova_delta(deltas, num_examples, normalizers):
    """FedNova's pseudo-gradient: tau_eff * sum_i p_i * Delta_i / a_i, with tau_eff = sum p_i a_i.

    Normalizing each update by its step count removes the objective inconsistency that plain
    averaging has when clients take different numbers of local steps.
    """
    weights = np.asarray(num_examples, np.float64) / np.sum(num_examples)
    effective_steps = float(np.dot(weights, normalizers))
    normalized = [[layer / normalizer for layer in delta]
                  for delta, normalizer in zip(deltas, normalizers)]
    return [effective_steps * layer for layer in fedavg(normalized, num_examples)]


class ScaffoldServerVariate:
    """SCAFFOLD's server control variate c, updated with the participating fraction |S|/N."""

    def __init__(self, shapes):
        self.arrays = [np.zeros(shape, np.float32) for shape in shapes]

    def update(self, variate_deltas, num_clients):
        """c <- c + (|S| / N) * mean_i (c_i+ - c_i), over the |S| clients that returned."""
        mean_delta = uniform_mean(variate_deltas)
        share = len(variate_deltas) / num_clients
        self.arrays = [(np.float64(variate) + share * delta).astype(np.float32)
                       for variate, delta in zip(self.arrays, mean_delta)]

    def get_state(self):
        return list(self.arrays)

    def set_state(self, arrays):
        self.arrays = [np.array(array, np.float32) for array in arrays]


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


def decode_update(encoded):
    """Turn encode_update's output back into float64 layer arrays (the seed's uncompression_)."""
    return [_decode_layer(layer) for layer in encoded]


def _decode_layer(layer):
    if "codes" in layer:
        return np.float64(layer["offset"]) + np.float64(layer["step"]) * layer["codes"]
    if "indices" in layer:
        dense = np.zeros(int(np.prod(layer["shape"])))
        dense[layer["indices"]] = layer["values"]
        return dense.reshape(layer["shape"])
    return np.float64(layer["values"])


def _stacked(deltas, layer):
    return np.stack([np.float64(delta[layer]) for delta in deltas])


def coordinate_median(deltas):
    """Coordinate-wise median of the client updates (Yin et al. 2018)."""
    return [np.median(_stacked(deltas, layer), axis=0) for layer in range(len(deltas[0]))]


def trimmed_mean(deltas, trim_ratio):
    """Coordinate-wise mean after dropping the floor(trim_ratio * m) largest and smallest values."""
    cut = int(trim_ratio * len(deltas))
    return [np.mean(np.sort(_stacked(deltas, layer), axis=0)[cut:len(deltas) - cut], axis=0)
            for layer in range(len(deltas[0]))]


def krum_scores(deltas, num_attackers):
    """Krum's score per client: the summed squared distances to its m - f - 2 nearest others.

    Blanchard et al. (2017) need m > 2f + 2; when dropout leaves fewer clients, at least one
    neighbour is still used.
    """
    flat = np.stack([np.concatenate([np.ravel(layer) for layer in delta]) for delta in deltas])
    squared = np.sum((flat[:, np.newaxis, :] - flat[np.newaxis, :, :]) ** 2, axis=2)
    num_neighbours = max(1, len(deltas) - num_attackers - 2)
    return np.array([np.sort(np.delete(row, client))[:num_neighbours].sum()
                     for client, row in enumerate(squared)])


def multi_krum(deltas, num_attackers, num_selected):
    """Average the `num_selected` updates with the lowest Krum scores (Krum: num_selected=1)."""
    chosen = np.argsort(krum_scores(deltas, num_attackers), kind="stable")[:num_selected]
    return uniform_mean([deltas[index] for index in chosen])


def add_dp_noise(average, noise_multiplier, clip_norm, num_clients, rng):
    """DP-FedAvg's server noise: N(0, (z * S / m)^2) on each coordinate of the uniform average."""
    deviation = noise_multiplier * clip_norm / num_clients
    return [layer + rng.normal(0.0, deviation, np.shape(layer)) for layer in average]


def privacy_spent(noise_multiplier, sampling_rate, rounds, delta):
    """Epsilon of DP-FedAvg after `rounds` rounds, from Google's dp-accounting (RDP).

    Each round is a sampled Gaussian mechanism, accounted as Poisson sampling at rate
    C = CLIENT_FRACTION (the paper's analysis; our sampling is fixed-size, as is common).
    Integer Renyi orders only: fractional ones below 2 fail to converge for some rates.
    """
    import dp_accounting  # Imported here: only runs with DP pay for SciPy.

    if noise_multiplier == 0:
        return float("inf")
    accountant = dp_accounting.rdp.RdpAccountant(list(range(2, 257)) + [512, 1024])
    event = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))
