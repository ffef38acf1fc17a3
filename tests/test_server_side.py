"""Tests of the server: model, client sampling, FedAvg, server optimizers, robust rules, DP and
evaluation (its screening of uploads: test_screening.py)."""

import math
import tracemalloc

import numpy as np
import pytest
import keras

import client_host
import privacy
import Server_side
import robust_rules
import upload_format
from algorithms import fednova, scaffold
from conftest import ROOT
from test_screening import screening_config, server_settings


def test_create_model_is_the_seed_cnn():
    model = Server_side.create_model()
    assert [type(layer).__name__ for layer in model.layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dropout", "Dense"]
    # 3*3*1*32+32 + 3*3*32*64+64 + 5*5*64*10+10
    assert model.count_params() == 320 + 18496 + 16010
    assert model.output_shape == (None, 10)


@pytest.mark.parametrize("num_clients, fraction, expected", [
    (100, 0.3, 30), (10, 0.01, 1), (7, 1.0, 7), (3, 0.5, 2), (5, 0.5, 3), (5, 0.1, 1),
    (10, 0.35, 4), (10, 0.25, 3)])
def test_select_clients_draws_round_of_c_times_k_distinct_clients(num_clients, fraction, expected):
    """C K is rounded half up: K = 5, C = 0.5 gives 3 (Python's round gave 2)."""
    selected = Server_side.select_clients(num_clients, fraction, np.random.default_rng(0))
    assert len(selected) == expected == len(set(selected.tolist()))
    assert selected.min() >= 0 and selected.max() < num_clients
    again = Server_side.select_clients(num_clients, fraction, np.random.default_rng(0))
    np.testing.assert_array_equal(selected, again)


def test_poisson_sampling_takes_each_client_with_probability_c():
    rng = np.random.default_rng(0)
    counts = [len(Server_side.select_clients(100, 0.1, rng, "poisson")) for _ in range(2000)]
    assert np.mean(counts) == pytest.approx(10, rel=0.03)
    assert np.var(counts) == pytest.approx(100 * 0.1 * 0.9, rel=0.15)  # binomial, not fixed
    one = Server_side.select_clients(100, 0.1, np.random.default_rng(5), "poisson")
    assert np.all(np.diff(one) > 0)


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


def test_fednova_normalizes_by_local_steps_by_hand():
    """p = [1/4, 3/4], tau = [2, 6], updates [2] and [3]:
    tau_eff = 1/4*2 + 3/4*6 = 5; sum p_i Delta_i / tau_i = 1/4*2/2 + 3/4*3/6 = 0.625;
    FedNova's Delta = 5 * 0.625 = 3.125, where FedAvg's would be 1/4*2 + 3/4*3 = 2.75.
    """
    deltas = [[np.array([2.0])], [np.array([3.0])]]
    delta = fednova.fednova_delta(deltas, [1, 3], [2.0, 6.0])
    assert delta[0][0] == pytest.approx(3.125)
    assert Server_side.fedavg(deltas, [1, 3])[0][0] == pytest.approx(2.75)


def test_effective_steps_with_momentum_sum_the_momentum_weights():
    """tau = 2, rho = 0.5: step k of a constant gradient moves (1 - rho^(k+1)) / (1 - rho),
    so a = 1 + 1.5 = 2.5; the formula gives (2 - 0.5 * 0.75 / 0.5) / 0.5 = 2.5."""
    assert upload_format.effective_steps(2, 0.5) == pytest.approx(2.5)
    assert upload_format.effective_steps(7, 0.0) == 7.0


def test_scaffold_server_variate_moves_by_participating_fraction():
    """c = 0, two of ten clients return deltas 1 and 3: c = 0 + 2/10 * mean(1, 3) = 0.4."""
    variate = scaffold.server_variate([np.zeros(1, np.float32)],
                                      [[np.array([1.0])], [np.array([3.0])]], num_clients=10)
    assert variate[0][0] == pytest.approx(0.4)


LR, BETA1, BETA2, TAU = 0.1, 0.9, 0.99, 1e-3


@pytest.mark.parametrize("name, expected", [
    ("sgd", 1 + LR * 0.5),
    ("fedavgm", 1 + LR * 0.5),
    # m = (1 - beta1) * 0.5 = 0.05 for the three adaptive ones; v starts at tau^2.
    ("fedadagrad", 1 + LR * 0.05 / (np.sqrt(TAU**2 + 0.25) + TAU)),
    ("fedadam", 1 + LR * 0.05 / (np.sqrt(BETA2 * TAU**2 + (1 - BETA2) * 0.25) + TAU)),
    ("fedyogi", 1 + LR * 0.05 / (np.sqrt(TAU**2 + (1 - BETA2) * 0.25) + TAU)),
])
def test_one_server_optimizer_step_by_hand(name, expected):
    optimizer = Server_side.ServerOptimizer(name, [(1,)], LR, 0.9, BETA1, BETA2, TAU)
    new_weights = optimizer.step([np.array([1.0], np.float32)], [np.array([0.5])])
    assert new_weights[0].dtype == np.float32
    assert new_weights[0][0] == pytest.approx(expected, rel=1e-6)


def test_fedavgm_accumulates_momentum_over_steps():
    """v = 0.5, then 0.9 * 0.5 + 0.5 = 0.95: x = 1 + 0.1 * 0.5 + 0.1 * 0.95 = 1.145."""
    optimizer = Server_side.ServerOptimizer("fedavgm", [(1,)], learning_rate=0.1, momentum=0.9)
    weights = [np.array([1.0], np.float32)]
    for _ in range(2):
        weights = optimizer.step(weights, [np.array([0.5])])
    assert weights[0][0] == pytest.approx(1.145, rel=1e-6)


def test_sgd_server_with_rate_one_and_one_client_returns_that_client():
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
    client = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5).astype(np.float32)]
    delta = Server_side.fedavg(client_host.client_deltas([client], start), [123])
    new_weights = Server_side.ServerOptimizer("sgd", [(3, 4), (5,)], 1.0).step(start, delta)
    for expected, actual in zip(client, new_weights):
        np.testing.assert_array_equal(expected, actual)


def test_server_optimizer_state_round_trips():
    first = Server_side.ServerOptimizer("fedadam", [(2,)], 0.1)
    first.step([np.zeros(2, np.float32)], [np.array([0.5, -1.0])])
    second = Server_side.ServerOptimizer("fedadam", [(2,)], 0.1)
    second.set_state(first.get_state())
    weights = [np.ones(2, np.float32)]
    np.testing.assert_array_equal(first.step(weights, [np.array([0.2, 0.2])]),
                                  second.step(weights, [np.array([0.2, 0.2])]))


# Four honest clients near 1 and one outlier at 100, in a single one-coordinate layer.
HONEST_AND_OUTLIER = [[np.array([value])] for value in (0.9, 1.0, 1.05, 1.2, 100.0)]


def test_median_ignores_one_outlier():
    assert robust_rules.coordinate_median(HONEST_AND_OUTLIER)[0][0] == pytest.approx(1.05)


def test_trimmed_mean_drops_the_extremes_by_hand():
    """TRIM_RATIO 0.2 of 5 clients drops 1 at each end: mean(1.0, 1.05, 1.2) = 1.0833."""
    assert robust_rules.trimmed_mean(HONEST_AND_OUTLIER, 0.2)[0][0] == pytest.approx(3.25 / 3)
    # With nothing trimmed it is the plain mean, which the outlier drags to 20.83.
    assert robust_rules.trimmed_mean(HONEST_AND_OUTLIER, 0.0)[0][0] == pytest.approx(20.83)


def test_krum_scores_and_choice_by_hand():
    """f = 1, m = 5: each score sums the squared distances to the m - f - 2 = 2 nearest others.

    0.9: 0.01 + 0.0225; 1.0: 0.01 + 0.0025; 1.05: 0.0025 + 0.0225; 1.2: 0.0225 + 0.04;
    100: 98.8^2 + 98.95^2. Krum picks the lowest, the client at 1.0.
    """
    scores = robust_rules.krum_scores(HONEST_AND_OUTLIER, num_attackers=1)
    np.testing.assert_allclose(scores[:4], [0.0325, 0.0125, 0.025, 0.0625], atol=1e-12)
    assert scores[4] == pytest.approx(98.8**2 + 98.95**2)
    assert robust_rules.multi_krum_choice(HONEST_AND_OUTLIER, 1, 1).tolist() == [1]
    # Multi-Krum with m - f = 4 averages the four honest clients: 4.15 / 4.
    config = {**screening_config(), "AGGREGATION": "multi_krum", "KRUM_F": 1}
    multi_krum = Server_side.robust_aggregate(HONEST_AND_OUTLIER, server_settings(config))
    assert multi_krum[0][0] == pytest.approx(4.15 / 4)
    config["AGGREGATION"] = "krum"
    krum = Server_side.robust_aggregate(HONEST_AND_OUTLIER, server_settings(config))
    assert krum[0][0] == pytest.approx(1.0)


def test_krum_scores_of_200_clients_need_little_memory():
    """The old broadcast built an m x m x d tensor (200 x 200 x 5,000 floats = 1.6 GB here)."""
    rng = np.random.default_rng(0)
    deltas = [[rng.standard_normal(5000)] for _ in range(200)]
    tracemalloc.start()
    scores = robust_rules.krum_scores(deltas, num_attackers=10)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50e6, f"peak {peak / 1e6:.0f} MB"
    flat = np.stack([delta[0] for delta in deltas[:5]])
    direct = ((flat[:, None] - flat[None]) ** 2).sum(axis=2)
    expected = np.sort(direct[0])[1:3].sum()
    assert robust_rules.krum_scores(deltas[:5], num_attackers=1)[0] == pytest.approx(expected)
    assert scores.shape == (200,)


def test_dp_noise_has_the_documented_standard_deviation():
    rng = np.random.default_rng(0)
    noisy = privacy.dp_noisy_mean([], [(200_000,)], clip_norm=2.0, noise_multiplier=1.5,
                                      denominator=10, rng=rng)
    assert np.std(noisy[0]) == pytest.approx(1.5 * 2.0 / 10, rel=0.01)
    assert abs(np.mean(noisy[0])) < 0.002


def test_dp_mean_clips_every_update_at_the_server():
    """Without noise: updates of norm 10 and 0.5 with S = 1 average to (1 + 0.5) / 2."""
    deltas = [[np.array([6.0, 8.0])], [np.array([0.3, 0.4])]]
    mean = privacy.dp_noisy_mean(deltas, [(2,)], clip_norm=1.0, noise_multiplier=0.0,
                                     denominator=2, rng=np.random.default_rng(0))
    np.testing.assert_allclose(mean[0], [(0.6 + 0.3) / 2, (0.8 + 0.4) / 2])


def test_dp_denominator_is_the_count_or_the_expected_count():
    assert privacy.dp_denominator("fixed", 7, 100, 0.1, 0.3) == 7
    assert privacy.dp_denominator("poisson", 7, 100, 0.1, 0.3) == pytest.approx(7.0)
    assert privacy.dp_denominator("poisson", 12, 100, 0.1, 0.0) == pytest.approx(10.0)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    for sampling in Server_side.CLIENT_SAMPLINGS:
        few = privacy.privacy_spent(1.0, sampling, 100, 0.1, 10, 1e-5)
        many = privacy.privacy_spent(1.0, sampling, 100, 0.1, 100, 1e-5)
        noisier = privacy.privacy_spent(2.0, sampling, 100, 0.1, 100, 1e-5)
        assert few < many and noisier < many
        assert privacy.privacy_spent(0.0, sampling, 100, 0.1, 10, 1e-5) == float("inf")


def library_epsilon(event, rounds, relation=None):
    """Epsilon at delta 1e-5 from dp-accounting called directly, with its own default orders."""
    import dp_accounting

    relation = relation or dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    accountant.compose(event, rounds)
    return accountant.get_epsilon(1e-5)


def test_poisson_epsilon_matches_the_library_and_a_published_case():
    """Abadi et al. 2016: q = 0.01, sigma = 4, 10,000 steps, delta = 1e-5 gives epsilon ~ 1.26
    with the moments accountant; RDP lands close to that."""
    import dp_accounting

    epsilon = privacy.privacy_spent(4.0, "poisson", 10_000, 0.01, 10_000, 1e-5)
    assert 1.0 < epsilon < 1.4
    expected = library_epsilon(dp_accounting.PoissonSampledDpEvent(
        0.3, dp_accounting.GaussianDpEvent(1.1)), 50)
    assert privacy.privacy_spent(1.1, "poisson", 100, 0.3, 50, 1e-5) == pytest.approx(expected)


@pytest.mark.parametrize("noise, fraction, rounds", [(0.5, 0.1, 50), (1.0, 0.1, 50),
                                                     (0.5, 0.3, 100), (2.0, 0.1, 100)])
def test_poisson_epsilon_uses_fractional_orders_below_two(noise, fraction, rounds):
    """The subsampled Gaussian's RDP bound is often tightest at an order between 1 and 2: with
    integer orders alone K = 100, C = 0.1, z = 0.5, 50 rounds reported 31.59 instead of 25.88."""
    import dp_accounting

    expected = library_epsilon(dp_accounting.PoissonSampledDpEvent(
        fraction, dp_accounting.GaussianDpEvent(noise)), rounds)
    epsilon = privacy.privacy_spent(noise, "poisson", 100, fraction, rounds, 1e-5)
    assert epsilon == pytest.approx(expected, rel=1e-9)
    if (noise, fraction, rounds) == (0.5, 0.1, 50):
        assert epsilon <= 26.0


def test_the_accountant_does_not_double_the_sensitivity_of_replace_one_itself():
    """Our fixed-size accounting passes z / 2 because dp-accounting's RDP accountant (0.6.0)
    takes the noise multiplier as given under REPLACE_ONE. Sampling n of n is the plain Gaussian
    mechanism, whose RDP at order 2 is 2 / (2 sigma^2): a version that doubled the sensitivity
    itself would give four times that, and our z / 2 would count the doubling twice."""
    import dp_accounting

    sigma = 1.5
    accountant = dp_accounting.rdp.RdpAccountant(
        [2], dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        50, 50, dp_accounting.GaussianDpEvent(sigma)))
    assert accountant.rdp[0] == pytest.approx(2 / (2 * sigma ** 2))


def test_dp_accounting_is_pinned_to_the_tested_version():
    """Its semantics are part of our epsilons: requirements.txt and pyproject.toml pin it."""
    import importlib.metadata

    version = importlib.metadata.version("dp-accounting")
    for name in ("requirements.txt", "pyproject.toml"):
        text = (ROOT / name).read_text()
        assert f"dp-accounting=={version}" in text, f"{name} does not pin dp-accounting=={version}"


@pytest.mark.slow
def test_fixed_size_epsilon_is_sampling_without_replacement_with_replace_one():
    """m = round(C K) of K without replacement, replace-one neighbours: the sum's sensitivity
    is 2 S, so the library sees noise multiplier z / 2. K = 5, C = 0.1 takes 1 client in 5:
    the old report (Poisson at q = C = 0.1) gave 6.0 after 50 rounds at z = 1."""
    import dp_accounting

    expected = library_epsilon(dp_accounting.SampledWithoutReplacementDpEvent(
        5, 1, dp_accounting.GaussianDpEvent(0.5)), 50,
        dp_accounting.NeighboringRelation.REPLACE_ONE)
    epsilon = privacy.privacy_spent(1.0, "fixed", 5, 0.1, 50, 1e-5)
    assert epsilon == pytest.approx(expected)
    assert epsilon > 2 * privacy.privacy_spent(1.0, "poisson", 5, 0.1, 50, 1e-5)
    expected = library_epsilon(dp_accounting.SampledWithoutReplacementDpEvent(
        100, 10, dp_accounting.GaussianDpEvent(1.0)), 20,
        dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert privacy.privacy_spent(2.0, "fixed", 100, 0.1, 20, 1e-5) == pytest.approx(expected)
