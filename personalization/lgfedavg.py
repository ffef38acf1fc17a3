"""LG-FedAvg (Liang et al. 2020, "Think Locally, Act Globally: Federated Learning with Local
and Global Representations", Algorithm 1): the inverse split of FedPer. Each client keeps its
own body (the local representation: every layer but the model's last HEAD_LAYERS arrays), trains
it with the head every round, and uploads only the head, which the server averages. A new
client gets the global head with a body trained FINETUNE_EPOCHS (head frozen) from the global
body."""

from personalization import fedper


class LGFedAvg(fedper.FedPer):
    """A body of each client's own, a shared head trained with it: FedPer's split reversed."""

    PAPER = ("Liang et al. 2020, Think Locally, Act Globally: Federated Learning with Local and "
             "Global Representations (Algorithm 1)")
    OWN = "body"
    UPLOADS = "head"


PLUGIN = LGFedAvg
