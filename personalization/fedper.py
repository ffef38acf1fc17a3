"""FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers"): the head
(the model's last HEAD_LAYERS arrays) is each client's own; it trains with the body every
round, stays on the client and is never uploaded; the server averages the body. A new client
gets the global body with a head trained FINETUNE_EPOCHS (body frozen) from the global head."""

import constant_rules
import personalization


class FedPer(personalization.Method):
    """Shared body, a head of each client's own trained with it."""

    PAPER = "Arivazhagan et al. 2019, Federated Learning with Personalization Layers"
    CONSTANTS = {"FINETUNE_EPOCHS": constant_rules.integer(1)}
    OWN = "head"
    UPLOADS = "body"
    PERSONAL = True

    def trainer_recipes(self):
        # A new client trains its own part with the shared part frozen.
        return {"adapt": {"epochs": self.option("FINETUNE_EPOCHS"),
                          "frozen": self.uploaded_layers}}, ()


PLUGIN = FedPer
