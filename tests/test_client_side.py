"""Tests of local training: the compiled fast path against a plain Keras `model.fit`."""

import numpy as np
import pytest
import keras

import Client_side
import Server_side

LEARNING_RATE = 0.05


def dropout_state(model):
    return model.layers[-2].seed_generator.state


@pytest.fixture(scope="module")
def tiny_client(fashion_mnist):
    """70 real training images (last batch of 32 is partial) and a trainer over them."""
    x_train, y_train = fashion_mnist[0][:70], fashion_mnist[1][:70]
    return x_train, y_train


def fit_reference(initial_weights, x_train, y_train, orders, momentum, batch_size, seed_state):
    """Train with Keras' own fit on the same per-epoch orders and dropout seed."""
    model = Server_side.create_model()
    model.set_weights(initial_weights)
    dropout_state(model).assign(seed_state)
    model.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=momentum),
                  loss="sparse_categorical_crossentropy")
    for order in orders:
        history = model.fit(x_train[order], y_train[order], batch_size=batch_size, epochs=1,
                            shuffle=False, verbose=0)
    return model.get_weights(), history.history["loss"][-1]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fast_path_equals_model_fit(tiny_client, momentum):
    x_train, y_train = tiny_client
    keras.utils.set_random_seed(1)
    initial_weights = Server_side.create_model().get_weights()
    trainer = Client_side.LocalTrainer(Server_side.create_model(), x_train, y_train,
                                       LEARNING_RATE, momentum, batch_size=32, local_epochs=2)
    seed_state = dropout_state(trainer.model).numpy()
    orders = trainer.epoch_orders(np.arange(70), np.random.default_rng(5))
    update = trainer.train(initial_weights, np.arange(70), np.random.default_rng(5))
    expected_weights, expected_loss = fit_reference(initial_weights, x_train, y_train, orders,
                                                    momentum, 32, seed_state)
    assert update.num_examples == 70
    for fast, reference in zip(update.weights, expected_weights):
        np.testing.assert_allclose(fast, reference, rtol=1e-4, atol=1e-5)
    assert update.train_loss == pytest.approx(expected_loss, rel=1e-4)
    moved = sum(np.abs(new - old).sum() for new, old in zip(update.weights, initial_weights))
    assert moved > 0.1, "training changed nothing"


def test_each_client_starts_with_fresh_momentum(tiny_client):
    x_train, y_train = tiny_client
    keras.utils.set_random_seed(2)
    initial_weights = Server_side.create_model().get_weights()
    trainer = Client_side.LocalTrainer(Server_side.create_model(), x_train, y_train,
                                       LEARNING_RATE, 0.9, batch_size=16, local_epochs=1)
    seed_state = dropout_state(trainer.model).numpy()
    first = trainer.train(initial_weights, np.arange(40), np.random.default_rng(0))
    dropout_state(trainer.model).assign(seed_state)
    second = trainer.train(initial_weights, np.arange(40), np.random.default_rng(0))
    for layer_first, layer_second in zip(first.weights, second.weights):
        np.testing.assert_array_equal(layer_first, layer_second)


def test_clients_of_any_size_share_one_trace(tiny_client):
    x_train, y_train = tiny_client
    trainer = Client_side.LocalTrainer(Server_side.create_model(), x_train, y_train,
                                       LEARNING_RATE, 0.0, batch_size=8, local_epochs=1)
    weights = trainer.model.get_weights()
    rng = np.random.default_rng(0)
    for size in (5, 8, 33, 70):
        assert trainer.train(weights, np.arange(size), rng).num_examples == size
    assert trainer._train.experimental_get_tracing_count() == 1


def test_local_training_lowers_the_training_loss(fashion_mnist):
    x_train, y_train = fashion_mnist[0][:2000], fashion_mnist[1][:2000]
    keras.utils.set_random_seed(0)
    trainer = Client_side.LocalTrainer(Server_side.create_model(), x_train, y_train,
                                       0.05, 0.0, batch_size=32, local_epochs=3)
    weights = trainer.model.get_weights()
    one_epoch = Client_side.LocalTrainer(Server_side.create_model(), x_train, y_train,
                                         0.05, 0.0, batch_size=32, local_epochs=1)
    first_epoch_loss = one_epoch.train(weights, np.arange(2000), np.random.default_rng(0))
    third_epoch_loss = trainer.train(weights, np.arange(2000), np.random.default_rng(0))
    assert third_epoch_loss.train_loss < 0.8 * first_epoch_loss.train_loss
