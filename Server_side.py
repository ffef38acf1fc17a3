"""The server: the global CNN, client sampling, FedAvg aggregation and test evaluation.

FedAvg is Algorithm 1 of McMahan et al. (2017), "Communication-Efficient Learning of Deep
Networks from Decentralized Data": the next global model is the average of the returned client
models, weighted by each client's number of training examples.
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
        list of float32 layer arrays: sum_k n_k * w_k / sum_k n_k, accumulated in float64.
    """
    if len(client_weights) == 0 or len(client_weights) != len(num_examples):
        raise ValueError("fedavg needs one example count per client and at least one client")
    coefficients = np.asarray(num_examples, dtype=np.float64)
    coefficients = coefficients / coefficients.sum()
    return [
        sum(coefficient * np.asarray(layers[layer], dtype=np.float64)
            for coefficient, layers in zip(coefficients, client_weights)).astype(np.float32)
        for layer in range(len(client_weights[0]))
    ]


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
