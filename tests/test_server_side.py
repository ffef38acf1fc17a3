"""Tests of the server: model, client sampling, FedAvg and evaluation."""

import math

import numpy as np
import pytest
import keras

import Server_side


def test_create_model_is_the_seed_cnn():
    model = Server_side.create_model()
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dropout", "Dense"]
    # 3*3*1*32+32 + 3*3*32*64+64 + 5*5*64*10+10
    assert model.count_params() == 320 + 18496 + 16010
    assert model.output_shape == (None, 10)


@pytest.mark.parametrize("num_clients, fraction, expected", [
    (100, 0.3, 30), (10, 0.01, 1), (7, 1.0, 7), (3, 0.5, 2)])
def test_select_clients_draws_round_of_c_times_k_distinct_clients(num_clients, fraction, expected):
    selected = Server_side.select_clients(num_clients, fraction, np.random.default_rng(0))
    assert len(selected) == expected == len(set(selected.tolist()))
    assert selected.min() >= 0 and selected.max() < num_clients
    again = Server_side.select_clients(num_clients, fraction, np.random.default_rng(0))
    np.testing.assert_array_equal(selected, again)


def test_fedavg_weights_by_example_count_by_hand():
    """Client A (1 example) holds 0, client B (3 examples) holds 4: (1*0 + 3*4) / 4 = 3.

    An unweighted mean would give 2, so this fails for it.
    """
    client_a = [np.zeros((2, 2), np.float32), np.array([1.0], np.float32)]
    client_b = [np.full((2, 2), 4.0, np.float32), np.array([5.0], np.float32)]
    average = Server_side.fedavg([client_a, client_b], [1, 3])
    np.testing.assert_array_equal(average[0], np.full((2, 2), 3.0))
    np.testing.assert_array_equal(average[1], [4.0])
    assert all(layer.dtype == np.float32 for layer in average)


def test_fedavg_matches_numpy_weighted_average():
    rng = np.random.default_rng(3)
    shapes = [(3, 3, 1, 4), (4,), (10, 2)]
    clients = [[rng.normal(size=shape).astype(np.float32) for shape in shapes] for _ in range(5)]
    sizes = [10, 600, 35, 1, 2000]
    average = Server_side.fedavg(clients, sizes)
    for layer, shape in enumerate(shapes):
        expected = np.average(np.stack([client[layer] for client in clients]), axis=0,
                              weights=sizes)
        np.testing.assert_allclose(average[layer], expected, rtol=1e-6, atol=1e-7)
        assert average[layer].shape == shape


def test_fedavg_of_one_client_is_that_client():
    client = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    np.testing.assert_array_equal(Server_side.fedavg([client], [17])[0], client[0])


def test_fedavg_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="one example count per client"):
        Server_side.fedavg([[np.zeros(1)]], [1, 2])


def test_cross_entropy_of_uniform_outputs_is_log_ten():
    probabilities = np.full((4, 10), 0.1)
    assert Server_side.cross_entropy(probabilities, np.array([0, 3, 9, 2])) == pytest.approx(
        math.log(10))


def test_cross_entropy_clips_zero_probability_like_keras():
    probabilities = np.eye(10)[[1, 1]]
    loss = Server_side.cross_entropy(probabilities, np.array([1, 0]))
    assert loss == pytest.approx((-math.log(1 - 1e-7) - math.log(1e-7)) / 2)


def test_evaluator_on_a_model_with_known_outputs():
    """A zero kernel makes the softmax output softmax(bias) for every image.

    With bias = log p, class 2 gets p = 0.5 and the others 0.5/9: labels [2, 2, 5, 2] give
    accuracy 3/4 and loss (3 * -log 0.5 - log(0.5/9)) / 4.
    """
    model = keras.Sequential([keras.Input(shape=(28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    probabilities = np.full(10, 0.5 / 9)
    probabilities[2] = 0.5
    weights = [np.zeros((784, 10), np.float32), np.log(probabilities).astype(np.float32)]
    images = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    labels = np.array([2, 2, 5, 2])
    loss, accuracy = Server_side.Evaluator(model, images, labels)(weights)
    assert accuracy == 0.75
    assert loss == pytest.approx((3 * -math.log(0.5) - math.log(0.5 / 9)) / 4, rel=1e-5)


def test_evaluator_matches_keras_evaluate(fashion_mnist):
    """Same loss and accuracy as Keras' own evaluate with a correctly configured loss."""
    x_test, y_test = fashion_mnist[2][:2000], fashion_mnist[3][:2000]
    keras.utils.set_random_seed(0)
    model = Server_side.create_model()
    loss, accuracy = Server_side.Evaluator(model, x_test, y_test)(model.get_weights())
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    keras_loss, keras_accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    assert loss == pytest.approx(keras_loss, rel=1e-4)
    assert accuracy == pytest.approx(keras_accuracy, abs=1e-6)
