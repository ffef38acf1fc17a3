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
    """FedAvg's clients; the server averages step-normalized updates. Under secure aggregation
    each client normalizes its own update and the sum carries sum_i n_i Delta_i / a_i."""

    PAPER = ("Wang et al. 2020, Tackling the Objective Inconsistency Problem in Heterogeneous "
             "Federated Optimization (eq. 9-10)")
    SUMMABLE = True

    def combine(self, deltas, uploads, population):
        return fednova_delta(deltas, [upload.num_examples for upload in uploads],
                             self.normalizers(uploads))

    def normalizers(self, uploads):
        """a_i of each upload: its effective number of local steps."""
        return [upload_format.effective_steps(upload.num_steps, self.settings.local_momentum)
                for upload in uploads]

    def summand(self, delta, result, extras):
        steps = upload_format.effective_steps(result.num_steps, self.settings.local_momentum)
        return [layer / steps for layer in delta]

    def from_secure_mean(self, mean, uploads, population):
        weights = np.asarray([upload.num_examples for upload in uploads], np.float64)
        tau_eff = float(np.dot(weights / np.sum(weights), self.normalizers(uploads)))
        return [tau_eff * layer for layer in mean]


PLUGIN = FedNova
