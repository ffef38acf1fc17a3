"""The personalization plug-ins added through the seam, on real data: which part of the model
each shares and keeps, checked in the checkpoint, and resuming bit for bit."""

import numpy as np
import pytest

import Main
import Server_side
import Utils
from conftest import run_whole_and_resumed, write_config
from test_algorithms import assert_same_checkpoint_arrays, resumed_equals_straight
from test_reliability import read_history, without_seconds

SETTING = {"NUM_CLIENTS": 20, "CLIENT_FRACTION": 0.5, "ROUNDS": 3, "DISTRIBUTION": "noniid_bi",
           "CLASSES_PER_CLIENT": 2, "SEED": 5, "LOCAL_TEST_SHARE": 0.25}


def initial_weights(seed):
    """The global model's weights before round 1, drawn as Main.build_federation draws them."""
    Utils.seed_everything(seed)
    return Server_side.create_model().get_weights()


def finished_run(tmp_path, method):
    path = write_config(tmp_path / f"{method}.csv", OUTPUT_DIR=tmp_path / method,
                        PERSONALIZATION=method, **SETTING)
    assert Main.main(["-c", "-f", str(path)]) == 0
    (run,) = (tmp_path / method).iterdir()
    with np.load(run / "checkpoint.npz") as checkpoint:
        arrays = {name: checkpoint[name] for name in checkpoint.files}
    return read_history(run), arrays


def global_layers(arrays, count):
    return [arrays[f"global_{index}"] for index in range(count)]


@pytest.mark.slow
def test_lgfedavg_shares_the_head_and_each_client_keeps_its_body(tmp_path, tenth_of_the_data):
    """The server never receives a body: the global body stays the initial one while the head
    moves; each trained client keeps body-shaped arrays of its own; and own models serve their
    clients better than the global one (a body trained on 2 classes, shared head)."""
    start = initial_weights(SETTING["SEED"])
    rows, arrays = finished_run(tmp_path, "lgfedavg")
    weights, body = global_layers(arrays, len(start)), len(start) - 2
    for index in range(body):
        np.testing.assert_array_equal(weights[index], start[index])
    assert any(not np.array_equal(weights[index], start[index]) for index in (body, body + 1))
    own = [arrays[f"client_own_{1 + index}"] for index in range(body)]
    assert [layer.shape[1:] for layer in own] == [layer.shape for layer in start[:body]]
    assert len(arrays["client_own_0"]) > 0
    assert float(rows[-1]["personal_pooled"]) > float(rows[-1]["local_pooled"])


@pytest.mark.slow
def test_fedbabu_keeps_the_head_at_its_initialization_and_fine_tunes_to_serve(
        tmp_path, tenth_of_the_data):
    """During federation the head is frozen: the global head is the initial one bit for bit
    while the body moves; nothing is kept per client; fine-tuning serves clients better than
    the global model with its random head."""
    start = initial_weights(SETTING["SEED"])
    rows, arrays = finished_run(tmp_path, "fedbabu")
    weights, body = global_layers(arrays, len(start)), len(start) - 2
    for index in (body, body + 1):
        np.testing.assert_array_equal(weights[index], start[index])
    assert any(not np.array_equal(weights[index], start[index]) for index in range(body))
    assert not any(name.startswith("client_") for name in arrays)
    assert float(rows[-1]["personal_pooled"]) > float(rows[-1]["local_pooled"])


@pytest.mark.slow
def test_lgfedavg_resumes_bit_for_bit(tmp_path, tenth_of_the_data):
    setting = {**SETTING, "PERSONALIZATION": "lgfedavg", "ROUNDS": 4}
    run_whole_and_resumed(tmp_path, setting, stop_after=2)
    (whole,) = (tmp_path / "whole").iterdir()
    (parts,) = (tmp_path / "parts").iterdir()
    assert without_seconds(read_history(parts)) == without_seconds(read_history(whole))
    assert_same_checkpoint_arrays(whole, parts)


@pytest.mark.parametrize("method", ["lgfedavg", "fedbabu"])
def test_a_method_sharing_part_of_the_model_refuses_whole_model_algorithms(tmp_path, capsys,
                                                                           method):
    from conftest import assert_refused

    assert_refused(tmp_path, capsys, f"PERSONALIZATION {method} needs ALGORITHM one of",
                   PERSONALIZATION=method, ALGORITHM="scaffold", LOCAL_TEST_SHARE=0.25)


def plain_gradients(model_name, images, labels):
    """gradient(weights, rows): the mean cross-entropy's gradient on those rows, by a plain
    GradientTape on a model of its own (the reference the step rules are checked against)."""
    import keras
    import tensorflow as tf

    reference = Server_side.create_model(model_name)

    def gradient(weights, rows):
        reference.set_weights(weights)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels[rows], reference(images[rows], training=True)))
        return [value.numpy() for value in tape.gradient(loss, reference.trainable_variables)]

    return gradient


def batches_of(rng_seed, size, batch_size, epochs):
    """The minibatches train_many draws from np.random.default_rng(rng_seed): after the
    dropout seed, one permutation an epoch, cut into batches."""
    rng = np.random.default_rng(rng_seed)
    rng.integers(2**31)
    return [order[start:start + batch_size] for order in
            [rng.permutation(size) for _ in range(epochs)]
            for start in range(0, size, batch_size)]


def step(weights, gradients, rate):
    return [layer - rate * gradient for layer, gradient in zip(weights, gradients)]


def test_apfl_steps_by_hand(fashion_mnist):
    """Two epochs of batches of 4 (2NN, no dropout): each step w <- w - eta grad f(w) and
    v <- v - eta alpha grad f(alpha v + (1 - alpha) w), with the current local w, both
    gradients taken before either moves (Deng et al. 2020, Algorithm 1)."""
    import keras

    import Client_side
    from personalization import apfl

    images, labels = fashion_mnist[0][:12], fashion_mnist[1][:12]
    keras.utils.set_random_seed(4)
    shared = Server_side.create_model("mcmahan_2nn").get_weights()
    own = Server_side.create_model("mcmahan_2nn").get_weights()
    alpha, rate = 0.3, 0.1
    trainer = Client_side.LocalTrainer(Server_side.create_model("mcmahan_2nn"), images, labels,
                                       rate, 0.0, 4, 2, step=apfl.MixtureStep(alpha))
    (result,) = trainer.train_many(shared, [np.arange(12)], [np.random.default_rng(0)],
                                   companions=[own])
    gradient = plain_gradients("mcmahan_2nn", images, labels)
    w, v = shared, own
    for rows in batches_of(0, 12, 4, 2):
        mixture = [alpha * mine + (1 - alpha) * theirs for mine, theirs in zip(v, w)]
        w, v = (step(w, gradient(w, rows), rate),
                step(v, gradient(mixture, rows), rate * alpha))
    for got, wanted in zip(result.new_weights + result.companion, w + v, strict=True):
        np.testing.assert_allclose(got, wanted, rtol=1e-4, atol=1e-6)


def test_apfl_serves_the_mixture_with_the_global_model_and_the_global_model_alone_to_a_new_client():
    """alpha v + (1 - alpha) w_global (alpha 0.2, so swapping alpha and 1 - alpha fails); a
    client without v gets w_global."""
    from personalization import apfl

    method = apfl.APFL(Server_side.ServerSettings.from_config(
        {**Main.default_config(), "APFL_ALPHA": 0.2, "PERSONALIZATION": "apfl"}), 2)
    shared = [np.full(3, 1.0), np.full(2, -1.0)]
    own = [np.full(3, 6.0), np.full(2, 4.0)]
    served = method.personal_models({}, shared, [0, 1], [None, None], [own, None], 1)
    np.testing.assert_allclose(served[0][0], np.full(3, 0.2 * 6 + 0.8 * 1))
    np.testing.assert_allclose(served[0][1], np.full(2, 0.2 * 4 - 0.8 * 1))
    assert served[1] is shared


@pytest.mark.slow
def test_apfl_keeps_a_personal_model_serves_the_mixture_and_resumes_bit_for_bit(
        tmp_path, tenth_of_the_data):
    """Each trained client keeps a whole model v; its clients are served
    alpha v + (1 - alpha) w_global, better than the global model on their two classes; the
    global model is FedAvg's (w is trained as FedAvg trains it: on a model without dropout,
    whose masks v's extra forward pass would otherwise draw differently); stopped after round
    2 and resumed, the run equals the straight one."""
    setting = {**SETTING, "PERSONALIZATION": "apfl", "APFL_ALPHA": 0.5, "ROUNDS": 4,
               "LEARNING_RATE": 0.05, "MODEL": "mcmahan_2nn"}
    rows = resumed_equals_straight(tmp_path, setting)
    (whole,) = (tmp_path / "whole").iterdir()
    with np.load(whole / "checkpoint.npz") as checkpoint:
        kept = [name for name in checkpoint.files if name.startswith("client_own_")]
        assert len(kept) == 1 + 6  # ids, then v's layers (the 2NN's three kernels and biases)
    assert float(rows[-1]["personal_pooled"]) > float(rows[-1]["local_pooled"]) + 0.05
    fedavg = write_config(tmp_path / "fedavg.csv", OUTPUT_DIR=tmp_path / "fedavg",
                          **{**setting, "PERSONALIZATION": "none"})
    assert Main.main(["-c", "-f", str(fedavg)]) == 0
    (plain,) = (tmp_path / "fedavg").iterdir()
    assert [row["test_accuracy"] for row in read_history(plain)] == [
        row["test_accuracy"] for row in rows]


@pytest.mark.parametrize("constants, message", [
    ({"APFL_ALPHA": 1.5}, "APFL_ALPHA must be a number in [0, 1], got 1.5"),
    ({"MODEL": "mcmahan_cnn", "NUM_CLIENTS": 60000},
     "PERSONALIZATION apfl would keep up to 371.8 GiB of client state for 60000 clients"),
    ({"ASYNC_BUFFER": 5, "DEVICE_HETEROGENEITY": "lognormal"},
     "ASYNC_BUFFER > 0 (FedBuff) needs PERSONALIZATION one of")])
def test_apfl_refuses_what_it_cannot_combine_with(tmp_path, capsys, constants, message):
    from conftest import assert_refused

    assert_refused(tmp_path, capsys, message, PERSONALIZATION="apfl", LOCAL_TEST_SHARE=0.25,
                   **constants)


def test_perfedavg_steps_by_hand(fashion_mnist):
    """One epoch of batches of 5, 5 and 2 (2NN, no dropout) of first-order Per-FedAvg
    (Fallah et al. 2020, Algorithm 1): each step w <- w - beta grad f(w - alpha grad f(w, D),
    D'), D and D' the halves of the batch (of 5: they share its middle sample; of 2: one
    sample each)."""
    import keras

    import Client_side
    from personalization import perfedavg

    images, labels = fashion_mnist[0][:12], fashion_mnist[1][:12]
    keras.utils.set_random_seed(4)
    w = Server_side.create_model("mcmahan_2nn").get_weights()
    alpha, beta = 0.3, 0.1
    trainer = Client_side.LocalTrainer(Server_side.create_model("mcmahan_2nn"), images, labels,
                                       beta, 0.0, 5, 1, step=perfedavg.MetaStep(alpha))
    (result,) = trainer.train_many(w, [np.arange(12)], [np.random.default_rng(0)])
    gradient = plain_gradients("mcmahan_2nn", images, labels)
    for rows in batches_of(0, 12, 5, 1):
        half = len(rows)
        adapted = step(w, gradient(w, rows[:(half + 1) // 2]), alpha)
        w = step(w, gradient(adapted, rows[half // 2:]), beta)
    for got, wanted in zip(result.new_weights, w, strict=True):
        np.testing.assert_allclose(got, wanted, rtol=1e-4, atol=1e-6)


def test_perfedavg_adapts_with_one_step_at_alpha_on_a_batch_of_training_data(fashion_mnist):
    """A client is served w_global - alpha grad f(w_global, its first batch of B)."""
    import Client_side
    from personalization import perfedavg

    images, labels = fashion_mnist[0][:40], fashion_mnist[1][:40]
    config = {**Main.default_config(), "PERSONALIZATION": "perfedavg", "PERFEDAVG_ALPHA": 0.2,
              "MODEL": "mcmahan_2nn", "BATCH_SIZE": 8}
    method = perfedavg.PerFedAvg(Server_side.ServerSettings.from_config(config), 6)
    recipes, _ = method.trainer_recipes()
    adapt = Client_side.LocalTrainer.for_clients(
        Server_side.create_model("mcmahan_2nn"), images, labels,
        Client_side.ClientSettings.from_config(config), **recipes["adapt"])
    start = Server_side.create_model("mcmahan_2nn").get_weights()
    rows = np.arange(10, 40)
    (served,) = method.personal_models({"adapt": adapt}, start, [7], [rows], [None], 2)
    rng = Utils.rng(config["SEED"], "adaptation", 2, 7)  # the seed, then the epoch's order
    rng.integers(2**31)
    batch = rng.permutation(rows)[:8]
    expected = step(start, plain_gradients("mcmahan_2nn", images, labels)(start, batch), 0.2)
    for got, wanted in zip(served, expected, strict=True):
        np.testing.assert_allclose(got, wanted, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_perfedavg_keeps_nothing_and_one_step_of_adaptation_serves_better(
        tmp_path, tenth_of_the_data):
    """Nothing is kept per client; one step at alpha from the meta-trained global model serves
    clients of two classes better than the global model; a resumed run equals the straight
    one."""
    setting = {**SETTING, "PERSONALIZATION": "perfedavg", "PERFEDAVG_ALPHA": 0.05,
               "ROUNDS": 4, "LEARNING_RATE": 0.05}
    rows = resumed_equals_straight(tmp_path, setting)
    (whole,) = (tmp_path / "whole").iterdir()
    with np.load(whole / "checkpoint.npz") as checkpoint:
        assert not any(name.startswith("client_") for name in checkpoint.files)
    assert float(rows[-1]["personal_pooled"]) > float(rows[-1]["local_pooled"]) + 0.05


def test_perfedavg_refuses_a_step_of_adaptation_that_is_not_positive(tmp_path, capsys):
    from conftest import assert_refused

    assert_refused(tmp_path, capsys, "PERFEDAVG_ALPHA must be a number > 0, got 0",
                   PERSONALIZATION="perfedavg", LOCAL_TEST_SHARE=0.25, PERFEDAVG_ALPHA=0)
