"""Tests of local training: the compiled fast path against a plain Keras `model.fit`."""

import numpy as np
import pytest
import keras

import attacks
import centralized_baseline
import client_host
import Client_side
import client_state
import Server_side
import upload_format
from algorithms import scaffold

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
    # train() draws the dropout seed first, then the per-epoch orders, from its generator.
    draws = np.random.default_rng(5)
    seed_state = np.array([draws.integers(2**31), 0])
    orders = trainer.epoch_orders(np.arange(70), draws)
    update = trainer.train(initial_weights, np.arange(70), np.random.default_rng(5))
    expected_weights, expected_loss = fit_reference(initial_weights, x_train, y_train, orders,
                                                    momentum, 32, seed_state)
    # The same client trained inside a multi-client call, after a client of another size.
    _, in_call = trainer.train_many(initial_weights, [np.arange(33), np.arange(70)],
                                    [np.random.default_rng(9), np.random.default_rng(5)])
    assert update.num_examples == in_call.num_examples == 70
    for fast, grouped, reference in zip(update.new_weights, in_call.new_weights, expected_weights):
        np.testing.assert_allclose(fast, reference, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(grouped, fast)
    assert update.train_loss == pytest.approx(expected_loss, rel=1e-4)
    moved = sum(np.abs(new - old).sum() for new, old in zip(update.new_weights, initial_weights))
    assert moved > 0.1, "training changed nothing"


MANY_CLIENT_SETTINGS = {  # (momentum, batch size, epochs, FedProx mu, SCAFFOLD corrections)
    "sgd": (0.0, 32, 1, 0.0, False),
    "momentum_two_epochs_fedprox": (0.9, 8, 2, 0.1, False),
    "fedsgd_full_batch": (0.0, 0, 1, 0.0, False),
    "scaffold_momentum": (0.5, 16, 2, 0.0, True),
}


@pytest.mark.parametrize("setting", MANY_CLIENT_SETTINGS)
def test_many_clients_in_one_call_equal_each_trained_alone(tiny_client, setting):
    momentum, batch_size, epochs, prox_mu, scaffold = MANY_CLIENT_SETTINGS[setting]
    x_train, y_train = tiny_client
    keras.utils.set_random_seed(3)
    trainer = Client_side.LocalTrainer(Server_side.create_model(), x_train, y_train,
                                       LEARNING_RATE, momentum, batch_size, epochs, prox_mu)
    weights = trainer.model.get_weights()
    rows = np.random.default_rng(4)
    clients = [rows.choice(70, size, replace=False) for size in (1, 5, 32, 33, 70, 6)]
    corrections = ([random_weights(trainer, seed, scale=0.5) for seed in range(len(clients))]
                   if scaffold else [None] * len(clients))
    together = trainer.train_many(weights, clients,
                                  [np.random.default_rng(client) for client in range(6)],
                                  corrections if scaffold else None)
    for client, (indices, grouped) in enumerate(zip(clients, together)):
        alone = trainer.train(weights, indices, np.random.default_rng(client),
                              corrections[client])
        assert (grouped.num_examples, grouped.num_steps) == (alone.num_examples,
                                                             alone.num_steps)
        assert grouped.train_loss == alone.train_loss
        for layer_grouped, layer_alone in zip(grouped.new_weights, alone.new_weights):
            np.testing.assert_array_equal(layer_grouped, layer_alone)
    assert not np.array_equal(together[2].new_weights[0], together[3].new_weights[0])


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
    for layer_first, layer_second in zip(first.new_weights, second.new_weights):
        np.testing.assert_array_equal(layer_first, layer_second)


def test_clients_of_any_size_share_one_trace(tiny_client):
    x_train, y_train = tiny_client
    trainer = Client_side.LocalTrainer(Server_side.create_model(), x_train, y_train,
                                       LEARNING_RATE, 0.0, batch_size=8, local_epochs=1)
    weights = trainer.model.get_weights()
    rng = np.random.default_rng(0)
    for size in (5, 8, 33, 70):
        assert trainer.train(weights, np.arange(size), rng).num_examples == size
    assert trainer._train_clients.experimental_get_tracing_count() == 1


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


def tiny_trainer(x_train, y_train, learning_rate=0.1, prox_mu=0.0, batch_size=0):
    """A dropout-free softmax regression, so every gradient is deterministic."""
    model = keras.Sequential([keras.Input(shape=(28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    return Client_side.LocalTrainer(model, x_train, y_train, learning_rate, 0.0, batch_size,
                                    local_epochs=1, prox_mu=prox_mu)


def random_weights(trainer, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    return [(scale * rng.normal(size=variable.shape)).astype(np.float32)
            for variable in trainer.model.trainable_variables]


def gradients_at(trainer, weights, anchor, images, labels):
    trainer.model.set_weights(weights)
    _, gradients = trainer.loss_and_gradients(images, labels, anchor)
    return [gradient.numpy() for gradient in gradients]


def test_fedprox_gradient_is_plain_gradient_plus_mu_times_distance(tiny_client):
    x_train, y_train = tiny_client
    plain, proximal = tiny_trainer(x_train, y_train), tiny_trainer(x_train, y_train, prox_mu=0.3)
    weights, anchor = random_weights(plain, 0), random_weights(plain, 1)
    images, labels = x_train[:16], y_train[:16]
    plain_gradients = gradients_at(plain, weights, anchor, images, labels)
    proximal_gradients = gradients_at(proximal, weights, anchor, images, labels)
    for plain_layer, proximal_layer, own, start in zip(plain_gradients, proximal_gradients,
                                                       weights, anchor):
        np.testing.assert_allclose(proximal_layer, plain_layer + 0.3 * (own - start),
                                   rtol=1e-5, atol=1e-6)


def test_scaffold_step_applies_minus_lr_times_corrected_gradient(tiny_client):
    """With B = 0 (FedSGD) a client of 20 samples takes one step: y = x - lr * (g - c_i + c)."""
    x_train, y_train = tiny_client
    trainer = tiny_trainer(x_train[:20], y_train[:20], learning_rate=0.1, batch_size=0)
    start = random_weights(trainer, 2)
    correction = random_weights(trainer, 3, scale=0.5)  # c - c_i
    gradient = gradients_at(trainer, start, start, x_train[:20], y_train[:20])
    update = trainer.train(start, np.arange(20), np.random.default_rng(0), correction)
    assert update.num_steps == 1
    for new, old, grad, shift in zip(update.new_weights, start, gradient, correction):
        np.testing.assert_allclose(new, old - 0.1 * (grad + shift), rtol=1e-5, atol=1e-6)


def test_scaffold_client_variate_option_two_by_hand():
    """c_i+ = c_i - c + (x - y_i) / (a_i * lr) = [1, 2] - [0.5, 0.5] + [0.2, -0.2] / (2 * 0.1)."""
    new_variate = scaffold.client_variate(
        [np.array([1.0, 2.0])], [np.array([0.5, 0.5])], [np.array([1.0, 1.0])],
        [np.array([0.8, 1.2])], num_steps=2, learning_rate=0.1)
    np.testing.assert_allclose(new_variate[0], [1.5, 0.5], rtol=1e-6)


def local_momentum_sgd(start, gradient_at, steps, learning_rate, momentum):
    """Keras' SGD with momentum from a zero buffer: v = rho v - eta g; w = w + v."""
    weights, velocity = start.copy(), np.zeros_like(start)
    for _ in range(steps):
        velocity = momentum * velocity - learning_rate * gradient_at(weights)
        weights = weights + velocity
    return weights


def run_scaffold_on_quadratics(momentum, rounds=60, steps=20, learning_rate=0.01):
    """SCAFFOLD with the project's variate updates on f_i(w) = sum_j h_ij (w_j - b_ij)^2 / 2.

    Returns the distance of the global model to the minimizer of the mean objective, and the
    size of the server variate.
    """
    rng = np.random.default_rng(0)
    centers, curvatures = rng.normal(0, 3, (10, 5)), rng.uniform(0.5, 4, (10, 5))
    global_weights, server_variate = np.zeros(5), [np.zeros(5, np.float32)]
    memory = client_state.ClientMemory([(5,)])
    for _ in range(rounds):
        deltas, variate_deltas = [], []
        for client in range(10):
            own = memory.get(client)[0]
            correction = server_variate[0] - own
            new = local_momentum_sgd(
                global_weights,
                lambda w: curvatures[client] * (w - centers[client]) + correction,
                steps, learning_rate, momentum)
            variate = scaffold.client_variate(
                [own], server_variate, [global_weights], [new],
                upload_format.effective_steps(steps, momentum), learning_rate)
            memory.put(client, variate)
            deltas.append([new - global_weights])
            variate_deltas.append([variate[0] - own])
        global_weights = global_weights + Server_side.uniform_mean(deltas)[0]
        server_variate = scaffold.server_variate(server_variate, variate_deltas, 10)
    optimum = (curvatures * centers).sum(axis=0) / curvatures.sum(axis=0)
    return np.linalg.norm(global_weights - optimum), np.linalg.norm(server_variate[0])


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_scaffold_with_momentum_converges_on_heterogeneous_quadratics(momentum):
    """Dividing by K steps instead of the momentum-aware a_i made the variates (and the model)
    grow past 1e30 here at momentum 0.9."""
    distance, variate_norm = run_scaffold_on_quadratics(momentum)
    assert distance < 1e-3 and variate_norm < 100


def test_scaffold_variate_with_momentum_recovers_a_constant_gradient():
    """Under a constant gradient g (no correction), c_i+ = c_i - c + g exactly, with momentum."""
    gradient = np.array([0.5, -2.0])
    new = local_momentum_sgd(np.zeros(2), lambda w: gradient, 7, 0.1, 0.9)
    variate = scaffold.client_variate(
        [np.zeros(2)], [np.zeros(2)], [np.zeros(2)], [new], upload_format.effective_steps(7, 0.9),
        0.1)
    np.testing.assert_allclose(variate[0], gradient, rtol=1e-6)


ADVERSARIAL_CASES = [(compression, stochastic) for compression in ("none", "int8", "topk")
                     for stochastic in (False, True) if compression == "int8" or not stochastic]


@pytest.mark.parametrize("compression, stochastic_rounding", ADVERSARIAL_CASES)
def test_what_is_sent_under_dp_never_exceeds_the_clip_norm(compression, stochastic_rounding):
    """Clipping before adding a top-k residual uploaded about 3.7 S; int8 rounding slightly
    over S. Every decoded upload must stay within S, whatever residual the client holds."""
    rng = np.random.default_rng(0)
    clip_norm = 0.1
    for trial in range(20):
        delta = [rng.standard_normal((30, 20)) * 10 ** rng.uniform(-3, 2),
                 rng.standard_normal(7) * 10 ** rng.uniform(-3, 2)]
        residual = ([rng.standard_normal((30, 20)) * 50, rng.standard_normal(7) * 50]
                    if compression == "topk" else None)
        encoded, new_residual = client_host.prepare_upload(
            delta, residual, compression, rng, clip_norm, topk_fraction=0.05,
            stochastic_rounding=stochastic_rounding)
        sent = upload_format.decode_update(encoded, [(30, 20), (7,)])
        assert upload_format.update_norm(sent) <= clip_norm, (compression, trial)
        if compression == "topk":
            # Error feedback: what was not sent is kept, nothing is lost or invented.
            kept = upload_format.clip_update(delta, clip_norm)
            for layer_sent, layer_kept, old, new in zip(sent, kept, residual, new_residual):
                np.testing.assert_allclose(layer_sent + new, layer_kept + old, atol=1e-9)


def test_dp_upload_of_a_short_update_is_the_update():
    delta = [np.array([0.03, 0.04])]
    encoded, _ = client_host.prepare_upload(delta, None, "none", None, clip_norm=1.0)
    np.testing.assert_allclose(upload_format.decode_update(encoded, [(2,)])[0], delta[0], rtol=1e-7)


def test_client_memory_keeps_each_clients_arrays_and_round_trips_its_state():
    memory = client_state.ClientMemory([(2,), (1, 3)])
    assert [array.tolist() for array in memory.get(7)] == [[0, 0], [[0, 0, 0]]]
    memory.put(7, [np.array([1.0, 2.0]), np.ones((1, 3))])
    restored = client_state.ClientMemory([(2,), (1, 3)])
    restored.set_state(memory.get_state())
    np.testing.assert_array_equal(restored.get(7)[0], [1.0, 2.0])
    np.testing.assert_array_equal(restored.get(3)[0], [0.0, 0.0])


def test_fedsgd_batch_size_zero_takes_one_step_per_epoch(tiny_client):
    x_train, y_train = tiny_client
    trainer = tiny_trainer(x_train, y_train, batch_size=0)
    update = trainer.train(random_weights(trainer, 0), np.arange(70), np.random.default_rng(0))
    assert update.num_steps == 1 and update.num_examples == 70


def test_centralized_baseline_walks_reshuffled_passes_over_all_samples(tiny_client):
    x_train, y_train = tiny_client
    trainer = tiny_trainer(x_train, y_train, batch_size=10)
    baseline = centralized_baseline.CentralizedBaseline(trainer, random_weights(trainer, 0), 70,
                                                        seed=0)
    seen = np.concatenate([baseline._next(50), baseline._next(50), baseline._next(40)])
    # Two whole passes: every sample exactly twice.
    np.testing.assert_array_equal(np.bincount(seen, minlength=70), np.full(70, 2))
    before = [layer.copy() for layer in baseline.weights]
    baseline.train(30)
    assert any(not np.array_equal(old, new) for old, new in zip(before, baseline.weights))


def test_int8_round_trip_error_is_within_half_a_step():
    rng = np.random.default_rng(0)
    delta = [rng.normal(size=(3, 3, 1, 32)), rng.normal(size=10) * 1e-3, np.full(4, 0.25)]
    encoded = upload_format.encode_update(delta, "int8")
    decoded = upload_format.decode_update(encoded, [np.shape(layer) for layer in delta])
    for original, restored, layer in zip(delta, decoded, encoded):
        assert layer["codes"].dtype == np.uint8
        step = (original.max() - original.min()) / 255
        assert np.max(np.abs(original - restored)) <= step / 2 + 1e-7
    np.testing.assert_allclose(decoded[2], 0.25)  # a constant tensor survives exactly


def test_stochastic_int8_rounding_is_unbiased_and_within_one_step():
    rng = np.random.default_rng(1)
    delta = [np.linspace(-1, 1, 1000)]
    step = 2 / 255
    draws = np.stack([upload_format.decode_update(upload_format.encode_update(
        delta, "int8", rng, stochastic_rounding=True), [(1000,)])[0] for _ in range(400)])
    assert np.max(np.abs(draws - delta[0])) < step + 1e-7
    assert np.max(np.abs(draws.mean(axis=0) - delta[0])) < step / 5


def test_topk_keeps_exactly_k_largest_entries():
    layer = np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.05, 4.0, 0.0, 0.01, -0.02])
    encoded = upload_format.encode_update([layer], "topk", topk_fraction=0.3)
    assert len(encoded[0]["indices"]) == 3
    np.testing.assert_array_equal(upload_format.decode_update(encoded, [(10,)])[0],
                                  [0, -5.0, 0, 3.0, 0, 0, 4.0, 0, 0, 0])


def test_encoded_bytes_are_the_sizes_of_the_encoded_arrays():
    delta = [np.zeros((100, 10)), np.zeros(10)]
    assert upload_format.encoded_bytes(upload_format.encode_update(delta, "none")) == 4 * 1010
    # int8: one byte a value plus a float32 offset and step per tensor.
    assert upload_format.encoded_bytes(upload_format.encode_update(delta, "int8")) == 1010 + 2 * 8
    # topk 1%: ceil(10) and ceil(0.1) = 1 entries, 4 bytes of index and 4 of value each.
    assert upload_format.encoded_bytes(
        upload_format.encode_update(delta, "topk", topk_fraction=0.01)) == (10 + 1) * 8


def test_clipping_bounds_the_update_norm_and_keeps_short_updates():
    long_update = [np.full(4, 3.0), np.full(5, 4.0)]
    clipped = upload_format.clip_update(long_update, 2.0)
    assert upload_format.update_norm(clipped) == pytest.approx(2.0)
    np.testing.assert_allclose(clipped[0] / clipped[1][0], 0.75)  # direction kept
    short = [np.array([0.3, 0.4])]
    np.testing.assert_array_equal(upload_format.clip_update(short, 2.0)[0], short[0])


def test_attacks_flip_the_sign_or_replace_by_noise_of_the_same_norm():
    delta = [np.array([1.0, -2.0]), np.array([[0.5]])]
    flipped = attacks.attack_update(delta, "sign_flip", 3.0, None)
    np.testing.assert_array_equal(flipped[0], [-3.0, 6.0])
    noise = attacks.attack_update(delta, "gaussian", 1.0, np.random.default_rng(0))
    assert upload_format.update_norm(noise) == pytest.approx(upload_format.update_norm(delta))
    assert not np.allclose(noise[0], delta[0])


def test_client_deltas_are_float64_differences():
    deltas = client_host.client_deltas([[np.array([1.5], np.float32)]],
                                       [np.array([1.0], np.float32)])
    assert deltas[0][0].dtype == np.float64 and deltas[0][0][0] == 0.5


@pytest.mark.parametrize("num_clients, fraction, expected", [(10, 0.35, 4), (10, 0.25, 3),
                                                              (100, 0.2, 20), (5, 0.0, 0)])
def test_malicious_clients_are_the_share_rounded_half_up_like_the_selection(num_clients,
                                                                            fraction, expected):
    """0.35 * 10 is 3.4999999999999996 in binary: it counted 3 attackers while the selection,
    rounding the same way in words, took 4 clients."""
    attackers = attacks.malicious_clients(num_clients, fraction, seed=0)
    assert len(attackers) == expected and attackers <= set(range(num_clients))
    assert attackers == attacks.malicious_clients(num_clients, fraction, seed=0)


def test_a_baseline_round_without_samples_keeps_its_weights(tiny_client):
    """A round where no client returned trains the baseline on 0 samples: nothing changes
    (before, an empty sample stream raised in np.concatenate)."""
    x_train, y_train = tiny_client
    trainer = tiny_trainer(x_train, y_train, batch_size=10)
    baseline = centralized_baseline.CentralizedBaseline(trainer, random_weights(trainer, 0), 70,
                                                        seed=0)
    before = [layer.copy() for layer in baseline.weights]
    for after_layer, before_layer in zip(baseline.train(0), before, strict=True):
        np.testing.assert_array_equal(after_layer, before_layer)
    assert (baseline._pass, baseline._position) == (0, 0)


def test_the_contrastive_term_is_moons_formula(fashion_mnist):
    """l_con = -log(e^(s_g/t) / (e^(s_g/t) + e^(s_p/t))) with cosine similarities of the
    representations (the head's input) under the trained, global and previous weights."""
    import Server_side
    import Utils

    Utils.seed_everything(0)
    model = Server_side.create_model()
    images = fashion_mnist.x_train[:16]
    trainer = Client_side.LocalTrainer(model, images, fashion_mnist.y_train[:16], 0.1, 0.0, 16,
                                       1, contrastive=(1.0, 0.5))
    rng = np.random.default_rng(0)
    current = model.get_weights()
    positive, negative = ([layer + rng.normal(0, 0.05, layer.shape).astype(np.float32)
                           for layer in current] for _ in range(2))
    z, z_global, z_previous = (trainer.representation(weights, images).numpy()
                               for weights in (current, positive, negative))

    def cosine(a, b):
        return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    expected = np.mean(-np.log(np.exp(cosine(z, z_global) / 0.5) / (
        np.exp(cosine(z, z_global) / 0.5) + np.exp(cosine(z, z_previous) / 0.5))))
    loss = trainer.contrastive_loss(images, z, positive, negative).numpy()
    assert loss == pytest.approx(expected, rel=1e-5)
    # The global and the previous model alike: l_con = log 2, its minimum-free middle.
    same = trainer.contrastive_loss(images, z, positive, positive).numpy()
    assert same == pytest.approx(np.log(2), rel=1e-6)


class _SameStep:
    """A step rule that gives the companion the model's own gradients (and, with `COMPANION`
    False, is plain SGD through the rule's path)."""

    def __init__(self, companion):
        self.COMPANION = companion

    def gradients(self, trainer, images, labels, anchor, reference):
        loss, gradients = trainer.loss_and_gradients(images, labels, anchor, reference)
        return loss, gradients, gradients if self.COMPANION else None


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_step_rule_trains_a_companion_in_the_same_steps(tiny_client, momentum):
    """Through a step rule, SGD is the default trainer's bit for bit; a companion given the
    model's gradients from the same start ends where the model ends, and one started elsewhere
    moves by the same steps (plain SGD: the same displacement)."""
    x_train, y_train = tiny_client
    keras.utils.set_random_seed(1)
    start = Server_side.create_model().get_weights()
    elsewhere = [layer + 0.01 for layer in start]

    def trained(step, companions=None):
        trainer = Client_side.LocalTrainer(Server_side.create_model(), x_train, y_train,
                                           LEARNING_RATE, momentum, 32, 2, step=step)
        return trainer.train_many(start, [np.arange(70), np.arange(40)],
                                  [np.random.default_rng(3), np.random.default_rng(4)],
                                  companions=companions)

    plain, through_rule = trained(None), trained(_SameStep(False))
    paired = trained(_SameStep(True), companions=[start, elsewhere])
    for one, two, three in zip(plain, through_rule, paired, strict=True):
        assert two.companion is None and one.train_loss == two.train_loss == three.train_loss
        for layer, same, model_layer in zip(one.new_weights, two.new_weights,
                                            three.new_weights, strict=True):
            np.testing.assert_array_equal(layer, same)
            np.testing.assert_array_equal(layer, model_layer)
    for layer, companion in zip(paired[0].new_weights, paired[0].companion, strict=True):
        np.testing.assert_array_equal(layer, companion)
    for layer, companion, begin, other in zip(paired[1].new_weights, paired[1].companion, start,
                                              elsewhere, strict=True):
        np.testing.assert_allclose(companion - other, layer - begin, atol=1e-6)


def test_gradients_at_other_weights_leave_the_model_as_it_was(tiny_client):
    """`gradients_at` equals loss_and_gradients of a model holding those weights (a model
    without dropout, so both passes see the same function), and puts the weights back."""
    x_train, y_train = tiny_client
    keras.utils.set_random_seed(2)
    model, other = Server_side.create_model("mcmahan_2nn"), Server_side.create_model("mcmahan_2nn")
    trainer = Client_side.LocalTrainer(model, x_train, y_train, LEARNING_RATE, 0.0, 32, 1,
                                       prox_mu=0.1)
    before = model.get_weights()
    anchor = [layer * 0.5 for layer in other.get_weights()]
    loss, gradients = trainer.gradients_at(other.get_weights(), x_train[:32], y_train[:32],
                                           anchor)
    for layer, kept in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(layer, kept)
    model.set_weights(other.get_weights())
    expected_loss, expected = trainer.loss_and_gradients(x_train[:32], y_train[:32], anchor)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
    for gradient, wanted in zip(gradients, expected, strict=True):
        np.testing.assert_allclose(gradient, wanted, rtol=1e-5, atol=1e-7)
    _, plain = trainer.gradients_at(other.get_weights(), x_train[:32], y_train[:32], anchor,
                                    terms=False)
    assert not np.allclose(plain[0], expected[0])  # without the proximal term
