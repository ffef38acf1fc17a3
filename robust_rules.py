"""Byzantine-robust aggregation rules: pure NumPy functions over the clients' updates.

Coordinate-wise median and trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed
Learning"), Krum and Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries").
Each update is a list of layer arrays; Server_side applies the rule AGGREGATION names.
"""

import numpy as np

KRUM_RULES = ("krum", "multi_krum")


def too_few_for_krum(aggregation, num_attackers, num_updates):
    """True when Krum or Multi-Krum has fewer than the 2f + 3 updates its guarantee needs
    (Blanchard et al. 2017). Under Poisson sampling, dropout or rejections a round can; it then
    keeps the global model rather than pick an update it cannot vouch for."""
    return aggregation in KRUM_RULES and num_updates < 2 * num_attackers + 3


def _stacked(deltas, layer):
    return np.stack([np.float64(delta[layer]) for delta in deltas])


def coordinate_median(deltas):
    """Coordinate-wise median of the client updates (Yin et al. 2018)."""
    return [np.median(_stacked(deltas, layer), axis=0) for layer in range(len(deltas[0]))]


def trimmed_mean(deltas, trim_ratio):
    """Coordinate-wise mean after dropping the floor(trim_ratio * m) largest and smallest values."""
    cut = int(trim_ratio * len(deltas))
    return [np.mean(np.sort(_stacked(deltas, layer), axis=0)[cut:len(deltas) - cut], axis=0)
            for layer in range(len(deltas[0]))]


def krum_scores(deltas, num_attackers):
    """Krum's score per client: the summed squared distances to its m - f - 2 nearest others.

    Blanchard et al. (2017) need m > 2f + 2 (the server keeps the model otherwise, see
    `too_few_for_krum`). Distances come from the Gram matrix, ||a||^2 + ||b||^2 - 2 a.b,
    so memory is m x d (the updates) and m x m, not m x m x d.
    """
    flat = np.stack([np.concatenate([np.ravel(np.float64(layer)) for layer in delta])
                     for delta in deltas])
    gram = flat @ flat.T
    norms = np.diag(gram)
    # Cancellation can leave tiny negatives for (nearly) equal updates.
    squared = np.maximum(norms[:, np.newaxis] + norms[np.newaxis, :] - 2 * gram, 0.0)
    num_neighbours = max(1, len(deltas) - num_attackers - 2)
    return np.array([np.sort(np.delete(row, client))[:num_neighbours].sum()
                     for client, row in enumerate(squared)])


def multi_krum_choice(deltas, num_attackers, num_selected):
    """Return the positions of the `num_selected` updates with the lowest Krum scores (Krum:
    num_selected = 1); Multi-Krum averages them with equal weights."""
    return np.argsort(krum_scores(deltas, num_attackers), kind="stable")[:num_selected]
