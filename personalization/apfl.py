"""APFL (Deng, Kamani and Mahdavi 2020, "Adaptive Personalized Federated Learning",
Algorithm 1 with a fixed alpha): each selected client trains two models in the same steps on
the same batches: its copy w of the global model by local SGD, which it uploads as FedAvg's
update, and its own model v by SGD on the loss of the mixture v_bar = alpha v + (1 - alpha) w,
v <- v - eta alpha grad f(v_bar) (the gradient with respect to v), both taken before either
moves. v stays on the client (it starts from the global model when first selected). A client
is served alpha v + (1 - alpha) w_global; one without v is served the global model (its v
would be the global model: the mixture is the global model). With a model that has dropout,
v's forward pass draws masks too, so w's masks (not its rule) differ from a FedAvg run's.

Where the framework differs from the paper's box, as for every method here: the server averages
w weighted by samples (the paper: uniformly), clients train E epochs (the paper: tau steps),
LOCAL_MOMENTUM applies to v too, and a client keeps its new v only when the server accepted its
upload. This follows the box, not the authors' code (which mixes the two models' outputs and
serves the local w)."""

import constant_rules
import personalization
import Utils


class MixtureStep:
    """The local step rule: the algorithm's gradient for w, alpha grad f(v_bar) for v."""

    COMPANION = True

    def __init__(self, alpha):
        self.alpha = alpha

    def gradients(self, trainer, images, labels, anchor, reference):
        loss, gradients = trainer.loss_and_gradients(images, labels, anchor, reference)
        mixture = [self.alpha * own + (1 - self.alpha) * shared
                   for own, shared in zip(trainer.companion, trainer.model.trainable_variables)]
        # v's objective is f_i(v_bar) alone: no proximal or contrastive term of the algorithm.
        _, mixed = trainer.gradients_at(mixture, images, labels, anchor, terms=False)
        return loss, gradients, [self.alpha * gradient for gradient in mixed]


class APFL(personalization.Method):
    """FedAvg for w, and on every client a personal v trained on the mixture's loss."""

    PAPER = ("Deng, Kamani and Mahdavi 2020, Adaptive Personalized Federated Learning "
             "(Algorithm 1, alpha fixed)")
    CONSTANTS = {"APFL_ALPHA": constant_rules.number("[0, 1]")}
    OWN = "model"
    PERSONAL = True

    def local_step(self):
        return MixtureStep(self.option("APFL_ALPHA"))

    def starts(self, global_weights, own):
        return None  # w starts from the global model; v from the client's own

    def train_round(self, trainers, global_weights, clients, indices, own, round_num,
                    terms=None, max_steps=None):
        companions = [global_weights if mine is None else mine for mine in own]
        results = self._train(trainers["main"], global_weights, clients, indices, round_num,
                              terms, max_steps, companions)
        if "honest" in trainers:
            # A label-flipping attacker's v: the same steps on its true labels.
            kept = self._train(trainers["honest"], global_weights, clients, indices,
                               round_num, terms, max_steps, companions)
        else:
            kept = results
        return results, [result.companion for result in kept]

    def _train(self, trainer, global_weights, clients, indices, round_num, terms, max_steps,
               companions):
        rngs = [Utils.rng(self.settings.seed, "training", round_num, client)
                for client in clients]
        return trainer.train_many(global_weights, indices, rngs, max_steps=max_steps,
                                  companions=companions, **(terms or {}))

    def personal_models(self, trainers, global_weights, clients, indices, own, round_num):
        alpha = self.option("APFL_ALPHA")
        return [global_weights if mine is None
                else [alpha * personal + (1 - alpha) * shared
                      for personal, shared in zip(mine, global_weights, strict=True)]
                for mine in own]


PLUGIN = APFL
