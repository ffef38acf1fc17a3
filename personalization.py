"""Personalization: a model that fits each client, beside the global one (PERSONALIZATION).

none      FedAvg: the global model serves every client.
finetune  FedAvg-FT: before evaluation each client fine-tunes a copy of the global model for
          FINETUNE_EPOCHS on its local train data; nothing is kept or uploaded (the baseline of
          the pFL benchmarks, e.g. Wang et al. 2019, "Federated Evaluation of On-device
          Personalization").
fedper    Arivazhagan et al. 2019, "Federated Learning with Personalization Layers": the last
          dense layer (the head) is the client's own; it trains with the body each round, stays
          on the client and is never uploaded; the server averages the body.
fedrep    Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated
          Learning": as fedper, but each round the head trains HEAD_EPOCHS with the body frozen,
          then the body LOCAL_EPOCHS with the head frozen.
ditto     Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization":
          besides its global update (unchanged), each selected client trains its own model v_i
          for PERSONAL_EPOCHS of SGD on F_i(v) + (DITTO_LAMBDA/2)||v - w_global||^2; v_i stays on
          the client.
local     No federation: each client trains only its own model, from the common initial
          weights, when selected; nothing is uploaded. The lower reference of pFL tables.

A client without a model of its own (not trained yet, or held out) is served what its method
gives a new client, made from the global model when it is evaluated and not kept: none: the
global model; finetune and local: FINETUNE_EPOCHS of training from the global model (local's
stays the initial one); fedper and fedrep: the global body with a head trained FINETUNE_EPOCHS
with the body frozen, from the global head; ditto: its personal step from v = w_global.
A client first selected starts its own part from the same: fedper and fedrep from the global
head, ditto and local from the global model.
"""

import numpy as np

import models
import Utils

METHODS = ("none", "finetune", "fedper", "fedrep", "ditto", "local")
# Methods whose clients keep a part of the model as their own between rounds.
KEEPING = ("fedper", "fedrep", "ditto", "local")


def extra_epochs(config):
    """Epochs a selected client trains a round beyond LOCAL_EPOCHS: FedRep's head phase,
    Ditto's personal model (the others: 0)."""
    return {"fedrep": config["HEAD_EPOCHS"], "ditto": config["PERSONAL_EPOCHS"]}.get(
        config["PERSONALIZATION"], 0)


def epochs_per_round(config):
    """What a selected client trains a round, as the comparisons print it: '2', or for
    FedAvg-FT '1 + 1 per evaluation' (its fine-tuning before each evaluation)."""
    epochs = f"{config['LOCAL_EPOCHS'] + extra_epochs(config)}"
    if config["PERSONALIZATION"] == "finetune":
        epochs += f" + {config['FINETUNE_EPOCHS']} per evaluation"
    return epochs


def own_layers(method, num_layers, head_layers):
    """Indices of the layer arrays a client keeps as its own (its personal state); the head is
    the model's last `head_layers` arrays (its plug-in's HEAD_LAYERS)."""
    if method in ("fedper", "fedrep"):
        return tuple(range(num_layers - head_layers, num_layers))
    return tuple(range(num_layers)) if method in ("ditto", "local") else ()


def uploaded_layers(method, num_layers, head_layers):
    """Indices of the layer arrays a client uploads (and the server sends down)."""
    if method == "local":
        return ()
    if method in ("fedper", "fedrep"):
        return tuple(range(num_layers - head_layers))
    return tuple(range(num_layers))


def state_bytes_per_client(method, shapes, head_layers):
    """Bytes of personal state one trained client keeps (float32), 0 for methods keeping none."""
    if method not in KEEPING:
        return 0
    return sum(4 * int(np.prod(shapes[index]))
               for index in own_layers(method, len(shapes), head_layers))


def trainer_recipes(settings, num_layers):
    """The extra trainers a method needs: {name: (epochs, proximal mu, frozen layers)}.

    "adapt" serves a new client (see the module's text); "head" is FedRep's first phase;
    "personal" is Ditto's step. The main trainer is Client_side's, with FedRep's head frozen.
    """
    head_layers = models.head_layers(settings.model)
    method, head = settings.personalization, own_layers("fedper", num_layers, head_layers)
    body = uploaded_layers("fedper", num_layers, head_layers)
    recipes = {}
    if method in ("finetune", "local"):
        recipes["adapt"] = (settings.finetune_epochs, 0.0, ())
    if method in ("fedper", "fedrep"):
        recipes["adapt"] = (settings.finetune_epochs, 0.0, body)
    if method == "fedrep":
        recipes["head"] = (settings.head_epochs, 0.0, body)
    if method == "ditto":
        recipes["personal"] = (settings.personal_epochs, settings.ditto_lambda, ())
    return recipes, (head if method == "fedrep" else ())


def with_own(global_weights, own, layers):
    """The global weights with a client's own arrays in `layers` (its personal model)."""
    weights = list(global_weights)
    for index, array in zip(layers, own, strict=True):
        weights[index] = array
    return weights


def train_round(settings, trainers, global_weights, clients, indices, own, round_num,
                corrections=None, max_steps=None):
    """Train clients for a round as the method does.

    Args:
        trainers: {"main": the group's local trainer, and the method's (trainer_recipes); for
            label-flipping attackers "main" trains on flipped labels and "honest" on true ones}.
        clients: the client ids; indices: their training rows; own: each client's kept arrays
            (own_layers), or None for a client without.
        corrections: SCAFFOLD's per-client corrections, or None.
        max_steps: per-client step limits of stragglers' partial work, or None.
    Returns:
        (LocalResult per client, the arrays each keeps or None per client): the LocalResult's
        new_weights are the client's model after its global update (all layers).
    """
    method, seed = settings.personalization, settings.seed
    layers = own_layers(method, len(global_weights), models.head_layers(settings.model))
    rngs = [Utils.rng(seed, "training", round_num, client) for client in clients]
    starts = (None if method not in ("fedper", "fedrep", "local") else
              [global_weights if mine is None else with_own(global_weights, mine, layers)
               for mine in own])
    if method == "fedrep":
        heads = trainers["head"].train_many(global_weights, indices, rngs, starts=starts)
        starts = [result.new_weights for result in heads]
    results = trainers["main"].train_many(global_weights, indices, rngs, corrections, starts,
                                          max_steps=max_steps)
    if method == "ditto":
        kept = [result.new_weights for result in personal_step(
            trainers["personal"], global_weights, indices, own,
            [Utils.rng(seed, "personal", round_num, client) for client in clients])]
    elif method in KEEPING:
        if method == "fedper" and "honest" in trainers:
            # A label-flipping attacker's own head: the same training on its true labels.
            results_for_own = trainers["honest"].train_many(
                global_weights, indices,
                [Utils.rng(seed, "training", round_num, client) for client in clients],
                corrections, starts, max_steps=max_steps)
        else:
            results_for_own = results
        kept = [[result.new_weights[index] for index in layers] for result in results_for_own]
    else:
        kept = [None] * len(clients)
    return results, kept


def personal_step(trainer, global_weights, indices, own, rngs):
    """Ditto's personal update: from v_i (the global model when it has none) toward a lower
    F_i(v) + (lambda/2)||v - w_global||^2, for PERSONAL_EPOCHS."""
    starts = [global_weights if mine is None else mine for mine in own]
    return trainer.train_many(global_weights, indices, rngs, starts=starts,
                              anchors=[global_weights] * len(starts))


def personal_models(settings, trainers, global_weights, clients, indices, own, round_num):
    """Each client's own model for evaluation; a client without one gets what the method gives
    a new client (trained from the global model now, not kept).

    Returns:
        one list of layer arrays per client; none and nothing to adapt return the global one.
    """
    method = settings.personalization
    layers = own_layers(method, len(global_weights), models.head_layers(settings.model))
    personal = [None if mine is None else with_own(global_weights, mine, layers) for mine in own]
    if method == "finetune":
        personal = [None] * len(clients)  # Fine-tuned afresh at every evaluation.
    new = [position for position, model in enumerate(personal) if model is None]
    if method == "none" or not new:
        return [global_weights if model is None else model for model in personal]
    rngs = [Utils.rng(settings.seed, "adaptation", round_num, clients[position])
            for position in new]
    new_indices = [indices[position] for position in new]
    if method == "ditto":
        adapted = personal_step(trainers["personal"], global_weights, new_indices,
                                [None] * len(new), rngs)
    else:
        adapted = trainers["adapt"].train_many(global_weights, new_indices, rngs)
    for position, result in zip(new, adapted):
        personal[position] = result.new_weights
    return personal
