"""FedRep (Collins et al. 2021, "Exploiting Shared Representations for Personalized Federated
Learning"): as FedPer, but each round the client's head trains HEAD_EPOCHS with the body frozen,
then the body LOCAL_EPOCHS with the head frozen; the body is uploaded and averaged by n."""

import constant_rules
import personalization
from personalization import fedper


class FedRep(fedper.FedPer):
    """FedPer's split, trained in two phases: head first, then body."""

    PAPER = ("Collins et al. 2021, Exploiting Shared Representations for Personalized "
             "Federated Learning (Algorithm 1)")
    CONSTANTS = {"FINETUNE_EPOCHS": constant_rules.integer(1),
                 "HEAD_EPOCHS": constant_rules.integer(1)}
    PARTIAL_WORK = False

    @classmethod
    def extra_epochs(cls, config):
        return config["HEAD_EPOCHS"]

    def trainer_recipes(self):
        body = self.parts["body"]
        return ({"adapt": {"epochs": self.option("FINETUNE_EPOCHS"), "frozen": body},
                 "head": {"epochs": self.option("HEAD_EPOCHS"), "frozen": body}},
                self.parts["head"])

    def before_training(self, trainers, global_weights, indices, rngs, starts):
        heads = trainers["head"].train_many(global_weights, indices, rngs, starts=starts)
        return [result.new_weights for result in heads]


PLUGIN = FedRep
