"""FedBABU (Oh et al. 2022, "FedBABU: Towards Enhanced Representation for Federated Image
Classification", Algorithm 1): during federation the head (the model's last HEAD_LAYERS arrays)
stays frozen at its random initialization; clients train and upload the body alone, which the
server averages. For evaluation each client fine-tunes the whole global model (body and head)
for FINETUNE_EPOCHS on its local train data, afresh each time; nothing is kept."""

import constant_rules
import personalization


class FedBABU(personalization.Method):
    """Body only during federation (head frozen at its initialization), fine-tuned to serve."""

    PAPER = ("Oh et al. 2022, FedBABU: Towards Enhanced Representation for Federated Image "
             "Classification (Algorithm 1)")
    CONSTANTS = {"FINETUNE_EPOCHS": constant_rules.integer(1)}
    UPLOADS = "body"
    PERSONAL = True
    ADAPTS_EACH_EVALUATION = True

    def trainer_recipes(self):
        return {"adapt": {"epochs": self.option("FINETUNE_EPOCHS")}}, self.parts["head"]


PLUGIN = FedBABU
