"""The models a run can train (MODEL): one module per architecture, found by its file name.

Each module declares PAPER (where the architecture comes from), HEAD_LAYERS (how many of the
model's last weight arrays are the head, the part FedPer and FedRep keep on each client) and
`build()`, a Keras model for 28x28x1 images and 10 classes whose weights are all trainable
(one compiled training path trains them all: Client_side.LocalTrainer). Adding a model is one
new file here; nothing else names it.
"""

import importlib
import pkgutil

import keras

NAMES = tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)))
# The seed's CNN: the model of every run before MODEL existed.
DEFAULT = "seed_cnn"


def get(name):
    """The module of model `name`; ValueError listing the models when there is none."""
    if name not in NAMES:
        raise ValueError(f"MODEL must be one of {', '.join(NAMES)}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def build(name):
    """A new Keras model of architecture `name`, its weights freshly initialised."""
    return get(name).build()


def head_layers(name):
    """How many of the model's last weight arrays form its head."""
    return get(name).HEAD_LAYERS


def classifier(*layers):
    """A model for 28x28x1 images: `layers`, then the 10-class softmax layer (the head)."""
    return keras.Sequential([keras.Input(shape=(28, 28, 1)), *layers,
                             keras.layers.Dense(10, activation="softmax")])


def conv_pool(filters, kernel_size, padding="valid"):
    """A ReLU convolution of kernel_size x kernel_size, then 2x2 max pooling."""
    return [keras.layers.Conv2D(filters, kernel_size=(kernel_size, kernel_size), padding=padding,
                                activation="relu"),
            keras.layers.MaxPooling2D(pool_size=(2, 2))]
