"""MOON (Li, He and Song 2021, "Model-Contrastive Federated Learning", Algorithm 1).

Each client adds mu * l_con to its loss, with
    l_con = -log( e^(sim(z, z_glob)/t) / (e^(sim(z, z_glob)/t) + e^(sim(z, z_prev)/t)) ),
z, z_glob and z_prev the representation of a batch (the body's output, which the head reads)
under the model being trained, the round's global model and the client's model at the end of its
previous round; sim is cosine similarity and t the temperature. A client keeps its last local
model as its state; one that never trained contrasts with the global model (l_con is then
constant at the start, as the paper's clients whose previous model is the initial global one).
The server averages as FedAvg.
"""

import numpy as np

import algorithms
import constant_rules


class Moon(algorithms.Algorithm):
    """FedAvg with a model-contrastive term: toward the global representation, away from the
    client's previous one."""

    PAPER = "Li, He and Song 2021, Model-Contrastive Federated Learning (Algorithm 1)"
    CONSTANTS = {"MOON_MU": constant_rules.number(">= 0"),
                 "MOON_TEMPERATURE": constant_rules.number("> 0")}
    CLIENT_STATE = ("previous",)
    WHOLE_MODEL = True

    def contrastive(self):
        return self.option("MOON_MU"), self.option("MOON_TEMPERATURE")

    def reference(self, kept, received, global_weights):
        previous = kept["previous"]
        return global_weights if not any(np.any(layer) for layer in previous) else previous

    def after_training(self, kept, received, global_weights, result):
        return {"previous": [np.asarray(layer, np.float32) for layer in result.new_weights]}, {}


PLUGIN = Moon
