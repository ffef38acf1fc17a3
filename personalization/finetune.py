"""FedAvg-FT: before each evaluation every client fine-tunes a copy of the global model for
FINETUNE_EPOCHS on its local train data; nothing is kept or uploaded beyond FedAvg's (the
baseline of the pFL benchmarks, e.g. Wang et al. 2019)."""

import constant_rules
import personalization


class FineTune(personalization.Method):
    """The global model, fine-tuned afresh by each client before it is evaluated."""

    PAPER = "Wang et al. 2019, Federated Evaluation of On-device Personalization"
    CONSTANTS = {"FINETUNE_EPOCHS": constant_rules.integer(1)}
    PERSONAL = True
    ADAPTS_EACH_EVALUATION = True

    def trainer_recipes(self):
        return {"adapt": {"epochs": self.option("FINETUNE_EPOCHS")}}, ()


PLUGIN = FineTune
