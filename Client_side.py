"""The clients: retrain a copy of the global CNN on one client's data (ClientUpdate of FedAvg).

A client starts from the global weights, runs E epochs of minibatch SGD (batch B, learning rate
eta, optional momentum with a fresh buffer) over its own samples in a new random order each epoch,
and returns its update, its number of samples, its number of steps and its training loss.
Two local variants change the step: FedProx (Li et al. 2020) adds (mu/2)||w - w_global||^2 to the
loss; SCAFFOLD (Karimireddy et al. 2020) adds the correction c - c_i to every gradient and keeps
its control variate c_i across rounds (option II update).

`ClientHost.train` is a round for the clients a process hosts, from the global weights to the
encoded uploads: both engines (`python Main.py` in one process, the Flower ClientApp on a
SuperNode) call it, and every random draw in it is keyed by (SEED, round, client), so a client's
upload does not depend on which process trains it, in what order or beside which clients.

Speed: the local training of many clients is one call of a compiled TensorFlow function (a
loop over clients, each a loop over its batches) whose input shapes are left open, so clients of
every size share one trace. Each client gets the same arithmetic as
`model.fit(x[order], y[order], shuffle=False)` with Keras' SGD, bit for bit the same as training
it alone (see tests/test_client_side.py), without fit's per-call and per-step Python work.
"""

import dataclasses

import numpy as np
import tensorflow as tf
import keras

import attacks
import client_state
import Utils
import upload_format

# Grappler's arithmetic optimizer rewrites sums of gradients inside the nested training loops
# into temporary variables that collide from the second call on (AlreadyExistsError with FedProx,
# TensorFlow 2.21). Turning that one rewrite off cost no measurable speed here.
tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})


@dataclasses.dataclass
class LocalResult:
    """What a client's local training returns.

    new_weights: its model after training (layer arrays; the update is new_weights - global);
    num_examples: n, the samples it holds; num_steps: the local SGD steps it took; train_loss:
    mean cross-entropy of its last epoch.
    """

    new_weights: list
    num_examples: int
    num_steps: int
    train_loss: float


@dataclasses.dataclass(frozen=True)
class ClientSettings(Utils.Settings):
    """The constants the clients read, by name; built from the constants at the edge."""

    seed: int
    algorithm: str
    learning_rate: float
    local_momentum: float
    batch_size: int
    local_epochs: int
    prox_mu: float
    compression: str
    topk_fraction: float
    stochastic_rounding: bool
    dp_clip_norm: float
    num_clients: int
    malicious_fraction: float
    attack: str
    attack_scale: float


# A dropout seed that tells the compiled call to continue the model's dropout state.
KEEP_DROPOUT_STATE = -1


class LocalTrainer:
    """Train one reusable Keras model as any client, without rebuilding or recompiling it.

    One compiled call (`train_orders`) trains any number of clients, each from the start
    weights over its own sample order; `train_many` and `train` draw those orders and dropout
    seeds for clients, the centralized baseline passes its own stream.

    Args:
        model: a Keras model with the global architecture; its weights are overwritten per client.
        x_train, y_train: the whole training set (float32 images, int labels); a client's data is
            the rows its index array names, gathered inside the compiled step.
        learning_rate: eta of local SGD.
        momentum: local SGD momentum (Keras' formula v = momentum*v - eta*g; w = w + v); its
            buffer starts at zero for every client.
        batch_size: B; 0 means the client's whole data in one batch (B = infinity, FedSGD).
        local_epochs: E.
        prox_mu: FedProx's mu; 0 is plain local SGD.
    """

    def __init__(self, model, x_train, y_train, learning_rate, momentum, batch_size, local_epochs,
                 prox_mu=0.0):
        if len(model.weights) != len(model.trainable_variables):
            raise ValueError("LocalTrainer needs a model whose weights are all trainable")
        self.model = model
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.batch_size = int(batch_size)
        self.local_epochs = int(local_epochs)
        self.prox_mu = float(prox_mu)
        self.x_train = tf.convert_to_tensor(x_train, tf.float32)
        self.y_train = tf.convert_to_tensor(y_train, tf.int32)
        self._velocities = [tf.Variable(tf.zeros_like(variable), trainable=False)
                            for variable in model.trainable_variables]
        weight_specs = [tf.TensorSpec(variable.shape, variable.dtype)
                        for variable in model.trainable_variables]
        self._no_correction = [tf.zeros([1, *variable.shape], variable.dtype)
                               for variable in model.trainable_variables]
        stacked_specs = [tf.TensorSpec([None, *spec.shape], spec.dtype) for spec in weight_specs]
        self._train_clients = tf.function(self._train_clients_steps, input_signature=[
            weight_specs, tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([], tf.int32), stacked_specs, tf.TensorSpec([None], tf.int64)])

    @classmethod
    def for_clients(cls, model, x_train, y_train, settings):
        """The clients' trainer from ClientSettings (FedProx's term only with fedprox)."""
        return cls(model, x_train, y_train, settings.learning_rate, settings.local_momentum,
                   settings.batch_size, settings.local_epochs,
                   settings.prox_mu if settings.algorithm == "fedprox" else 0.0)

    @classmethod
    def for_baseline(cls, model, x_train, y_train, settings):
        """The centralized baseline's trainer: the clients' optimizer and batch (ClientSettings),
        one pass of its stream per call, no proximal term."""
        return cls(model, x_train, y_train, settings.learning_rate, settings.local_momentum,
                   settings.batch_size, 1)

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

    def train(self, global_weights, client_indices, rng, correction=None):
        """Train one client (ClientUpdate of FedAvg): `train_many` of one."""
        (update,) = self.train_many(global_weights, [client_indices], [rng],
                                    None if correction is None else [correction])
        return update

    def train_many(self, global_weights, clients_indices, rngs, corrections=None):
        """Train several clients (ClientUpdate of FedAvg) in one compiled call.

        Each client starts from the global weights with its own dropout seed, shuffles and
        correction, exactly as if trained alone (bit for bit: the same ops on the same values,
        one client after another inside the call); what is saved is the Python and call
        overhead per client, which dominates for clients of a few samples.

        Args:
            global_weights: list of the global model's layer arrays.
            clients_indices: one int array of training-set rows per client.
            rngs: one np.random.Generator per client: it draws the client's dropout seed, then
                its per-epoch shuffles.
            corrections: one SCAFFOLD correction c - c_i (layer arrays) per client, added to
                every gradient, or None.
        Returns:
            list of LocalResult (float32 layer arrays, n, the number of steps, and the
            sample-weighted mean training loss of the last local epoch, what `fit` reports), in
            the clients' order.
        """
        seeds = [int(rng.integers(2**31)) for rng in rngs]
        orders = [self.epoch_orders(indices, rng) for indices, rng in zip(clients_indices, rngs)]
        return [LocalResult(weights, len(indices),
                             upload_format.num_local_steps(len(indices), self.batch_size,
                                                           self.local_epochs), loss)
                for (weights, loss), indices in zip(
                    self.train_orders(global_weights, orders, seeds, corrections),
                    clients_indices)]

    def train_orders(self, start_weights, orders, seeds, corrections=None):
        """The one compiled training call: each client from `start_weights` over its order.

        Args:
            start_weights: list of layer arrays every client starts from.
            orders: one int array (E, n) of training-set rows per client, epoch by epoch.
            seeds: one dropout seed per client, or None for a client that continues the
                model's dropout state (the centralized baseline's stream).
            corrections: one SCAFFOLD correction per client, or None.
        Returns:
            list of (new float32 layer arrays, last-epoch mean loss), in the clients' order.
        """
        sizes = [order.shape[1] for order in orders]
        stacked = (self._no_correction if corrections is None
                   else [np.stack(layers).astype(np.float32) for layers in zip(*corrections)])
        new_weights, losses = self._train_clients(
            [tf.convert_to_tensor(layer, tf.float32) for layer in start_weights],
            np.concatenate([np.ravel(order) for order in orders]).astype(np.int32),
            np.asarray(sizes, np.int32),
            tf.constant(self.batch_size, tf.int32), stacked,  # B = 0: each client's size
            np.asarray([KEEP_DROPOUT_STATE if seed is None else seed for seed in seeds],
                       np.int64))
        new_weights, losses = [layer.numpy() for layer in new_weights], losses.numpy()
        return [([layer[position] for layer in new_weights], float(losses[position]))
                for position in range(len(sizes))]

    def loss_and_gradients(self, images, labels, anchor):
        """Return (cross-entropy, gradients of the local objective) at the current weights.

        The objective is the mean cross-entropy, plus (mu/2) * ||w - anchor||^2 for FedProx;
        the loss returned is the cross-entropy alone, comparable across algorithms.
        """
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            probabilities = self.model(images, training=True)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(labels, probabilities))
            objective = loss
            if self.prox_mu:
                objective += self.prox_mu / 2 * tf.add_n([
                    tf.reduce_sum(tf.square(variable - start))
                    for variable, start in zip(variables, anchor)])
        return loss, tape.gradient(objective, variables)

    def _train_steps(self, global_weights, orders, batch_size, correction):
        """One client, inside the compiled call: load the start weights, then SGD over
        `orders` (E, n) batch by batch."""
        variables = self.model.trainable_variables
        for variable, value in zip(variables, global_weights):
            variable.assign(value)
        for velocity in self._velocities:
            velocity.assign(tf.zeros_like(velocity))
        num_examples = tf.shape(orders)[1]
        num_steps = (num_examples + batch_size - 1) // batch_size
        epoch_loss = tf.constant(0.0)
        for epoch in tf.range(tf.shape(orders)[0]):
            epoch_loss = tf.constant(0.0)
            for step in tf.range(num_steps):
                start = step * batch_size
                batch = orders[epoch, start:tf.minimum(start + batch_size, num_examples)]
                batch_loss = self._sgd_step(tf.gather(self.x_train, batch),
                                            tf.gather(self.y_train, batch),
                                            global_weights, correction)
                epoch_loss += batch_loss * tf.cast(tf.shape(batch)[0], tf.float32)
        return ([tf.identity(variable) for variable in variables],
                epoch_loss / tf.cast(num_examples, tf.float32))

    def _train_clients_steps(self, global_weights, flat_orders, sizes, batch_size, corrections,
                             seeds):
        """Compiled body of `train_orders`: `_train_steps` for each client in turn.

        flat_orders holds every client's (E, n) order, raveled and concatenated; corrections
        has one row per client, or a single row shared by all (zeros: no correction); a seed
        of KEEP_DROPOUT_STATE leaves the dropout state as it is.
        """
        num_clients = tf.shape(sizes)[0]
        weights = [tf.TensorArray(tf.float32, size=num_clients, element_shape=variable.shape)
                   for variable in self.model.trainable_variables]
        losses = tf.TensorArray(tf.float32, size=num_clients)
        offset = tf.constant(0)
        for position in tf.range(num_clients):
            size = sizes[position]
            # A full batch (B = 0) is the client's own size.
            client_batch = size if self.batch_size == 0 else batch_size
            orders = tf.reshape(flat_orders[offset:offset + self.local_epochs * size],
                                [self.local_epochs, size])
            offset += self.local_epochs * size
            if seeds[position] != KEEP_DROPOUT_STATE:
                # Keras keeps dropout's random state as [seed, counter] variables.
                for variable in self.model.non_trainable_variables:
                    variable.assign(tf.cast(tf.stack([seeds[position], 0]), variable.dtype))
            row = tf.minimum(position, tf.shape(corrections[0])[0] - 1)
            new_weights, loss = self._train_steps(
                global_weights, orders, client_batch, [stack[row] for stack in corrections])
            weights = [array.write(position, layer) for array, layer in zip(weights, new_weights)]
            losses = losses.write(position, loss)
        return [array.stack() for array in weights], losses.stack()

    def _sgd_step(self, images, labels, anchor, correction):
        """One minibatch step of SGD on the local objective; returns the batch's cross-entropy."""
        loss, gradients = self.loss_and_gradients(images, labels, anchor)
        for variable, gradient, shift, velocity in zip(self.model.trainable_variables, gradients,
                                                       correction, self._velocities):
            gradient = gradient + shift
            if self.momentum:
                velocity.assign(self.momentum * velocity - self.learning_rate * gradient)
                variable.assign_add(velocity)
            else:
                variable.assign_sub(self.learning_rate * gradient)
        return loss


def client_deltas(client_weights, global_weights):
    """Return each client's update y_i - x as float64 layer arrays."""
    return [[np.float64(new) - np.float64(start) for new, start in zip(weights, global_weights)]
            for weights in client_weights]


# Clients trained in one compiled call: bounds the stacked results (K x 35k floats each).
CLIENTS_PER_CALL = 256


def client_upload(settings, client, round_num, global_weights, update, memory,
                  server_variate=None, malicious=False):
    """A client's round after its local training: from its LocalResult to its upload.

    It renews its SCAFFOLD variate when it keeps one, forms its update y_i - x, forges it if it
    is a malicious client, then clips and encodes it (with top-k's error feedback). Every
    random draw is keyed by (SEED, round, client).

    Args:
        settings: ClientSettings.
        update: the LocalResult of its local training from `global_weights` (with SCAFFOLD's
            `scaffold_correction` when it keeps a variate).
        memory: dict of ClientMemory by `kept_state_names`, read only: the new state is
            returned, to be kept only if the server accepts the upload (ClientHost.settle).
        server_variate: SCAFFOLD's c (layer arrays), else None.
    Returns:
        (Upload, {state name: the client's new arrays}).
    """
    seed, variates, kept = settings.seed, memory.get("variate"), {}
    variate_delta = None
    if variates:
        own_variate = variates.get(client)
        kept["variate"] = client_state.scaffold_client_variate(
            own_variate, server_variate, global_weights, update.new_weights,
            upload_format.effective_steps(update.num_steps, settings.local_momentum),
            settings.learning_rate)
        variate_delta = [new - old for new, old in zip(kept["variate"], own_variate)]
    (delta,) = client_deltas([update.new_weights], global_weights)
    if malicious and settings.attack != "label_flip":
        delta = attacks.attack_update(delta, settings.attack, settings.attack_scale,
                                      Utils.rng(seed, "attack", round_num, client))
    residuals = memory.get("residual")
    encoded, residual = prepare_upload(
        delta, residuals.get(client) if residuals else None, settings.compression,
        Utils.rng(seed, "compression", round_num, client), settings.dp_clip_norm,
        settings.topk_fraction, settings.stochastic_rounding)
    if residuals:
        kept["residual"] = residual
    return upload_format.Upload(int(client), int(round_num), encoded, update.num_examples,
                                update.num_steps, update.train_loss, variate_delta), kept


class ClientHost:
    """The clients one process hosts: the training set, reusable trainers and kept state.

    `python Main.py` hosts all K clients in one; on Flower every SuperNode hosts its share.
    A client's kept state (SCAFFOLD's c_i, top-k's residual) follows the server: what a round
    produces waits in `pending` until the server says which uploads it accepted (`settle`),
    so a rejected or lost upload leaves the client's state as it was, as if it had not trained.

    Args:
        settings: ClientSettings.
        model: a Keras model of the global architecture (its weights are overwritten).
        x_train, y_train: the whole training set; client_indices: every client's rows.
    """

    def __init__(self, settings, model, x_train, y_train, client_indices):
        self.settings, self.client_indices = settings, client_indices
        x_train = tf.convert_to_tensor(x_train)  # One copy, shared by both trainers.
        self.trainer = LocalTrainer.for_clients(model, x_train, y_train, settings)
        self.malicious = attacks.malicious_clients(settings.num_clients,
                                                   settings.malicious_fraction, settings.seed)
        # Label-flipping attackers train the same model on labels 9 - y.
        self.flipped_trainer = (
            LocalTrainer.for_clients(model, x_train, 9 - np.asarray(y_train), settings)
            if self.malicious and settings.attack == "label_flip" else None)
        self.shapes = [variable.shape for variable in model.trainable_variables]
        self.memory = {name: client_state.ClientMemory(self.shapes)
                       for name in client_state.kept_state_names(settings.algorithm,
                                                                 settings.compression)}
        self.pending, self.pending_round = self._no_pending(), None

    def train(self, round_num, clients, global_weights, server_variate=None):
        """Train `clients` for the round and return their Uploads in that order.

        Clients that share a trainer are trained CLIENTS_PER_CALL at a time in one compiled
        call (`LocalTrainer.train_many`), each exactly as if trained alone.
        """
        clients = [int(client) for client in clients]
        updates = {}
        for trainer, group in self._groups_by_trainer(clients):
            for first in range(0, len(group), CLIENTS_PER_CALL):
                chunk = group[first:first + CLIENTS_PER_CALL]
                corrections = [
                    client_state.scaffold_correction(self.memory, client, server_variate)
                    for client in chunk]
                chunk_updates = trainer.train_many(
                    global_weights, [self.client_indices[client] for client in chunk],
                    [Utils.rng(self.settings.seed, "training", round_num, client)
                     for client in chunk],
                    None if corrections[0] is None else corrections)
                updates.update(zip(chunk, chunk_updates))
        self.settle(None, ())  # State the server never settled is dropped.
        uploads = []
        for client in clients:
            upload, kept = client_upload(self.settings, client, round_num, global_weights,
                                         updates[client], self.memory, server_variate,
                                         client in self.malicious)
            for name, arrays in kept.items():
                self.pending[name].put(client, arrays)
            uploads.append(upload)
        self.pending_round = round_num
        return uploads

    def settle(self, round_num, accepted_clients):
        """Keep the new state of the clients whose upload of `round_num` the server accepted;
        drop every other pending state."""
        if round_num is not None and round_num == self.pending_round:
            for name, pending in self.pending.items():
                for client in accepted_clients:
                    if client in pending:
                        self.memory[name].put(client, pending.get(client))
        self.pending, self.pending_round = self._no_pending(), None

    def _no_pending(self):
        return {name: client_state.ClientMemory(self.shapes) for name in self.memory}

    def _groups_by_trainer(self, clients):
        """Split clients into (trainer, clients): label-flipping attackers use their own."""
        flipped = [client for client in clients
                   if self.flipped_trainer and client in self.malicious]
        honest = [client for client in clients if client not in flipped]
        return [(trainer, group) for trainer, group in ((self.trainer, honest),
                                                         (self.flipped_trainer, flipped))
                if group]


def prepare_upload(delta, residual, compression, rng, clip_norm=0.0, topk_fraction=0.01,
                   stochastic_rounding=False):
    """Clip, add the error-feedback residual, and encode an update; return what is sent.

    With DP (clip_norm > 0) the update is clipped to S, and then what is actually sent is
    clipped again: adding a top-k residual, or int8's rounding, could otherwise upload more
    than S while the server's noise assumes S. Whatever that last clip removes stays in the
    residual, as does everything top-k leaves out.

    Args:
        delta: the client's update y_i - x, a list of layer arrays.
        residual: its kept top-k residual (list of arrays), or None without top-k.
        compression, topk_fraction, stochastic_rounding: see `upload_format.encode_update`; rng
            draws its
            random rounding.
    Returns:
        (encoded update, the new residual or None).
    """
    if clip_norm > 0:
        delta = upload_format.clip_update(delta, clip_norm)
    if residual is not None:
        delta = [np.float64(layer) + carried for layer, carried in zip(delta, residual)]
    encoded = upload_format.encode_update(delta, compression, rng, topk_fraction,
                                          stochastic_rounding)
    if clip_norm == 0 and residual is None:
        return encoded, None
    shapes = [np.shape(layer) for layer in delta]
    sent = upload_format.decode_update(encoded, shapes)
    factor = _shrink_factor(sent, clip_norm) if clip_norm > 0 else 1.0
    if factor < 1:
        encoded = upload_format.scale_encoded(encoded, factor)
        sent = upload_format.decode_update(encoded, shapes)
    if residual is None:
        return encoded, None
    return encoded, [layer - layer_sent for layer, layer_sent in zip(delta, sent)]


def _shrink_factor(delta, clip_norm):
    """Return the factor <= 1 that brings `delta` within norm `clip_norm` after float32 storage.

    It shrinks by a hair (2**-20) more than needed: float32 rounding of the scaled values
    (relative error 2**-24) can then not push the norm back above the bound.
    """
    norm = upload_format.update_norm(delta)
    return 1.0 if norm <= clip_norm else clip_norm / norm * (1 - 2.0 ** -20)


