"""Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization"):
besides its global update (FedAvg's, unchanged), each selected client trains its own model v_i
for PERSONAL_EPOCHS of SGD on F_i(v) + (DITTO_LAMBDA/2)||v - w_global||^2; v_i stays on the
client. A new client's model is that personal step from v = w_global."""

import constant_rules
import personalization
import Utils


def personal_step(trainer, global_weights, indices, own, rngs):
    """Ditto's personal update: from v_i (the global model when it has none) toward a lower
    F_i(v) + (lambda/2)||v - w_global||^2, for PERSONAL_EPOCHS."""
    starts = [global_weights if mine is None else mine for mine in own]
    return trainer.train_many(global_weights, indices, rngs, starts=starts,
                              anchors=[global_weights] * len(starts))


class Ditto(personalization.Method):
    """FedAvg for the global model, and a proximal personal model on every client."""

    PAPER = ("Li et al. 2021, Ditto: Fair and Robust Federated Learning Through "
             "Personalization (Algorithm 1)")
    CONSTANTS = {"PERSONAL_EPOCHS": constant_rules.integer(1),
                 "DITTO_LAMBDA": constant_rules.number(">= 0")}
    OWN = "model"
    PERSONAL = True
    PARTIAL_WORK = False

    @classmethod
    def extra_epochs(cls, config):
        return config["PERSONAL_EPOCHS"]

    def starts(self, global_weights, own):
        return None  # its global update starts from the global model; v_i trains apart

    def trainer_recipes(self):
        return {"personal": {"epochs": self.option("PERSONAL_EPOCHS"),
                             "prox_mu": self.option("DITTO_LAMBDA")}}, ()

    def kept(self, trainers, global_weights, clients, indices, own, round_num, results, starts,
             terms, max_steps):
        return [result.new_weights for result in personal_step(
            trainers["personal"], global_weights, indices, own,
            [Utils.rng(self.settings.seed, "personal", round_num, client)
             for client in clients])]

    def adapt(self, trainers, global_weights, indices, rngs):
        return personal_step(trainers["personal"], global_weights, indices,
                             [None] * len(indices), rngs)


PLUGIN = Ditto
