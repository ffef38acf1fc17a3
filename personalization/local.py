"""Local training alone, no federation: each client trains only its own model, from the common
initial weights, when selected; nothing is uploaded. The lower reference of pFL tables. A client
never trained gets FINETUNE_EPOCHS of training from the (initial) global model."""

import constant_rules
import personalization


class Local(personalization.Method):
    """Every client's own model, trained on its own data only."""

    PAPER = "the local-training reference of the pFL benchmarks (e.g. PFLlib, FL-bench)"
    CONSTANTS = {"FINETUNE_EPOCHS": constant_rules.integer(1)}
    OWN = "model"
    UPLOADS = None
    PERSONAL = True

    def trainer_recipes(self):
        return {"adapt": {"epochs": self.option("FINETUNE_EPOCHS")}}, ()


PLUGIN = Local
