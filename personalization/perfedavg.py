"""Per-FedAvg (Fallah, Mokhtari and Ozdaglar 2020, "Personalized Federated Learning with
Theoretical Guarantees: A Model-Agnostic Meta-Learning Approach", Algorithm 1, first-order
version FO): the clients train the global model for one step of adaptation rather than for
itself. Each local step takes the adapted weights w~ = w - alpha grad f(w, D) and moves
w <- w - beta grad f(w~, D'), beta the LEARNING_RATE; D and D' are the two halves of the step's
minibatch (the paper draws two batches; with an odd batch they share its middle sample, with a
batch of one, its sample). The server averages w as FedAvg does. A client is served the global
model after one step of adaptation on a batch of its own training data,
w_global - alpha grad f(w_global, batch), made afresh at every evaluation and not kept; that
batch is a whole one of BATCH_SIZE, where a training step adapts on half of one. As for every
method here, the server averages w weighted by samples (the paper: uniformly) and clients
train E epochs (the paper: tau steps)."""

import tensorflow as tf

import constant_rules
import personalization


class MetaStep:
    """The local step rule: the gradient at the adapted weights (the FO-MAML gradient)."""

    COMPANION = False

    def __init__(self, alpha):
        self.alpha = alpha

    def gradients(self, trainer, images, labels, anchor, reference):
        size = tf.shape(images)[0]
        first, second = slice(None, (size + 1) // 2), slice(size // 2, None)
        loss, inner = trainer.loss_and_gradients(images[first], labels[first], anchor,
                                                 reference)
        adapted = [variable - self.alpha * gradient for variable, gradient
                   in zip(trainer.model.trainable_variables, inner)]
        _, outer = trainer.gradients_at(adapted, images[second], labels[second], anchor,
                                        reference)
        return loss, outer, None


class PerFedAvg(personalization.Method):
    """FedAvg training the global model for one step of local adaptation."""

    PAPER = ("Fallah, Mokhtari and Ozdaglar 2020, Personalized Federated Learning with "
             "Theoretical Guarantees (Per-FedAvg, Algorithm 1, first-order)")
    CONSTANTS = {"PERFEDAVG_ALPHA": constant_rules.number("> 0")}
    PERSONAL = True
    ADAPTS_EACH_EVALUATION = True

    def local_step(self):
        return MetaStep(self.option("PERFEDAVG_ALPHA"))

    def trainer_recipes(self):
        return {"adapt": {"epochs": 1, "learning_rate": self.option("PERFEDAVG_ALPHA")}}, ()

    @classmethod
    def adaptation(cls, config):
        return "1 step per evaluation"

    def adapt(self, trainers, global_weights, indices, rngs):
        """One step of SGD at alpha from the global model, on one batch of local data."""
        return trainers["adapt"].train_many(global_weights, indices, rngs,
                                            max_steps=[1] * len(indices))


PLUGIN = PerFedAvg
