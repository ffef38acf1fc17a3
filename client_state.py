"""What each client keeps between rounds: its algorithm's state (e.g. SCAFFOLD's c_i), top-k's
residual, its own model part.

A client's state is zero until it first trains, takes memory only once it has, and changes only
with an upload the server accepted (client_host.ClientHost.settle), so the server's view (e.g.
SCAFFOLD's c, the mean of all c_i) and the clients' stay in step.
"""

import numpy as np


def kept_state_names(algorithm, compression, personalization):
    """Name what each client keeps between rounds: its algorithm's CLIENT_STATE, top-k's
    residual, its own model part.

    Args:
        algorithm: the run's algorithms.Algorithm class; personalization: its
            personalization.Method class.
    """
    return (tuple(algorithm.CLIENT_STATE)
            + (("residual",) if compression == "topk" else ())
            + (("own",) if personalization.OWN is not None else ()))


class ClientMemory:
    """Arrays each client keeps across rounds (e.g. SCAFFOLD's c_i), zero until it first trains.

    Only clients that have trained take memory, so a run with many clients stays small.
    """

    def __init__(self, shapes):
        self.shapes = [tuple(shape) for shape in shapes]
        self._arrays = {}

    def get(self, client):
        """Return the client's arrays (zeros if it never stored any)."""
        return self._arrays.get(int(client)) or [np.zeros(shape, np.float32)
                                                 for shape in self.shapes]

    def put(self, client, arrays):
        self._arrays[int(client)] = [np.asarray(array, np.float32) for array in arrays]

    def __contains__(self, client):
        return int(client) in self._arrays

    def get_state(self):
        """Client ids, then one stacked array per layer, for checkpoints."""
        clients = sorted(self._arrays)
        return [np.array(clients, np.int64)] + [
            np.stack([self._arrays[client][layer] for client in clients])
            if clients else np.zeros((0, *shape), np.float32)
            for layer, shape in enumerate(self.shapes)]

    def set_state(self, arrays):
        clients, layers = arrays[0], arrays[1:]
        self._arrays = {int(client): [np.array(layer[position]) for layer in layers]
                        for position, client in enumerate(clients)}
