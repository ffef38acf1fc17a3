"""The clients: retrain a copy of the global CNN on one client's data (ClientUpdate of FedAvg).

A client starts from the global weights, runs E epochs of minibatch SGD (batch B, learning rate
eta, optional momentum with a fresh buffer) over its own samples in a new random order each epoch,
and returns its new weights, its number of samples and its training loss.

Speed: a client's whole local training is one call of a compiled TensorFlow function whose
input shapes are left open, so clients of every size share one trace. This does the same
arithmetic as `model.fit(x[order], y[order], shuffle=False)` with Keras' SGD (see
tests/test_client_side.py) without fit's per-call and per-step Python work.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import keras


@dataclasses.dataclass
class ClientUpdate:
    """What one client sends back: its layer arrays, how many samples it trained on, its loss."""

    weights: list
    num_examples: int
    train_loss: float


class LocalTrainer:
    """Train one reusable Keras model as any client, without rebuilding or recompiling it.

    Args:
        model: a Keras model with the global architecture; its weights are overwritten per client.
        x_train, y_train: the whole training set (float32 images, int labels); a client's data is
            the rows its index array names, gathered inside the compiled step.
        learning_rate: eta of local SGD.
        momentum: local SGD momentum (Keras' formula v = momentum*v - eta*g; w = w + v); its
            buffer starts at zero for every client.
        batch_size: B.
        local_epochs: E.
    """

    def __init__(self, model, x_train, y_train, learning_rate, momentum, batch_size, local_epochs):
        if len(model.weights) != len(model.trainable_variables):
            raise ValueError("LocalTrainer needs a model whose weights are all trainable")
        self.model = model
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.batch_size = int(batch_size)
        self.local_epochs = int(local_epochs)
        self.x_train = tf.convert_to_tensor(x_train, tf.float32)
        self.y_train = tf.convert_to_tensor(y_train, tf.int32)
        self._velocities = [tf.Variable(tf.zeros_like(variable), trainable=False)
                            for variable in model.trainable_variables]
        weight_specs = [tf.TensorSpec(variable.shape, variable.dtype)
                        for variable in model.trainable_variables]
        self._train = tf.function(self._train_steps, input_signature=[
            weight_specs, tf.TensorSpec([None, None], tf.int32)])

    def get_state(self):
        """Return the model's random state (dropout seeds) as arrays, for checkpoints."""
        return [variable.numpy() for variable in self.model.non_trainable_variables]

    def set_state(self, arrays):
        """Restore what get_state returned, so dropout continues exactly where it stopped."""
        for variable, value in zip(self.model.non_trainable_variables, arrays, strict=True):
            variable.assign(value)

    def epoch_orders(self, client_indices, rng):
        """Draw the client's sample order for every local epoch: int32 array (E, n)."""
        return np.stack([rng.permutation(client_indices)
                         for _ in range(self.local_epochs)]).astype(np.int32)

    def train(self, global_weights, client_indices, rng):
        """Run ClientUpdate for one client.

        Args:
            global_weights: list of the global model's layer arrays.
            client_indices: int array (n,) of the client's rows in the training set.
            rng: np.random.Generator that draws the per-epoch shuffles.
        Returns:
            ClientUpdate with float32 layer arrays, n, and the sample-weighted mean training loss
            of the last local epoch (what `fit` reports for it).
        """
        new_weights, loss = self._train(
            [tf.convert_to_tensor(layer) for layer in global_weights],
            self.epoch_orders(client_indices, rng))
        return ClientUpdate([layer.numpy() for layer in new_weights], len(client_indices),
                            float(loss))

    def _train_steps(self, global_weights, orders):
        """Compiled body: load the global weights, then SGD over `orders` batch by batch."""
        variables = self.model.trainable_variables
        for variable, value in zip(variables, global_weights):
            variable.assign(value)
        for velocity in self._velocities:
            velocity.assign(tf.zeros_like(velocity))
        num_examples = tf.shape(orders)[1]
        num_steps = (num_examples + self.batch_size - 1) // self.batch_size
        epoch_loss = tf.constant(0.0)
        for epoch in tf.range(tf.shape(orders)[0]):
            epoch_loss = tf.constant(0.0)
            for step in tf.range(num_steps):
                start = step * self.batch_size
                batch = orders[epoch, start:tf.minimum(start + self.batch_size, num_examples)]
                batch_loss = self._sgd_step(tf.gather(self.x_train, batch),
                                            tf.gather(self.y_train, batch))
                epoch_loss += batch_loss * tf.cast(tf.shape(batch)[0], tf.float32)
        return [tf.identity(variable) for variable in variables], \
            epoch_loss / tf.cast(num_examples, tf.float32)

    def _sgd_step(self, images, labels):
        """One minibatch step of SGD on the mean cross-entropy; returns the batch loss."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, probabilities))
        gradients = tape.gradient(loss, variables)
        for variable, gradient, velocity in zip(variables, gradients, self._velocities):
            if self.momentum:
                velocity.assign(self.momentum * velocity - self.learning_rate * gradient)
                variable.assign_add(velocity)
            else:
                variable.assign_sub(self.learning_rate * gradient)
        return loss
