"""FedAvg (McMahan et al. 2017, Algorithm 1): clients run local SGD from the global model; the
server averages their updates weighted by sample count. Everything is the base class's."""

import algorithms


class FedAvg(algorithms.Algorithm):
    """Local SGD on the clients, the n-weighted mean of their updates on the server."""

    PLAIN_UPDATES = True


PLUGIN = FedAvg
