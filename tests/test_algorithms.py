"""The algorithm plug-ins' update rules against their papers: by hand, on closed-form problems,
and end to end on real data (resumed bit for bit)."""

import importlib
import types

import numpy as np
import pytest

import Client_side
import Main
from algorithms import feddyn, fedexp, moon
from conftest import assert_refused, run_whole_and_resumed, write_config
from test_reliability import read_history, without_seconds


def plugin(module, shapes, **options):
    """A plug-in of `module` for a model of `shapes`, with its constants."""
    settings = types.SimpleNamespace(options=options, local_momentum=0.0, learning_rate=0.1)
    return module.PLUGIN(settings, shapes)


def result(weights):
    return Client_side.LocalResult(weights, 10, 1, 0.0)


# --- FedNova under secure aggregation -------------------------------------------------------------

def test_fednova_from_a_secure_sum_of_normalized_updates_is_its_rule():
    """Clients put Delta_i / a_i into the sum (weighted by n_i); from the n-weighted mean the
    server's step is tau_eff sum_i p_i Delta_i / a_i, as FedNova's combine of the updates. By
    hand for two clients: n = 1, 3, a = 2, 4, Delta = 4, 8: sum p_i Delta_i / a_i = 0.25 * 2
    + 0.75 * 2 = 2, tau_eff = 0.25 * 2 + 0.75 * 4 = 3.5, so 7."""
    fednova = importlib.import_module("algorithms.fednova")
    nova = plugin(fednova, [(1,)])
    deltas = [[np.array([4.0])], [np.array([8.0])]]
    results = [Client_side.LocalResult(None, n, steps, 0.0) for n, steps in ((1, 2), (3, 4))]
    uploads = [types.SimpleNamespace(num_examples=n, num_steps=steps) for n, steps in
               ((1, 2), (3, 4))]
    summands = [nova.summand(delta, done, {}) for delta, done in zip(deltas, results)]
    mean = [(1 * summands[0][0] + 3 * summands[1][0]) / 4]
    assert nova.from_secure_mean(mean, uploads, population=2)[0][0] == 7.0
    assert nova.combine(deltas, uploads, population=2)[0][0] == 7.0


def test_scaffold_from_a_secure_sum_moves_c_as_its_combine_does():
    """Two of N = 4 clients, eta_l = 0.1: updates 2 and 4, variate changes 1 and 3. They put
    (2, 0.1) and (4, 0.3) into the sum with weight 1 each; from the mean (3, 0.2) the server
    steps by 3 and moves c by (2 / 4) x 0.2 / 0.1 = 1, as `combine` does from the uploads."""
    scaffold = importlib.import_module("algorithms.scaffold")
    secure, plain = plugin(scaffold, [(1,)]), plugin(scaffold, [(1,)])
    deltas = [[np.array([2.0])], [np.array([4.0])]]
    changes = [[np.array([1.0], np.float32)], [np.array([3.0], np.float32)]]
    summands = [secure.summand(delta, None, {"variate": change})
                for delta, change in zip(deltas, changes)]
    assert [secure.sum_weight(n) for n in (10, 30)] == [1, 1]
    mean = [(first + second) / 2 for first, second in zip(*summands)]
    np.testing.assert_allclose([layer[0] for layer in mean], [3.0, 0.2])
    assert secure.from_secure_mean(mean, [None, None], population=4)[0][0] == 3.0
    uploads = [types.SimpleNamespace(extras={"variate": change}) for change in changes]
    assert plain.combine(deltas, uploads, population=4)[0][0] == 3.0
    np.testing.assert_allclose(secure.state["variate"][0], plain.state["variate"][0])
    assert plain.state["variate"][0][0] == 1.0


# --- FedDyn (Acar et al. 2021, Algorithm 1) -----------------------------------------------------

def test_feddyn_round_by_hand():
    """alpha = 0.5, m = 4 clients, two return: theta = 1, theta_1 = 3, theta_2 = 2, g = 0.
    Clients: g_k = 0 - 0.5 (theta_k - 1) = -1 and -0.5. Server: h = 0 - 0.5 * (1/4) * (2 + 1)
    = -0.375; theta = mean(3, 2) - h / alpha = 2.5 + 0.75 = 3.25, so Delta = 2.25."""
    clients, server = plugin(feddyn, [(1,)], FEDDYN_ALPHA=0.5), plugin(feddyn, [(1,)],
                                                                       FEDDYN_ALPHA=0.5)
    start, zero = [np.array([1.0], np.float32)], [np.zeros(1, np.float32)]
    kept = [clients.after_training({"gradient": zero}, {}, start, result([np.array([new])]))
            for new in (3.0, 2.0)]
    assert [state["gradient"][0][0] for state, extras in kept] == [-1.0, -0.5]
    assert all(extras == {} for _, extras in kept)
    delta = server.combine([[np.array([2.0])], [np.array([1.0])]], [None, None], population=4)
    assert server.state["h"][0][0] == pytest.approx(-0.375)
    assert delta[0][0] == pytest.approx(2.25)
    assert clients.correction({"gradient": [np.array([-1.0])]}, {})[0][0] == 1.0
    assert clients.prox_mu() == 0.5


def run_feddyn_on_quadratics(per_round, rounds=300, alpha=1.0):
    """FedDyn with exact local minimization on f_k(w) = sum_j h_kj (w_j - b_kj)^2 / 2.

    The client's minimizer of f_k(w) - <g_k, w> + (alpha/2)||w - theta||^2 is
    (h_k b_k + g_k + alpha theta) / (h_k + alpha). Returns the distance to the minimizer of
    sum_k f_k and the largest gap between a kept g_k and the true gradient at theta_k.
    """
    rng = np.random.default_rng(0)
    centers, curvatures = rng.normal(0, 3, (10, 5)), rng.uniform(0.5, 4, (10, 5))
    server, client = (plugin(feddyn, [(5,)], FEDDYN_ALPHA=alpha) for _ in range(2))
    theta = np.zeros(5)
    gradients, gap = [np.zeros(5, np.float32) for _ in range(10)], 0.0
    for round_num in range(rounds):
        chosen = np.sort(np.random.default_rng(round_num).choice(10, per_round, replace=False))
        deltas = []
        for k in chosen:
            new = (curvatures[k] * centers[k] + gradients[k] + alpha * theta) / (
                curvatures[k] + alpha)
            state, _ = client.after_training({"gradient": [gradients[k]]}, {}, [theta],
                                             result([new]))
            gradients[k] = state["gradient"][0]
            gap = max(gap, np.abs(gradients[k] - curvatures[k] * (new - centers[k])).max())
            deltas.append([new - theta])
        theta = theta + server.combine(deltas, [None] * per_round, population=10)[0]
    optimum = (curvatures * centers).sum(axis=0) / curvatures.sum(axis=0)
    return np.linalg.norm(theta - optimum), gap


@pytest.mark.parametrize("per_round", [10, 4])
def test_feddyn_reaches_the_global_optimum_of_heterogeneous_quadratics(per_round):
    """The paper's claim (Theorem 1's fixed point): with exact local solves FedDyn converges to
    the minimizer of the sum of the clients' losses, with full or partial participation, and
    each kept g_k is the gradient of f_k at the client's model (the first-order condition)."""
    distance, gap = run_feddyn_on_quadratics(per_round)
    assert distance < 1e-4 and gap < 1e-4


@pytest.mark.parametrize("constants, message", [
    ({"PERSONALIZATION": "fedper", "LOCAL_TEST_SHARE": 0.25},
     "PERSONALIZATION fedper needs ALGORITHM one of"),
    ({"AGGREGATION": "median"}, "AGGREGATION median needs ALGORITHM one of fedavg"),
    ({"DP_CLIP_NORM": 1.0}, "DP_CLIP_NORM > 0 (DP-FedAvg) needs ALGORITHM one of"),
    ({"FEDDYN_ALPHA": 0}, "FEDDYN_ALPHA must be a number > 0, got 0"),
    ({"SERVER_OPTIMIZER": "fedadam"}, "ALGORITHM feddyn needs SERVER_OPTIMIZER one of sgd"),
    ({"SERVER_LR": 0.5}, "ALGORITHM feddyn needs SERVER_LR one of 1.0, got 0.5"),
    ({"COMPRESSION": "int8"}, "ALGORITHM feddyn needs COMPRESSION one of none, got int8")])
def test_feddyn_refuses_what_it_cannot_combine_with(tmp_path, capsys, constants, message):
    assert_refused(tmp_path, capsys, message, ALGORITHM="feddyn", **constants)


def test_feddyn_constant_leaves_other_runs_folders_alone():
    import configuration

    config = Main.default_config()
    assert configuration.run_dir(config) == configuration.run_dir(
        {**config, "FEDDYN_ALPHA": 0.5})
    chosen = {**config, "ALGORITHM": "feddyn"}
    assert configuration.run_dir(chosen) != configuration.run_dir(
        {**chosen, "FEDDYN_ALPHA": 0.5})


@pytest.mark.slow
def test_feddyn_learns_real_data_and_resumes_bit_for_bit(tmp_path, tenth_of_the_data):
    """Its clients' g_k and the server's h live in the checkpoint: a run stopped after round 2
    and resumed equals the straight run (0.354 after round 4 when written); and it learns."""
    setting = {"ALGORITHM": "feddyn", "FEDDYN_ALPHA": 0.01, "NUM_CLIENTS": 20,
               "CLIENT_FRACTION": 0.5, "ROUNDS": 4, "DISTRIBUTION": "dirichlet", "SEED": 3}
    rows = resumed_equals_straight(tmp_path, setting)
    assert float(rows[-1]["test_accuracy"]) > 0.25  # chance is 0.1; 4 short rounds


def resumed_equals_straight(tmp_path, setting):
    """Run `setting` straight and stopped after round 2, then resumed: the histories and every
    checkpoint array must be equal. Returns the straight run's history."""
    run_whole_and_resumed(tmp_path, setting, stop_after=2)
    (whole,) = (tmp_path / "whole").iterdir()
    (parts,) = (tmp_path / "parts").iterdir()
    rows = read_history(whole)
    assert without_seconds(read_history(parts)) == without_seconds(rows)
    assert_same_checkpoint_arrays(whole, parts)
    return rows


def assert_same_checkpoint_arrays(first, second):
    """Every array of two runs' checkpoints (weights, server and client state) bit for bit."""
    with np.load(first / "checkpoint.npz") as one, np.load(second / "checkpoint.npz") as two:
        assert set(one.files) == set(two.files)
        for name in one.files:
            if name != "metadata":
                np.testing.assert_array_equal(one[name], two[name])


# --- FedExP (Jhunjhunwala et al. 2023, Algorithm 1) ----------------------------------------------

def test_fedexp_step_by_hand():
    """Updates [3, 0] and [-1, 2]: mean [1, 1], sum of squared norms 9 + 5 = 14, so
    eta_g = max(1, 14 / (2 * 2 * (2 + 0.001))) = 1.74913; Delta = eta_g * [1, 1]. Updates that
    agree give eta_g = 1 (FedAvg's step)."""
    server = plugin(fedexp, [(2,)], FEDEXP_EPSILON=1e-3)
    delta = server.combine([[np.array([3.0, 0.0])], [np.array([-1.0, 2.0])]], [None, None], 10)
    np.testing.assert_allclose(delta[0], [14 / 8.004] * 2, rtol=1e-12)
    assert fedexp.extrapolation([[np.array([2.0])], [np.array([2.0])]], 1e-3) == 1.0


def local_gradient_descent(matrix, target, start, steps=5, learning_rate=0.02):
    weights = start.copy()
    for _ in range(steps):
        weights = weights - learning_rate * matrix.T @ (matrix @ weights - target)
    return weights


def run_on_overparameterized_least_squares(module, rounds=30, **options):
    """Ten clients of 3 equations each in 50 unknowns with one common solution (the paper's
    overparameterized setting, Section 4), local gradient descent; returns the global loss."""
    rng = np.random.default_rng(1)
    solution = rng.normal(size=50)
    matrices = [rng.normal(size=(3, 50)) for _ in range(10)]
    targets = [matrix @ solution for matrix in matrices]
    server, weights = plugin(module, [(50,)], **options), np.zeros(50)
    for _ in range(rounds):
        deltas = [[local_gradient_descent(matrix, target, weights) - weights]
                  for matrix, target in zip(matrices, targets)]
        uploads = [types.SimpleNamespace(num_examples=3) for _ in deltas]
        weights = weights + server.combine(deltas, uploads, 10)[0]
    return sum(np.sum((matrix @ weights - target) ** 2) / 2
               for matrix, target in zip(matrices, targets))


def test_fedexp_converges_faster_than_fedavg_where_clients_updates_cancel():
    """The paper's motivating case: with overparameterized clients the averaged update is much
    shorter than the clients' own, and extrapolating reaches a lower loss in the same rounds."""
    fedavg = importlib.import_module("algorithms.fedavg")
    fedavg_loss = run_on_overparameterized_least_squares(fedavg)
    fedexp_loss = run_on_overparameterized_least_squares(fedexp, FEDEXP_EPSILON=1e-3)
    assert fedexp_loss < 0.5 * fedavg_loss


@pytest.mark.parametrize("constants, message", [
    ({"AGGREGATION": "median"}, "AGGREGATION median needs ALGORITHM one of fedavg"),
    ({"DP_CLIP_NORM": 1.0}, "DP_CLIP_NORM > 0 (DP-FedAvg) needs ALGORITHM one of"),
    ({"ASYNC_BUFFER": 5, "DEVICE_HETEROGENEITY": "lognormal"},
     "ASYNC_BUFFER > 0 (FedBuff) needs ALGORITHM one of fedavg, fedprox"),
    ({"FEDEXP_EPSILON": -1.0}, "FEDEXP_EPSILON must be a number > 0, got -1.0"),
    ({"SERVER_OPTIMIZER": "fedavgm"}, "ALGORITHM fedexp needs SERVER_OPTIMIZER one of sgd"),
    ({"COMPRESSION": "topk"}, "ALGORITHM fedexp needs COMPRESSION one of none, int8, got topk")])
def test_fedexp_refuses_what_it_cannot_combine_with(tmp_path, capsys, constants, message):
    assert_refused(tmp_path, capsys, message, ALGORITHM="fedexp", **constants)


@pytest.mark.slow
def test_fedexp_learns_real_data_on_both_halves_of_a_personalized_model(tmp_path,
                                                                       tenth_of_the_data):
    """It needs no whole-model state: with FedPer it extrapolates the body alone."""
    setting = {"ALGORITHM": "fedexp", "NUM_CLIENTS": 20, "CLIENT_FRACTION": 0.5, "ROUNDS": 3,
               "DISTRIBUTION": "dirichlet", "SEED": 3, "PERSONALIZATION": "fedper",
               "LOCAL_TEST_SHARE": 0.25}
    path = write_config(tmp_path / "fedexp.csv", OUTPUT_DIR=tmp_path / "out", **setting)
    assert Main.main(["-c", "-f", str(path)]) == 0
    (run,) = (tmp_path / "out").iterdir()
    rows = read_history(run)
    assert float(rows[-1]["personal_pooled"]) > 0.25  # chance 0.1; 0.460 when written


# --- MOON (Li, He and Song 2021, Algorithm 1) ----------------------------------------------------

def test_moon_keeps_the_last_local_model_and_contrasts_a_new_client_with_the_global_one():
    client = plugin(moon, [(2,)], MOON_MU=1.0, MOON_TEMPERATURE=0.5)
    global_weights = [np.array([1.0, 2.0], np.float32)]
    never = {"previous": [np.zeros(2, np.float32)]}
    assert client.reference(never, {}, global_weights) is global_weights
    kept, extras = client.after_training(never, {}, global_weights,
                                         result([np.array([3.0, 4.0])]))
    np.testing.assert_array_equal(kept["previous"][0], [3.0, 4.0])
    assert extras == {} and client.contrastive() == (1.0, 0.5)
    assert client.reference(kept, {}, global_weights) is kept["previous"]


def test_moon_with_mu_zero_trains_as_fedavg(tmp_path, tenth_of_the_data):
    """Its one forward pass returns the representation beside the probabilities: with mu 0
    the local training, and so the global model, are FedAvg's."""
    setting = {"NUM_CLIENTS": 20, "CLIENT_FRACTION": 0.5, "ROUNDS": 2, "SEED": 2}
    runs = {}
    for name, extra in (("fedavg", {}), ("moon", {"ALGORITHM": "moon", "MOON_MU": 0.0})):
        path = write_config(tmp_path / f"{name}.csv", OUTPUT_DIR=tmp_path / name, **setting,
                            **extra)
        assert Main.main(["-c", "-f", str(path)]) == 0
        (runs[name],) = (tmp_path / name).iterdir()
    with np.load(runs["fedavg"] / "checkpoint.npz") as one, \
            np.load(runs["moon"] / "checkpoint.npz") as two:
        layers = [name for name in one.files if name.startswith("global_")]
        assert layers
        for name in layers:
            np.testing.assert_allclose(one[name], two[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("constants, message", [
    ({"PERSONALIZATION": "fedrep", "LOCAL_TEST_SHARE": 0.25},
     "PERSONALIZATION fedrep needs ALGORITHM one of"),
    ({"AGGREGATION": "krum"}, "AGGREGATION krum needs ALGORITHM one of fedavg"),
    ({"MOON_TEMPERATURE": 0}, "MOON_TEMPERATURE must be a number > 0, got 0")])
def test_moon_refuses_what_it_cannot_combine_with(tmp_path, capsys, constants, message):
    assert_refused(tmp_path, capsys, message, ALGORITHM="moon", **constants)


@pytest.mark.slow
def test_moon_learns_real_data_and_resumes_bit_for_bit(tmp_path, tenth_of_the_data):
    """Each client's previous model lives in the checkpoint: stopped after round 2 and resumed,
    the run equals the straight one."""
    setting = {"ALGORITHM": "moon", "NUM_CLIENTS": 20, "CLIENT_FRACTION": 0.5, "ROUNDS": 4,
               "DISTRIBUTION": "dirichlet", "SEED": 3, "LEARNING_RATE": 0.05}
    rows = resumed_equals_straight(tmp_path, setting)
    # 0.443 when written, FedAvg 0.435 (at LEARNING_RATE 0.01 both stay near 0.16 here).
    assert float(rows[-1]["test_accuracy"]) > 0.35
