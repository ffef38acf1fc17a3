"""The federated algorithms a run can use (ALGORITHM): one module per method, found by its name.

Each module holds one subclass of `Algorithm` (its PLUGIN): what the method changes of FedAvg,
on the client (terms of the local objective, the state a client keeps, what it uploads
besides its update) and on the server (how accepted updates become the pseudo-gradient Delta
the server optimizer steps along, the server state it keeps and sends down). The framework
does the rest for every method alike: the compiled training step, checkpoints (state by
name), Flower's records and node state, keeping a client's state only when its upload was
accepted, traffic counts, and refusing combinations by the properties a method declares.
Adding a method is one new file here (and its constants in Main.py); nothing else names it.
"""

import pkgutil
import sys

import numpy as np

import constant_rules

NAMES = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)))
# Plain FedAvg: the algorithm of every run before ALGORITHM existed.
DEFAULT = "fedavg"


def weighted_mean(client_weights, num_examples):
    """Average client models (or updates) weighted by their number of training examples.

    Args:
        client_weights: one list of layer arrays per client, all with the same shapes.
        num_examples: one positive count per client.
    Returns:
        list of layer arrays: sum_k n_k * w_k / sum_k n_k, accumulated in float64 and returned in
        the clients' dtype.
    """
    if len(client_weights) == 0 or len(client_weights) != len(num_examples):
        raise ValueError("weighted_mean needs one example count per client and at least one client")
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
    return weighted_mean(updates, [1] * len(updates))


class Algorithm:
    """FedAvg's behaviour, which a method overrides where it differs.

    Declarations (class attributes):
        PAPER: where the method comes from.
        CONSTANTS: {constant name: rule (constant_rules)} of the Main.py constants it reads
            beyond the common ones; their values are in `settings.options`.
        CLIENT_STATE: names of the arrays (one per model layer) a client keeps between rounds.
        SERVER_STATE: names of the arrays (one per model layer) the server keeps.
        SENT: the SERVER_STATE names sent to clients with the global weights.
        UPLOADED: names of the arrays (one per model layer, float32, uncompressed) a client
            uploads besides its encoded update.
        PLAIN_UPDATES: its server step is the n-weighted mean of the plain updates, so a robust
            rule (AGGREGATION), DP-FedAvg's noisy mean or FedBuff's buffer may stand in for it.
        WHOLE_MODEL: its state or terms cover every layer, so it needs clients that upload the
            whole model (personalization that keeps a part refuses it).
        SUMMABLE: its server step needs only the weighted sum of its clients' `summand`s
            (weights `sum_weight`) and their sample and step counts (`from_secure_mean`), so
            SECURE_AGGREGATION, which reveals only that sum, can carry it (PLAIN_UPDATES
            implies it); its UPLOADED extras then travel in the sum, not beside it.
        NEEDS: {constant: (allowed values, why)}: what it needs of other options, refused
            before training in one line with the reason.

    Args:
        settings: the side's settings (Client_side.ClientSettings or Server_side.ServerSettings).
        shapes: the model's layer shapes.
    """

    PAPER = "McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from " \
            "Decentralized Data (Algorithm 1)"
    CONSTANTS = {}
    CLIENT_STATE = ()
    SERVER_STATE = ()
    SENT = ()
    UPLOADED = ()
    PLAIN_UPDATES = False
    WHOLE_MODEL = False
    SUMMABLE = False
    NEEDS = {}

    def __init__(self, settings, shapes):
        self.settings = settings
        self.shapes = [tuple(shape) for shape in shapes]
        self.state = {name: self.zeros() for name in self.SERVER_STATE}

    def zeros(self):
        """float32 zeros of the model's shapes: every state's value before anyone trained."""
        return [np.zeros(shape, np.float32) for shape in self.shapes]

    def option(self, name):
        """The value of one of its CONSTANTS in this run."""
        return self.settings.options[name]

    # --- The client side --------------------------------------------------------------------

    def prox_mu(self):
        """mu of a proximal term (mu/2)||w - w_global||^2 in every client's local objective."""
        return 0.0

    def correction(self, kept, received):
        """A per-client shift added to every local gradient, or None.

        kept: {CLIENT_STATE name: the client's arrays}; received: {SENT name: arrays}.
        """
        return None

    def contrastive(self):
        """(mu, temperature) of a model-contrastive term on the representation the head reads
        (MOON), or None."""
        return None

    def reference(self, kept, received, global_weights):
        """The whole model whose representation the contrastive term pushes each client away
        from (MOON's previous local model), or None."""
        return None

    def after_training(self, kept, received, global_weights, result):
        """The client's new state and extra uploads after training from `global_weights` to
        `result` (a Client_side.LocalResult): ({CLIENT_STATE name: arrays},
        {UPLOADED name: arrays}). Its new state is kept only if the server accepts the upload."""
        return {}, {}

    def summand(self, delta, result, extras):
        """What a client puts into a secure sum: its update `delta` after training to
        `result` (a Client_side.LocalResult), then any of its `extras` ({UPLOADED name:
        arrays}) the server needs, each layer clipped to SECAGG_RANGE like the update's."""
        return delta

    def sum_weight(self, num_examples):
        """A client's weight in the secure sum: its samples (the n-weighted mean)."""
        return num_examples

    # --- The server side --------------------------------------------------------------------

    @classmethod
    def screen(cls, round_num, accepted, rejections):
        """Refuse uploads the format checks accepted by what only this method can judge (its
        extras within the round): (accepted, rejections), each list extended."""
        return accepted, rejections

    def combine(self, deltas, uploads, population):
        """The pseudo-gradient Delta from the accepted uploads' decoded updates (client order).

        population: how many clients can be sampled (N). May update self.state.
        """
        return weighted_mean(deltas, [upload.num_examples for upload in uploads])

    def from_secure_mean(self, mean, uploads, population):
        """The pseudo-gradient from the weighted mean of the accepted clients' summands (all
        that secure aggregation reveals) and their uploads' counts (client order); may update
        self.state as `combine` does."""
        return mean

    def sent(self):
        """What the server sends with the global weights: {SENT name: arrays}."""
        return {name: self.state[name] for name in self.SENT}

    def get_state(self):
        """The server state as arrays, SERVER_STATE's names in order (for checkpoints)."""
        return [array for name in self.SERVER_STATE for array in self.state[name]]

    def set_state(self, arrays):
        layers = len(self.shapes)
        self.state = {name: [np.array(array, np.float32)
                             for array in arrays[position * layers:(position + 1) * layers]]
                      for position, name in enumerate(self.SERVER_STATE)}

    @classmethod
    def divergence_cause(cls, config):
        """What most likely made this method diverge, or None for the general causes."""
        return None


def get(name):
    """The class of algorithm `name`; ValueError listing them when there is none."""
    return constant_rules.plugin(sys.modules[__name__], "ALGORITHM", name)


def build(settings, shapes):
    """The run's algorithm (settings.algorithm) for one side, from its settings."""
    return get(settings.algorithm)(settings, shapes)
