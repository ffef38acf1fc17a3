"""PFLlib's FedAvgCNN (Zhang et al., "PFLlib: A Beginner-Friendly and Comprehensive Personalized
Federated Learning Library and Benchmark", JMLR 2025; flcore/trainmodel/models.py): McMahan et
al.'s CNN without padding, so 28x28 shrinks to 4x4x64 = 1,024 features before the 512-unit
layer; 582,026 weights (McMahan et al.'s: 1,663,370). PFLlib's FedPer and FedRep take its last
layer as the head."""

import keras

import models

PAPER = "PFLlib, FedAvgCNN"
# The softmax layer's kernel and bias.
HEAD_LAYERS = 2


def build():
    """Build PFLlib's FedAvgCNN."""
    return models.classifier(*models.conv_pool(32, 5), *models.conv_pool(64, 5),
                             keras.layers.Flatten(), keras.layers.Dense(512, activation="relu"))
