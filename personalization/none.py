"""FedAvg without personalization: the global model serves every client (the base class)."""

import personalization


class NoPersonalization(personalization.Method):
    """The global model for everyone."""


PLUGIN = NoPersonalization
