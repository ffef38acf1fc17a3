"""FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization", Algorithm 1).

Client k, from the server model theta^{t-1}, minimizes
    L_k(theta) - <grad L_k(theta_k^{t-1}), theta> + (alpha/2) ||theta - theta^{t-1}||^2
and keeps the gradient of its loss at its new model, by the first-order condition:
    grad L_k(theta_k^t) = grad L_k(theta_k^{t-1}) - alpha (theta_k^t - theta^{t-1}).
The server keeps h:  h^t = h^{t-1} - alpha (1/m) sum_{k in P_t} (theta_k^t - theta^{t-1})
and sets  theta^t = (1/|P_t|) sum_{k in P_t} theta_k^t - (1/alpha) h^t,  m the clients that can
be sampled. Here the linear term is a constant shift of every local gradient (the trainer's
correction, -grad L_k(theta_k^{t-1})) and the quadratic one FedProx's proximal term with
mu = alpha; local minimization is LOCAL_EPOCHS of SGD, as in the paper's experiments.
"""

import numpy as np

import algorithms
import constant_rules


class FedDyn(algorithms.Algorithm):
    """Dynamic regularization: each client's objective is shifted by its last gradient."""

    PAPER = "Acar et al. 2021, Federated Learning Based on Dynamic Regularization (Algorithm 1)"
    CONSTANTS = {"FEDDYN_ALPHA": constant_rules.number("> 0")}
    CLIENT_STATE = ("gradient",)
    SERVER_STATE = ("h",)
    WHOLE_MODEL = True
    NEEDS = {"SERVER_OPTIMIZER": (("sgd",), "its server step sets the new model itself"),
             "SERVER_LR": ((1.0,), "its server step sets the new model itself"),
             "COMPRESSION": (("none",), "each client's g_k and the server's h must follow the "
                                        "same update, not a compressed copy")}

    def prox_mu(self):
        return self.option("FEDDYN_ALPHA")

    def correction(self, kept, received):
        return [-gradient for gradient in kept["gradient"]]

    def after_training(self, kept, received, global_weights, result):
        alpha = self.option("FEDDYN_ALPHA")
        return {"gradient": [
            (np.float64(gradient) - alpha * (np.float64(new) - start)).astype(np.float32)
            for gradient, new, start in zip(kept["gradient"], result.new_weights,
                                            global_weights, strict=True)]}, {}

    def combine(self, deltas, uploads, population):
        """theta^t - theta^{t-1} = mean_k Delta_k - h^t / alpha, with h^t as above."""
        alpha = self.option("FEDDYN_ALPHA")
        mean = algorithms.uniform_mean(deltas)
        share = len(deltas) / population
        self.state["h"] = [(np.float64(h) - alpha * share * np.float64(layer)).astype(np.float32)
                           for h, layer in zip(self.state["h"], mean)]
        return [np.float64(layer) - np.float64(h) / alpha
                for layer, h in zip(mean, self.state["h"])]

    @classmethod
    def divergence_cause(cls, config):
        return (f"FedDyn's correction grew: raise FEDDYN_ALPHA {config['FEDDYN_ALPHA']} or "
                f"lower LEARNING_RATE {config['LEARNING_RATE']}")


PLUGIN = FedDyn
