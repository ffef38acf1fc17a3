"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization"): the server normalizes each update by its client's effective number of
local steps a_i, then rescales by tau_eff = sum_i p_i a_i. Clients train as in FedAvg."""

import numpy as np

import algorithms
import upload_format


def fednova_delta(deltas, num_examples, normalizers):
    """FedNova's pseudo-gradient: tau_eff * sum_i p_i * Delta_i / a_i, with tau_eff = sum p_i a_i.

    Normalizing each update by its step count removes the objective inconsistency that plain
    averaging has when clients take different numbers of local steps.
    """
    weights = np.asarray(num_examples, np.float64) / np.sum(num_examples)
    tau_eff = float(np.dot(weights, normalizers))
    normalized = [[layer / normalizer for layer in delta]
                  for delta, normalizer in zip(deltas, normalizers)]
    return [tau_eff * layer for layer in algorithms.weighted_mean(normalized, num_examples)]


class FedNova(algorithms.Algorithm):
    """FedAvg's clients; the server averages step-normalized updates."""

    PAPER = ("Wang et al. 2020, Tackling the Objective Inconsistency Problem in Heterogeneous "
             "Federated Optimization (eq. 9-10)")

    def combine(self, deltas, uploads, population):
        normalizers = [upload_format.effective_steps(upload.num_steps,
                                                     self.settings.local_momentum)
                       for upload in uploads]
        return fednova_delta(deltas, [upload.num_examples for upload in uploads], normalizers)


PLUGIN = FedNova
