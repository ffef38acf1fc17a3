"""The clients one process hosts: a round from the global weights to their uploads.

`ClientHost.train` is a round for the clients a process hosts, from the global weights to the
encoded uploads: both engines (`python Main.py` in one process, the Flower ClientApp on a
SuperNode) call it, and every random draw in it is keyed by (SEED, round, client), so a client's
upload does not depend on which process trains it, in what order or beside which clients.
Each client trains as its personalization method says (personalization.py, with
Client_side.LocalTrainer), forms its update, and clips and encodes it (`client_upload`); what it
keeps between rounds follows the server (`ClientHost.settle`). `ClientHost.evaluate` scores the
global model and each client's own model on its local test data (client_evaluation.py).
"""

import dataclasses

import numpy as np
import tensorflow as tf

import algorithms
import attacks
import client_evaluation
import client_state
import personalization
import secure_aggregation
import Utils
import upload_format
import Client_side


def client_deltas(client_weights, global_weights):
    """Return each client's update y_i - x as float64 layer arrays."""
    return [[np.float64(new) - np.float64(start) for new, start in zip(weights, global_weights)]
            for weights in client_weights]


# Clients trained in one compiled call: bounds the stacked results (K x 35k floats each).
CLIENTS_PER_CALL = 256


def client_upload(settings, algorithm, client, round_num, global_weights, update, memory,
                  received=None, malicious=False):
    """A client's round after its local training: from its LocalResult to its upload.

    Its algorithm renews the state it keeps and names what it uploads besides; the client forms
    its update y_i - x, forges it if it is a malicious client, then clips and encodes it (with
    top-k's error feedback). Every random draw is keyed by (SEED, round, client).

    Args:
        settings: ClientSettings; algorithm: the run's algorithms.Algorithm (client side).
        update: the LocalResult of its local training from `global_weights` (with the
            algorithm's correction).
        memory: dict of ClientMemory by `kept_state_names`, read only: the new state is
            returned, to be kept only if the server accepts the upload (ClientHost.settle).
        received: what the server sent with the weights, {name: arrays} (SCAFFOLD's c).
    Returns:
        (Upload, {state name: the client's new arrays}).
    """
    seed = settings.seed
    kept, extras = algorithm.after_training(
        {name: memory[name].get(client) for name in algorithm.CLIENT_STATE}, received or {},
        global_weights, update)
    (delta,) = client_deltas([update.new_weights], global_weights)
    if malicious and settings.attack != "label_flip":
        delta = attacks.attack_update(delta, settings.attack, settings.attack_scale,
                                      Utils.rng(seed, "attack", round_num, client))
    train_loss = update.train_loss
    if secure_aggregation.is_on(settings):
        encoded, train_loss = secure_contribution(
            settings, algorithm.summand(delta, update, extras), update, round_num, client,
            algorithm.sum_weight(update.num_examples))
        extras = {}  # They travel in the sum.
    else:
        residuals = memory.get("residual")
        encoded, residual = prepare_upload(
            delta, residuals.get(client) if residuals else None, settings.compression,
            Utils.rng(seed, "compression", round_num, client), settings.dp_clip_norm,
            settings.topk_fraction, settings.stochastic_rounding)
        if residuals:
            kept["residual"] = residual
    return upload_format.Upload(int(client), int(round_num), encoded, update.num_examples,
                                update.num_steps, train_loss, extras), kept


def secure_contribution(settings, delta, update, round_num, client, weight=None):
    """(The client's contribution to the secure sum, the training loss it reports).

    `delta` is its algorithm's summand, `weight` its weight there (None: its samples). Under
    DP it clips its update first (the server cannot), to S less what the rounding can add, and
    its weight is 1. A client whose update is not finite contributes nothing and reports a
    loss of NaN, which the server refuses as a diverged client's."""
    if not all(np.all(np.isfinite(layer)) for layer in delta):
        delta, loss = [np.zeros(np.shape(layer)) for layer in delta], float("nan")
    else:
        loss = update.train_loss
    if settings.dp_clip_norm > 0:
        delta = upload_format.clip_update(delta, settings.dp_clip_norm - (
            secure_aggregation.rounding_margin(settings.options, [np.shape(layer)
                                                                  for layer in delta])))
    weight = 1 if settings.dp_clip_norm > 0 else (
        update.num_examples if weight is None else weight)
    return secure_aggregation.contribution(
        delta, weight, settings.options,
        Utils.rng(settings.seed, "secagg", round_num, client)), loss


class ClientHost:
    """The clients one process hosts: the training set, reusable trainers and kept state.

    `python Main.py` hosts all K clients in one; on Flower every SuperNode hosts its share.
    A client's kept state (SCAFFOLD's c_i, top-k's residual, its own model part under
    personalization) follows the server: what a round produces waits in `pending` until the
    server says which uploads it accepted (`settle`), so a rejected or lost upload leaves the
    client's state as it was, as if it had not trained.

    Args:
        settings: ClientSettings.
        model: a Keras model of the global architecture (its weights are overwritten).
        x_train, y_train: the whole training set; client_indices: every client's training rows;
        test_indices: every client's local test rows (None: none).
    """

    def __init__(self, settings, model, x_train, y_train, client_indices, test_indices=None):
        self.settings, self.client_indices = settings, client_indices
        self.test_indices = test_indices
        x_train = tf.convert_to_tensor(x_train)  # One copy, shared by every trainer.
        self.shapes = [variable.shape for variable in model.trainable_variables]
        self.algorithm = algorithms.build(settings, self.shapes)
        self.method = personalization.build(settings, len(self.shapes))
        self.trainers = self._make_trainers(model, x_train, y_train)
        self.malicious = attacks.malicious_clients(settings.num_clients,
                                                   settings.malicious_fraction, settings.seed)
        # Label-flipping attackers make their global update on labels 9 - y; their own models
        # (FedRep's head phase, FedPer's head: "honest") and adaptations use the true labels.
        self.flipped_trainers = (
            {**self.trainers, **self._make_trainers(model, x_train, 9 - np.asarray(y_train),
                                                    only=("main",)),
             "honest": self.trainers["main"]}
            if self.malicious and settings.attack == "label_flip" else None)
        self.scorer = (client_evaluation.Scorer(model, x_train, y_train)
                       if test_indices is not None else None)
        self.own_layers = self.method.own_layers
        self.uploaded = self.method.uploaded_layers
        self.memory = {name: client_state.ClientMemory(self._state_shapes(name))
                       for name in client_state.kept_state_names(
                           type(self.algorithm), settings.compression, type(self.method))}
        self.pending, self.pending_round = self._no_pending(), None

    def _make_trainers(self, model, x_train, y_train, only=None):
        """The local trainer ("main") and the personalization method's own trainers."""
        recipes, frozen = self.method.trainer_recipes()
        make = Client_side.LocalTrainer.for_clients
        trainers = {"main": make(model, x_train, y_train, self.settings,
                                 prox_mu=self.algorithm.prox_mu(), frozen=frozen,
                                 contrastive=self.algorithm.contrastive(),
                                 step=self.method.local_step())}
        trainers.update({name: make(model, x_train, y_train, self.settings, **recipe)
                         for name, recipe in recipes.items() if only is None or name in only})
        return trainers

    @property
    def trainer(self):
        """The clients' local trainer."""
        return self.trainers["main"]

    def _state_shapes(self, name):
        """A kept state's layer shapes: its own layers, or top-k's residual of what it sends."""
        if name == "own":
            return [self.shapes[index] for index in self.own_layers]
        if name == "residual":
            return [self.shapes[index] for index in self.uploaded]
        return self.shapes

    def train(self, round_num, clients, global_weights, received=None, step_limits=None):
        """Train `clients` for the round and return their Uploads in that order.

        received: what the server sent with the weights, {name: arrays} (SCAFFOLD's c).

        step_limits: {client: at most this many local steps} for stragglers the server asked
        for partial work (devices.plan_round); the others run all their epochs.

        Clients that share a trainer are trained CLIENTS_PER_CALL at a time in one compiled
        call (`LocalTrainer.train_many`), each exactly as if trained alone.
        """
        clients = [int(client) for client in clients]
        updates, kept = {}, {}
        for trainers, group in self._groups_by_trainers(clients):
            for first in range(0, len(group), CLIENTS_PER_CALL):
                chunk = group[first:first + CLIENTS_PER_CALL]
                results, own = self.method.train_round(
                    trainers, global_weights, chunk,
                    [self.client_indices[client] for client in chunk], self.own_parts(chunk),
                    round_num, self._terms(chunk, global_weights, received or {}),
                    _limits(chunk, step_limits))
                updates.update(zip(chunk, results))
                kept.update(zip(chunk, own))
        self.settle(None, ())  # State the server never settled is dropped.
        uploads = []
        sent_global = [global_weights[index] for index in self.uploaded]
        for client in clients:
            update = updates[client]
            upload, new_state = client_upload(
                self.settings, self.algorithm, client, round_num, sent_global,
                dataclasses.replace(update, new_weights=[update.new_weights[index]
                                                         for index in self.uploaded]),
                self.memory, received, client in self.malicious)
            if kept[client] is not None:
                new_state["own"] = kept[client]
            for name, arrays in new_state.items():
                self.pending[name].put(client, arrays)
            uploads.append(upload)
        self.pending_round = round_num
        return uploads

    def _terms(self, clients, global_weights, received):
        """The algorithm's per-client terms of the local objective for LocalTrainer.train_many:
        gradient corrections (SCAFFOLD, FedDyn), contrastive references (MOON)."""
        kept = [{name: self.memory[name].get(client) for name in self.algorithm.CLIENT_STATE}
                for client in clients]
        terms = {"corrections": [self.algorithm.correction(state, received) for state in kept],
                 "references": [self.algorithm.reference(state, received, global_weights)
                                for state in kept]}
        return {name: values for name, values in terms.items() if values[0] is not None}

    def evaluate(self, round_num, clients, global_weights):
        """Score the global model and each client's own model on its local test rows.

        Clients without local test rows are left out. Returns:
            list of client_evaluation.ClientScore, in the clients' order.
        """
        clients = [int(client) for client in clients if len(self.test_indices[client])]
        scores = []
        for first in range(0, len(clients), CLIENTS_PER_CALL):
            chunk = clients[first:first + CLIENTS_PER_CALL]
            rows = [self.test_indices[client] for client in chunk]
            global_correct = self.scorer.count_correct([global_weights], rows)
            personal_correct = global_correct
            if self.method.PERSONAL:
                own_models = self.method.personal_models(
                    self.trainers, global_weights, chunk,
                    [self.client_indices[client] for client in chunk], self.own_parts(chunk),
                    round_num)
                personal_correct = self.scorer.count_correct(own_models, rows)
            scores += [client_evaluation.ClientScore(client, len(rows[position]),
                                                     int(global_correct[position]),
                                                     int(personal_correct[position]))
                       for position, client in enumerate(chunk)]
        return scores

    def own_parts(self, clients):
        """Each client's kept own arrays, or None for a client that has none yet."""
        own = self.memory.get("own")
        return [own.get(client) if own is not None and client in own else None
                for client in clients]

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
        return {name: client_state.ClientMemory(self._state_shapes(name))
                for name in self.memory}

    def _groups_by_trainers(self, clients):
        """Split clients into (trainers, clients): label-flipping attackers use their own."""
        flipped = [client for client in clients
                   if self.flipped_trainers and client in self.malicious]
        honest = [client for client in clients if client not in flipped]
        return [(trainers, group) for trainers, group in ((self.trainers, honest),
                                                           (self.flipped_trainers, flipped))
                if group]


def _limits(clients, step_limits):
    """The clients' step limits for LocalTrainer (None when none of them has one)."""
    if not step_limits or not any(client in step_limits for client in clients):
        return None
    return [step_limits.get(client, Client_side.NO_STEP_LIMIT) for client in clients]


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


