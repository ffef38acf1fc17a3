"""McMahan et al. 2017's 2NN (section 3): a multilayer perceptron with two hidden layers of 200
ReLU units and a softmax layer; 199,210 weights."""

import keras

import models

PAPER = "McMahan et al. 2017, 2NN"
# The softmax layer's kernel and bias.
HEAD_LAYERS = 2


def build():
    """Build McMahan et al.'s 2NN."""
    return models.classifier(keras.layers.Flatten(), keras.layers.Dense(200, activation="relu"),
                             keras.layers.Dense(200, activation="relu"))
