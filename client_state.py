"""What each client keeps between rounds: SCAFFOLD's c_i, top-k's residual, its own model part.

A client's state is zero until it first trains, takes memory only once it has, and changes only
with an upload the server accepted (client_host.ClientHost.settle), so the server's view (e.g.
SCAFFOLD's c, the mean of all c_i) and the clients' stay in step.
"""

import numpy as np

from personalization import KEEPING


def kept_state_names(algorithm, compression, personalization="none"):
    """Name what each client keeps between rounds: SCAFFOLD's variate, top-k's residual, its
    own model part (personalization.KEEPING)."""
    return ((("variate",) if algorithm == "scaffold" else ())
            + (("residual",) if compression == "topk" else ())
            + (("own",) if personalization in KEEPING else ()))


def scaffold_correction(memory, client, server_variate):
    """Return SCAFFOLD's correction c - c_i for a client that keeps a variate, else None."""
    variates = memory.get("variate")
    if not variates:
        return None
    return [shared - own for shared, own in zip(server_variate, variates.get(client))]


def scaffold_client_variate(client_variate, server_variate, global_weights, new_weights,
                            num_steps, learning_rate):
    """SCAFFOLD's option II: c_i+ = c_i - c + (x - y_i) / (a_i * eta_l).

    The paper divides by K * eta_l, K local steps of plain SGD. With momentum the same K steps
    move the weights a_i * eta_l times the mean corrected gradient (see `effective_steps`), so
    dividing by K would inflate the variates every time a client takes part; a_i = K without
    momentum, so plain SGD is the paper's formula.

    Args:
        client_variate, server_variate: c_i and c, lists of layer arrays.
        global_weights, new_weights: x (the round's start) and y_i (after the local steps).
        num_steps: a_i, the client's effective steps; learning_rate: eta_l.
    Returns:
        c_i+ as float32 layer arrays.
    """
    return [(np.float64(own) - shared + (np.float64(start) - end) / (num_steps * learning_rate))
            .astype(np.float32)
            for own, shared, start, end in zip(client_variate, server_variate, global_weights,
                                               new_weights, strict=True)]


class ClientMemory:
    """Arrays each client keeps across rounds (SCAFFOLD's c_i), zero until it first trains.

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
