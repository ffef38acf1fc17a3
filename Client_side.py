"""The clients: retrain a copy of the global model on one client's data (ClientUpdate of FedAvg).

A client starts from the global weights, runs E epochs of minibatch SGD (batch B, learning rate
eta, optional momentum with a fresh buffer) over its own samples in a new random order each epoch,
and returns its update, its number of samples, its number of steps and its training loss.
Two local variants change the step: FedProx (Li et al. 2020) adds (mu/2)||w - w_global||^2 to the
loss; SCAFFOLD (Karimireddy et al. 2020) adds the correction c - c_i to every gradient and keeps
its control variate c_i across rounds (option II update).

The clients' round around this training (uploads, kept state, evaluation) is client_host.py.

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
    mean cross-entropy of its last epoch; companion: see LocalTrainer's `step`.
    """

    new_weights: list
    num_examples: int
    num_steps: int
    train_loss: float
    companion: list = None  # the second weight set a local step rule trains beside (APFL's v)


@dataclasses.dataclass(frozen=True)
class ClientSettings(Utils.Settings):
    """The constants the clients read, by name; built from the constants at the edge."""

    seed: int
    algorithm: str
    learning_rate: float
    local_momentum: float
    batch_size: int
    local_epochs: int
    compression: str
    topk_fraction: float
    stochastic_rounding: bool
    dp_clip_norm: float
    num_clients: int
    malicious_fraction: float
    attack: str
    attack_scale: float
    personalization: str
    model: str
    secure_aggregation: str
    options: dict  # the plug-ins' and secure aggregation's constants by name


# A dropout seed that tells the compiled call to continue the model's dropout state.
KEEP_DROPOUT_STATE = -1
# A client's step limit when it runs all its epochs (far above any E * ceil(n / B)).
NO_STEP_LIMIT = 2**30


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
        prox_mu: mu of the proximal term (mu/2)||w - anchor||^2 (FedProx, Ditto); 0 is plain
            local SGD.
        frozen: indices of the layer arrays that keep their start values (FedRep's phases).
        contrastive: (mu, temperature) of a model-contrastive term on the representation the
            head reads (MOON), or None.
        step: a local step rule of a personalization plug-in (`Method.local_step`), or None for
            SGD on the local objective. It declares COMPANION (each client also trains a second
            weight set of the model's shapes in the same steps, `self.companion`: APFL's
            personal model) and gives `gradients(trainer, images, labels, anchor, reference)`
            -> (cross-entropy, the model's gradients, the companion's or None), all taken
            before either moves; the trainer then steps both with its optimizer.
    """

    def __init__(self, model, x_train, y_train, learning_rate, momentum, batch_size, local_epochs,
                 prox_mu=0.0, frozen=(), contrastive=None, step=None):
        if len(model.weights) != len(model.trainable_variables):
            raise ValueError("LocalTrainer needs a model whose weights are all trainable")
        self.model = model
        self.learning_rate = float(learning_rate)
        self.momentum = float(momentum)
        self.batch_size = int(batch_size)
        self.local_epochs = int(local_epochs)
        self.prox_mu = float(prox_mu)
        self.frozen = frozenset(frozen)
        self.contrastive = contrastive
        if contrastive:
            # The representation the head reads, with the probabilities in one forward pass,
            # and alone for other weights (the global and the previous model's body).
            head = model.layers[-1]
            self._dual = keras.Model(model.inputs, [head.input, model.outputs[0]])
            self._body = keras.Model(model.inputs, head.input)
            self._body_arrays = len(model.trainable_variables) - len(head.trainable_variables)
        self.x_train = tf.convert_to_tensor(x_train, tf.float32)
        self.y_train = tf.convert_to_tensor(y_train, tf.int32)
        self.step = step
        self._velocities = _zeros_like(model.trainable_variables)
        self.companion = _zeros_like(model.trainable_variables) if step and step.COMPANION else []
        self._companion_velocities = _zeros_like(self.companion)
        weight_specs = [tf.TensorSpec(variable.shape, variable.dtype)
                        for variable in model.trainable_variables]
        self._no_correction = [tf.zeros([1, *variable.shape], variable.dtype)
                               for variable in model.trainable_variables]
        stacked_specs = [tf.TensorSpec([None, *spec.shape], spec.dtype) for spec in weight_specs]
        self._train_clients = tf.function(self._train_clients_steps, input_signature=[
            stacked_specs, stacked_specs, tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32), stacked_specs,
            tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int32), stacked_specs,
            stacked_specs])

    @classmethod
    def for_clients(cls, model, x_train, y_train, settings, epochs=None, prox_mu=0.0,
                    frozen=(), contrastive=None, step=None, learning_rate=None):
        """A clients' trainer from ClientSettings: by default E epochs (LOCAL_EPOCHS) at
        LEARNING_RATE; the algorithm sets mu (FedProx's term) and the contrastive term,
        personalization's trainers change epochs, mu, the frozen layers, the learning rate
        and the step rule."""
        return cls(model, x_train, y_train, learning_rate or settings.learning_rate,
                   settings.local_momentum, settings.batch_size, epochs or settings.local_epochs,
                   prox_mu, frozen, contrastive, step)

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

    def train_many(self, global_weights, clients_indices, rngs, corrections=None, starts=None,
                   anchors=None, max_steps=None, references=None, companions=None):
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
            starts, anchors, max_steps, references, companions: see `train_orders`.
        Returns:
            list of LocalResult (float32 layer arrays, n, the number of steps, the
            sample-weighted mean training loss of the last local epoch, what `fit` reports, and
            the trained companion), in the clients' order.
        """
        seeds = [int(rng.integers(2**31)) for rng in rngs]
        orders = [self.epoch_orders(indices, rng) for indices, rng in zip(clients_indices, rngs)]
        limits = max_steps or [NO_STEP_LIMIT] * len(clients_indices)
        return [LocalResult(weights, len(indices),
                             min(limit, upload_format.num_local_steps(
                                 len(indices), self.batch_size, self.local_epochs)), loss,
                             companion)
                for (weights, loss, companion), indices, limit in zip(
                    self.train_orders(global_weights, orders, seeds, corrections, starts,
                                      anchors, max_steps, references, companions),
                    clients_indices, limits)]

    def train_orders(self, start_weights, orders, seeds, corrections=None, starts=None,
                     anchors=None, max_steps=None, references=None, companions=None):
        """The one compiled training call: each client from `start_weights` over its order.

        Args:
            start_weights: list of layer arrays every client starts from.
            orders: one int array (E, n) of training-set rows per client, epoch by epoch.
            seeds: one dropout seed per client, or None for a client that continues the
                model's dropout state (the centralized baseline's stream).
            corrections: one SCAFFOLD correction per client, or None.
            starts: one list of layer arrays per client to start from instead (personal
                models), or None.
            anchors: one list of layer arrays per client for the proximal term (Ditto's
                w_global), or None: each client's start.
            max_steps: the SGD steps each client may take at most (a straggler's partial work,
                in epoch order), or None: all its epochs.
            references: one list of layer arrays per client whose representation the
                contrastive term pushes away from (MOON's previous local model), or None.
            companions: one list of layer arrays per client where its companion starts (with
                a step rule that trains one), or None: each client's start.
        Returns:
            list of (new float32 layer arrays, mean loss of the last epoch it started, the
            trained companion or None), in the clients' order.
        """
        sizes = [order.shape[1] for order in orders]
        stacked = (self._no_correction if corrections is None else _stacked(corrections))
        start_rows = _stacked([start_weights] if starts is None else starts)
        new_weights, new_companions, losses = self._train_clients(
            start_rows, start_rows if anchors is None else _stacked(anchors),
            np.concatenate([np.ravel(order) for order in orders]).astype(np.int32),
            np.asarray(sizes, np.int32),
            tf.constant(self.batch_size, tf.int32), stacked,  # B = 0: each client's size
            np.asarray([KEEP_DROPOUT_STATE if seed is None else seed for seed in seeds],
                       np.int64),
            np.asarray(max_steps or [NO_STEP_LIMIT] * len(sizes), np.int32),
            start_rows if references is None else _stacked(references),
            start_rows if companions is None else _stacked(companions))
        new_weights, losses = [layer.numpy() for layer in new_weights], losses.numpy()
        new_companions = [layer.numpy() for layer in new_companions]
        return [([layer[position] for layer in new_weights], float(losses[position]),
                 [layer[position] for layer in new_companions] if self.companion else None)
                for position in range(len(sizes))]

    def loss_and_gradients(self, images, labels, anchor, reference=None, terms=True):
        """Return (cross-entropy, gradients of the local objective) at the current weights.

        The objective is the mean cross-entropy, plus (mu/2) * ||w - anchor||^2 for FedProx,
        plus MOON's contrastive term (with `terms`; else the cross-entropy alone); the loss
        returned is the cross-entropy alone, comparable across algorithms.
        """
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            if self.contrastive:
                representation, probabilities = self._dual(images, training=True)
            else:
                probabilities = self.model(images, training=True)
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(labels, probabilities))
            objective = loss
            if self.prox_mu and terms:
                objective += self.prox_mu / 2 * tf.add_n([
                    tf.reduce_sum(tf.square(variable - start))
                    for variable, start in zip(variables, anchor)])
            if self.contrastive and terms:
                objective += self.contrastive[0] * self.contrastive_loss(
                    images, representation, anchor, reference)
        return loss, tape.gradient(objective, variables)

    def gradients_at(self, weights, images, labels, anchor, reference=None, terms=True):
        """`loss_and_gradients` at other weights (tensors of the model's shapes, for a step
        rule); the model's own weights are put back."""
        variables = self.model.trainable_variables
        saved = [tf.identity(variable) for variable in variables]
        for variable, value in zip(variables, weights):
            variable.assign(value)
        loss, gradients = self.loss_and_gradients(images, labels, anchor, reference, terms)
        for variable, value in zip(variables, saved):
            variable.assign(value)
        return loss, gradients

    def contrastive_loss(self, images, representation, positive, negative):
        """MOON's l_con: -log(e^(sim(z, z_glob)/t) / (e^(sim(z, z_glob)/t) + e^(sim(z, z_prev)/t)))
        with cosine similarity, averaged over the batch; z_glob and z_prev are the
        representations under the global (`positive`) and previous (`negative`) weights."""
        temperature = self.contrastive[1]
        similarities = [
            -keras.losses.cosine_similarity(representation, self.representation(weights, images))
            / temperature for weights in (positive, negative)]
        return tf.reduce_mean(tf.nn.softplus(similarities[1] - similarities[0]))

    def representation(self, weights, images):
        """The body's output for `weights` (a whole model's arrays), without dropout."""
        values = [tf.convert_to_tensor(array) for array in weights[:self._body_arrays]]
        state = [variable.value for variable in self._body.non_trainable_variables]
        return self._body.stateless_call(values, state, images, training=False)[0]

    def _train_steps(self, start, anchor, orders, batch_size, correction, max_steps,
                     reference, companion):
        """One client, inside the compiled call: load the start weights (and the companion's),
        then SGD over `orders` (E, n) batch by batch, for at most `max_steps` steps."""
        variables = self.model.trainable_variables
        for variable, value in zip(variables + self.companion, start + companion[:len(
                self.companion)]):
            variable.assign(value)
        for velocity in self._velocities + self._companion_velocities:
            velocity.assign(tf.zeros_like(velocity))
        num_examples = tf.shape(orders)[1]
        num_steps = (num_examples + batch_size - 1) // batch_size
        epoch_loss, epoch_samples = tf.constant(0.0), num_examples
        for epoch in tf.range(tf.minimum(tf.shape(orders)[0],
                                         (max_steps + num_steps - 1) // num_steps)):
            epoch_loss = tf.constant(0.0)
            epoch_steps = tf.minimum(num_steps, max_steps - epoch * num_steps)
            epoch_samples = tf.minimum(num_examples, epoch_steps * batch_size)
            for step in tf.range(epoch_steps):
                start = step * batch_size
                batch = orders[epoch, start:tf.minimum(start + batch_size, num_examples)]
                batch_loss = self._sgd_step(tf.gather(self.x_train, batch),
                                            tf.gather(self.y_train, batch),
                                            anchor, correction, reference)
                epoch_loss += batch_loss * tf.cast(tf.shape(batch)[0], tf.float32)
        return ([tf.identity(variable) for variable in variables],
                [tf.identity(variable) for variable in self.companion],
                epoch_loss / tf.cast(epoch_samples, tf.float32))

    def _train_clients_steps(self, starts, anchors, flat_orders, sizes, batch_size,
                             corrections, seeds, max_steps, references, companions):
        """Compiled body of `train_orders`: `_train_steps` for each client in turn.

        flat_orders holds every client's (E, n) order, raveled and concatenated; starts,
        anchors and corrections have one row per client, or a single row shared by all
        (corrections of zeros: none); a seed of KEEP_DROPOUT_STATE leaves the dropout state as
        it is.
        """
        num_clients = tf.shape(sizes)[0]
        weights, trained_companions = (
            [tf.TensorArray(tf.float32, size=num_clients, element_shape=variable.shape)
             for variable in variables]
            for variables in (self.model.trainable_variables, self.companion))
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
            new_weights, new_companion, loss = self._train_steps(
                _row(starts, position), _row(anchors, position), orders, client_batch,
                _row(corrections, position), max_steps[position], _row(references, position),
                _row(companions, position))
            weights = [array.write(position, layer) for array, layer in zip(weights, new_weights)]
            trained_companions = [array.write(position, layer) for array, layer
                                  in zip(trained_companions, new_companion)]
            losses = losses.write(position, loss)
        return ([array.stack() for array in weights],
                [array.stack() for array in trained_companions], losses.stack())

    def _sgd_step(self, images, labels, anchor, correction, reference):
        """One minibatch step of SGD on the local objective (or the step rule's); returns the
        batch's cross-entropy."""
        if self.step is None:
            loss, gradients = self.loss_and_gradients(images, labels, anchor, reference)
            companion_gradients = None
        else:
            loss, gradients, companion_gradients = self.step.gradients(self, images, labels,
                                                                       anchor, reference)
        self._descend(self.model.trainable_variables, gradients, correction, self._velocities,
                      self.frozen)
        if companion_gradients is not None:
            self._descend(self.companion, companion_gradients, [0.0] * len(self.companion),
                          self._companion_velocities, ())
        return loss

    def _descend(self, variables, gradients, shifts, velocities, frozen):
        """SGD (with momentum) along gradient + shift for each variable not frozen."""
        for index, (variable, gradient, shift, velocity) in enumerate(zip(
                variables, gradients, shifts, velocities)):
            if index in frozen:
                continue
            gradient = gradient + shift
            if self.momentum:
                velocity.assign(self.momentum * velocity - self.learning_rate * gradient)
                variable.assign_add(velocity)
            else:
                variable.assign_sub(self.learning_rate * gradient)


def _stacked(per_client):
    """One float32 array per layer, stacking the clients' arrays (a row per client)."""
    return [np.stack(layers).astype(np.float32) for layers in zip(*per_client)]


def _zeros_like(variables):
    """Non-trainable float variables of the same shapes, at zero."""
    return [tf.Variable(tf.zeros_like(variable), trainable=False) for variable in variables]


def _row(stacks, position):
    """The client's row of stacked layer arrays, or the single row they all share."""
    row = tf.minimum(position, tf.shape(stacks[0])[0] - 1)
    return [stack[row] for stack in stacks]
