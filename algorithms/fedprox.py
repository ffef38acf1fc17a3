"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", Algorithm 2):
each client minimizes F_k(w) + (mu/2)||w - w_global||^2; the server averages as FedAvg."""

import algorithms
import constant_rules


class FedProx(algorithms.Algorithm):
    """FedAvg with a proximal term toward the round's global model in the local objective."""

    PAPER = "Li et al. 2020, Federated Optimization in Heterogeneous Networks (Algorithm 2)"
    CONSTANTS = {"PROX_MU": constant_rules.number(">= 0")}
    PLAIN_UPDATES = True

    def prox_mu(self):
        return self.option("PROX_MU")


PLUGIN = FedProx
