"""NIID-Bench's CNN for MNIST-like data (Li, Diao, Chen and He 2022, "Federated Learning on
Non-IID Data Silos: An Experimental Study"; SimpleCNNMNIST in their model.py): two 5x5
convolutions of 6 and 16 channels, each followed by 2x2 max pooling, then fully connected
layers of 120 and 84 ReLU units and a softmax layer (LeNet-5-style); 44,426 weights at 28x28
("valid" padding, as their PyTorch code)."""

import keras

import models

PAPER = "Li et al. 2022 (NIID-Bench), CNN"
# The softmax layer's kernel and bias.
HEAD_LAYERS = 2


def build():
    """Build NIID-Bench's CNN."""
    return models.classifier(*models.conv_pool(6, 5), *models.conv_pool(16, 5),
                             keras.layers.Flatten(), keras.layers.Dense(120, activation="relu"),
                             keras.layers.Dense(84, activation="relu"))
