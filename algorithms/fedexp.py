"""FedExP (Jhunjhunwala et al. 2023, "FedExP: Speeding Up Federated Averaging via
Extrapolation", Algorithm 1): clients train as in FedAvg; the server extrapolates along the
mean update Delta-bar = (1/M) sum_i Delta_i with the step size

    eta_g = max(1, sum_i ||Delta_i||^2 / (2 M (||Delta-bar||^2 + epsilon)))

(the paper writes the updates as x - y_i; ours are y_i - x, the same step). eta_g is 1 when the
clients agree and grows when their updates cancel out (heterogeneous clients).
"""

import numpy as np

import algorithms
import constant_rules
import upload_format


def extrapolation(deltas, epsilon):
    """FedExP's server step size for the round's updates (uniform weights, as the paper)."""
    mean = algorithms.uniform_mean(deltas)
    spread = sum(upload_format.update_norm(delta) ** 2 for delta in deltas)
    return max(1.0, spread / (2 * len(deltas) * (upload_format.update_norm(mean) ** 2
                                                   + epsilon)))


class FedExP(algorithms.Algorithm):
    """FedAvg's clients; the server steps eta_g >= 1 times their mean update."""

    PAPER = ("Jhunjhunwala et al. 2023, FedExP: Speeding Up Federated Averaging via "
             "Extrapolation (Algorithm 1)")
    CONSTANTS = {"FEDEXP_EPSILON": constant_rules.number("> 0")}
    NEEDS = {"SERVER_OPTIMIZER": (("sgd",), "its step size is the server's step"),
             "SERVER_LR": ((1.0,), "its step size is the server's step"),
             "COMPRESSION": (("none", "int8"), "top-k's sparse updates rarely overlap, so its "
                                               "step size would measure sparsity, not how "
                                               "much the clients disagree")}

    def combine(self, deltas, uploads, population):
        step = extrapolation(deltas, self.option("FEDEXP_EPSILON"))
        return [step * np.float64(layer) for layer in algorithms.uniform_mean(deltas)]


PLUGIN = FedExP
