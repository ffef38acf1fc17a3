"""McMahan et al. 2017's CNN ("Communication-Efficient Learning of Deep Networks from
Decentralized Data", section 3): two 5x5 convolutions of 32 and 64 channels, each followed by
2x2 max pooling, a fully connected layer of 512 ReLU units and a softmax layer; 1,663,370
weights at 28x28 (the paper's count), which needs "same" padding."""

import keras

import models

PAPER = "McMahan et al. 2017, CNN"
# The softmax layer's kernel and bias.
HEAD_LAYERS = 2


def build():
    """Build McMahan et al.'s CNN."""
    return models.classifier(*models.conv_pool(32, 5, "same"), *models.conv_pool(64, 5, "same"),
                             keras.layers.Flatten(), keras.layers.Dense(512, activation="relu"))
