"""Personalization: a model that fits each client, beside the global one (PERSONALIZATION).

One module per method, found by its name, each holding one subclass of `Method` (its PLUGIN)
that declares which part of the model a client keeps as its own and which it uploads, the
trainers it needs beyond the local one (epochs, proximal mu, frozen layers), and how it trains
a round and serves a client its own model. The base class is FedAvg's: the global model serves
every client. Adding a method is one new file here (and its constants in Main.py).

A client without a model of its own (not trained yet, or held out) is served what its method
gives a new client (`Method.adapt`), made from the global model when it is evaluated and not
kept. A client first selected starts its own part from the global model's.
"""

import pkgutil
import sys

import numpy as np

import constant_rules
import models
import Utils

NAMES = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)))
# The global model for everyone: personalization of every run before PERSONALIZATION existed.
DEFAULT = "none"
# Parts of the model a method names: what a client keeps (OWN) and uploads (UPLOADS).
PARTS = ("model", "body", "head")


def with_own(global_weights, own, layers):
    """The global weights with a client's own arrays in `layers` (its personal model)."""
    weights = list(global_weights)
    for index, array in zip(layers, own, strict=True):
        weights[index] = array
    return weights


class Method:
    """FedAvg's behaviour (the global model serves every client); methods override it.

    Declarations (class attributes):
        PAPER: where the method comes from.
        CONSTANTS: {constant name: rule (constant_rules)} of the Main.py constants it reads;
            their values are in `settings.options`.
        OWN: the part each client keeps as its own between rounds ("model", "body", "head"),
            or None.
        UPLOADS: the part clients upload and the server averages ("model", "body", "head"),
            or None for none.
        PERSONAL: clients are served a model of their own (else the global model).
        PARTIAL_WORK: a straggler's partial work (STRAGGLER_POLICY partial) is defined for it:
            its only training is the one local training whose update is uploaded.
        ADAPTS_EACH_EVALUATION: every evaluation adapts afresh (FedAvg-FT), keeping nothing.

    Args:
        settings: the side's settings (with `model` and `options`); num_layers: the model's
            layer arrays.
    """

    PAPER = "McMahan et al. 2017 (the global model serves every client)"
    CONSTANTS = {}
    OWN = None
    UPLOADS = "model"
    PERSONAL = False
    PARTIAL_WORK = True
    ADAPTS_EACH_EVALUATION = False

    def __init__(self, settings, num_layers):
        self.settings, self.num_layers = settings, num_layers
        head = models.head_layers(settings.model)
        self.parts = {"model": tuple(range(num_layers)),
                      "body": tuple(range(num_layers - head)),
                      "head": tuple(range(num_layers - head, num_layers)), None: ()}

    def option(self, name):
        return self.settings.options[name]

    @property
    def own_layers(self):
        """Indices of the layer arrays a client keeps as its own (its personal state)."""
        return self.parts[self.OWN]

    @property
    def uploaded_layers(self):
        """Indices of the layer arrays a client uploads (and the server sends down)."""
        return self.parts[self.UPLOADS]

    @classmethod
    def extra_epochs(cls, config):
        """Epochs a selected client trains a round beyond LOCAL_EPOCHS."""
        return 0

    @classmethod
    def adaptation(cls, config):
        """What an ADAPTS_EACH_EVALUATION method trains before each evaluation, as tables
        print it."""
        return f"{config['FINETUNE_EPOCHS']} per evaluation"

    def trainer_recipes(self):
        """The extra trainers the method needs, {name: keyword arguments of
        LocalTrainer.for_clients (epochs, prox_mu, frozen, learning_rate, step)}, and the
        layers the local trainer ("main") keeps frozen."""
        return {}, ()

    def local_step(self):
        """The local trainer's step rule (see Client_side.LocalTrainer's `step`: a companion
        trained in the same steps, another gradient), or None for the algorithm's SGD."""
        return None

    # --- A round's training -----------------------------------------------------------------

    def starts(self, global_weights, own):
        """Where each client's local training starts: the global weights with its own part
        (OWN) in place, or the global weights for a client without (None: for all)."""
        if self.OWN is None:
            return None
        return [global_weights if mine is None else with_own(global_weights, mine,
                                                             self.own_layers)
                for mine in own]

    def before_training(self, trainers, global_weights, indices, rngs, starts):
        """A phase before the local training (FedRep's head); returns the new starts."""
        return starts

    def train_round(self, trainers, global_weights, clients, indices, own, round_num,
                    terms=None, max_steps=None):
        """Train clients for a round as the method does.

        Args:
            trainers: {"main": the group's local trainer, and the method's (trainer_recipes);
                for label-flipping attackers "main" trains on flipped labels and "honest" on
                true ones}.
            clients: the client ids; indices: their training rows; own: each client's kept
                arrays (own_layers), or None for a client without.
            terms: the algorithm's per-client terms of the local objective for the local
                trainer, {"corrections": ..., "references": ...} (LocalTrainer.train_many).
            max_steps: per-client step limits of stragglers' partial work, or None.
        Returns:
            (LocalResult per client, the arrays each keeps or None per client): the
            LocalResult's new_weights are the client's model after its global update.
        """
        rngs = [Utils.rng(self.settings.seed, "training", round_num, client)
                for client in clients]
        starts = self.before_training(trainers, global_weights, indices, rngs,
                                      self.starts(global_weights, own))
        results = trainers["main"].train_many(global_weights, indices, rngs, starts=starts,
                                              max_steps=max_steps, **(terms or {}))
        return results, self.kept(trainers, global_weights, clients, indices, own, round_num,
                                  results, starts, terms, max_steps)

    def kept(self, trainers, global_weights, clients, indices, own, round_num, results, starts,
             terms, max_steps):
        """What each client keeps after the round: its own layers of its trained model."""
        if not self.own_layers:
            return [None] * len(clients)
        _, frozen = self.trainer_recipes()
        if "honest" in trainers and not set(self.own_layers) <= set(frozen):
            # A label-flipping attacker's own part: the same training on its true labels.
            results = trainers["honest"].train_many(
                global_weights, indices,
                [Utils.rng(self.settings.seed, "training", round_num, client)
                 for client in clients], starts=starts, max_steps=max_steps, **(terms or {}))
        return [[result.new_weights[index] for index in self.own_layers] for result in results]

    # --- Serving a client its own model -----------------------------------------------------

    def personal_models(self, trainers, global_weights, clients, indices, own, round_num):
        """Each client's own model for evaluation; a client without one gets what the method
        gives a new client (`adapt`, trained from the global model now, not kept).

        Returns:
            one list of layer arrays per client.
        """
        personal = [None if mine is None or self.ADAPTS_EACH_EVALUATION
                    else with_own(global_weights, mine, self.own_layers) for mine in own]
        new = [position for position, model in enumerate(personal) if model is None]
        if not self.PERSONAL or not new:
            return [global_weights if model is None else model for model in personal]
        rngs = [Utils.rng(self.settings.seed, "adaptation", round_num, clients[position])
                for position in new]
        adapted = self.adapt(trainers, global_weights, [indices[position] for position in new],
                             rngs)
        for position, result in zip(new, adapted):
            personal[position] = result.new_weights
        return personal

    def adapt(self, trainers, global_weights, indices, rngs):
        """A new client's model: the "adapt" trainer's run from the global model."""
        return trainers["adapt"].train_many(global_weights, indices, rngs)


def get(name):
    """The class of method `name`; ValueError listing them when there is none."""
    return constant_rules.plugin(sys.modules[__name__], "PERSONALIZATION", name)


def build(settings, num_layers):
    """The run's method (settings.personalization) for a model of `num_layers` arrays."""
    return get(settings.personalization)(settings, num_layers)


def extra_epochs(config):
    """Epochs a selected client trains a round beyond LOCAL_EPOCHS (FedRep's head phase,
    Ditto's personal model; the others: 0)."""
    return get(config["PERSONALIZATION"]).extra_epochs(config)


def epochs_per_round(config):
    """What a selected client trains a round, as the comparisons print it: '2', or for
    FedAvg-FT '1 + 1 per evaluation' (its fine-tuning before each evaluation)."""
    epochs = f"{config['LOCAL_EPOCHS'] + extra_epochs(config)}"
    method = get(config["PERSONALIZATION"])
    if method.ADAPTS_EACH_EVALUATION:
        epochs += f" + {method.adaptation(config)}"
    return epochs


def state_bytes_per_client(method, shapes, head_layers):
    """Bytes of personal state one trained client keeps (float32), 0 for methods keeping none."""
    own = get(method).OWN
    num_layers, body = len(shapes), len(shapes) - head_layers
    layers = {"model": range(num_layers), "body": range(body),
              "head": range(body, num_layers), None: ()}[own]
    return sum(4 * int(np.prod(shapes[index])) for index in layers)
