"""The centralized baseline: the same CNN trained on the pooled data, sample for sample.

FL accuracy is usually below centralized training; CENTRALIZED_BASELINE measures by how much,
training the global architecture on as many samples each round as the federation trained, with
the clients' optimizer and batch size, through the clients' own compiled training call.
"""

import numpy as np

import Utils


class CentralizedBaseline:
    """Train the same CNN on the pooled training set, as many samples as the federation trained.

    It walks through reshuffled passes over all training samples, continuing where the previous
    round stopped, with the clients' batch size and SGD settings; pass p is ordered by
    (SEED, p) alone. Its momentum buffer (if any) restarts every round, as a client's does;
    its dropout is seeded by SEED when the stream starts and continues from round to round.
    """

    def __init__(self, trainer, initial_weights, num_samples, seed):
        self.trainer = trainer
        self.weights = [np.array(layer) for layer in initial_weights]
        self._num_samples, self._seed = num_samples, seed
        self._pass, self._position = 0, 0

    def train(self, num_samples):
        """Train on the next `num_samples` samples of the stream; return the new weights."""
        if num_samples == 0:  # A round where no client returned.
            return self.weights
        seed = self._seed if (self._pass, self._position) == (0, 0) else None
        ((self.weights, _, _),) = self.trainer.train_orders(
            self.weights, [self._next(num_samples)[np.newaxis]], [seed])
        return self.weights

    def _next(self, count):
        taken = []
        while count > 0:
            if self._position == self._num_samples:
                self._pass, self._position = self._pass + 1, 0
            order = Utils.rng(self._seed, "baseline", self._pass).permutation(self._num_samples)
            chunk = order[self._position:self._position + count]
            taken.append(chunk)
            self._position += len(chunk)
            count -= len(chunk)
        return np.concatenate(taken)

    def get_state(self):
        return (self.weights + [np.array([self._pass, self._position])]
                + self.trainer.get_state())

    def set_state(self, arrays):
        num_layers = len(self.weights)
        self.weights = [np.array(layer) for layer in arrays[:num_layers]]
        self._pass, self._position = (int(value) for value in arrays[num_layers])
        self.trainer.set_state(arrays[num_layers + 1:])
