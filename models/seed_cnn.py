"""The seed's CNN (the default): two 3x3 convolutions of 32 and 64 filters, each with 2x2
max pooling, dropout 0.5 and a softmax layer; 34,826 weights."""

import keras

import models

PAPER = "the seed project's CNN"
# The last Dense layer's kernel and bias.
HEAD_LAYERS = 2


def build():
    """Build the seed's CNN."""
    return models.classifier(*models.conv_pool(32, 3), *models.conv_pool(64, 3),
                             keras.layers.Flatten(), keras.layers.Dropout(0.5))
