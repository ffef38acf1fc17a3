"""Secure aggregation's arithmetic (secure_aggregation.py): quantization, the modular sum and
its decoding by hand, the overflow refusal, and runs on real data whose weights stay within
the quantization's bound of the plain run's."""

import numpy as np
import pytest

import client_host
import configuration
import Main
import secure_aggregation
from conftest import assert_refused, write_config
from test_reliability import read_history

OPTIONS = {"SECAGG_RANGE": 0.5, "SECAGG_BITS": 8, "SECAGG_MODULUS_BITS": 32}


def test_secagg_quantization_clips_to_the_range_and_rounds_without_bias():
    levels = 2**8 - 1
    values = np.array([-3.0, -0.5, -0.2, 0.0, 0.1234, 0.5, 7.0])
    draws = np.stack([secure_aggregation.quantize([values], 0.5, 8,
                                                  np.random.default_rng(seed))[0]
                      for seed in range(4000)])
    assert draws.dtype == np.uint64 and draws.min() >= 0 and draws.max() <= levels
    assert list(draws[0, [0, 1, 5, 6]]) == [0, 0, levels, levels]  # clipped to [-R, R]
    expected = (np.clip(values, -0.5, 0.5) + 0.5) * levels
    # Each draw is floor or ceil of the scaled value; their mean is the value (std < 0.5 / 63).
    assert np.all(np.abs(draws - expected) < 1)
    np.testing.assert_allclose(draws.mean(axis=0), expected, atol=0.03)


def test_secagg_sum_decodes_to_the_weighted_sum_within_the_rounding_bound():
    """Three clients, weights 5, 1, 30: sum_k w_k x_k within sum_k w_k step, step = 2R / L."""
    rng = np.random.default_rng(1)
    deltas = [[rng.uniform(-0.4, 0.4, (6, 3)), rng.uniform(-0.4, 0.4, 4)] for _ in range(3)]
    weights = [5, 1, 30]
    contributions = [secure_aggregation.contribution(delta, weight, OPTIONS,
                                                     np.random.default_rng(client))
                     for client, (delta, weight) in enumerate(zip(deltas, weights))]
    assert contributions[0][0][secure_aggregation.KEY].dtype == np.uint32
    total = secure_aggregation.modular_sum(contributions, OPTIONS)
    decoded = secure_aggregation.decode_sum(total, sum(weights), OPTIONS)
    step = 2 * 0.5 / (2**8 - 1)
    for layer, got in enumerate(decoded):
        exact = sum(weight * delta[layer] for weight, delta in zip(weights, deltas))
        assert np.all(np.abs(got - exact) < sum(weights) * step)
        assert np.any(np.abs(got - exact) > 1e-9)  # it is quantized, not the float sum


def test_secagg_sum_is_taken_modulo_two_to_the_modulus_bits():
    options = {**OPTIONS, "SECAGG_MODULUS_BITS": 8}
    contributions = [[{secure_aggregation.KEY: np.array([200, 3], np.uint32)}],
                     [{secure_aggregation.KEY: np.array([100, 4], np.uint32)}]]
    (total,) = secure_aggregation.modular_sum(contributions, options)
    assert list(total) == [(200 + 100) % 256, 7]


def test_secagg_capacity_refuses_sums_that_could_wrap_with_the_numbers():
    assert secure_aggregation.capacity_problem(OPTIONS, [600] * 100, 30) is None
    problem = secure_aggregation.capacity_problem(
        {**OPTIONS, "SECAGG_BITS": 16, "SECAGG_MODULUS_BITS": 24}, [600] * 99 + [9000], 30)
    assert problem == ("SECAGG_MODULUS_BITS 24 is too small for SECAGG_BITS 16: a round's sum "
                       "can reach 26,400 (total weight of its 30 heaviest clients) x 65,535 = "
                       "1,730,124,000 >= 2^24; it needs at least 31 bits, or fewer SECAGG_BITS")


def test_secagg_a_client_whose_update_is_not_finite_contributes_nothing_and_reports_nan():
    settings = type("Settings", (), {"dp_clip_norm": 0.0, "seed": 0, "options": OPTIONS})
    update = type("Result", (), {"train_loss": 0.7, "num_examples": 12})
    encoded, loss = client_host.secure_contribution(
        settings, [np.array([0.1, np.nan])], update, 1, 3)
    assert np.isnan(loss)
    assert list(encoded[0][secure_aggregation.KEY]) == [12 * 128, 12 * 128]  # zeros, weighted


def test_secagg_under_dp_the_decoded_update_stays_within_the_clip_norm():
    """The client clips to S less the rounding margin, so even the worst rounding (every
    coordinate moved a whole step) decodes to an update of norm <= S: the accountant's S."""
    options = {**OPTIONS, "SECAGG_BITS": 4, "SECAGG_RANGE": 0.5}
    settings = type("Settings", (), {"dp_clip_norm": 1.0, "seed": 0, "options": options})
    update = type("Result", (), {"train_loss": 0.7, "num_examples": 12})
    delta = [np.full((30, 2), 0.2), np.full(4, -0.3)]  # norm 2.2, clipped
    margin = secure_aggregation.rounding_margin(options, [(30, 2), (4,)])
    assert margin == pytest.approx(2 * 0.5 / 15 * np.sqrt(64))
    worst = 0.0
    for seed in range(50):
        settings.seed = seed
        encoded, _ = client_host.secure_contribution(settings, delta, update, 1, 3)
        decoded = secure_aggregation.decode_sum(secure_aggregation.modular_sum(
            [encoded], options), 1, options)
        worst = max(worst, np.sqrt(sum(np.sum(layer**2) for layer in decoded)))
    assert 1.0 - 2 * margin < worst <= 1.0


def test_secagg_off_leaves_every_folder_name_as_it_was():
    config = Main.default_config()
    assert configuration.run_dir(config).name == "fedavg_noniid_ib_K100_C0.3_E1_B32_s0_e9929fee"
    for name, value in (("SECAGG_BITS", 24), ("SECAGG_RANGE", 3.0),
                        ("SECAGG_MODULUS_BITS", 64), ("SECAGG_THRESHOLD", 0.9)):
        assert configuration.run_dir({**config, name: value}) == configuration.run_dir(config)
    assert configuration.run_dir({**config, "SECURE_AGGREGATION": "secagg+"}) != \
        configuration.run_dir(config)


def test_secagg_threshold_at_its_default_leaves_the_folders_of_earlier_secagg_runs():
    secure = {**Main.default_config(), "SECURE_AGGREGATION": "secagg+"}
    before = {name: value for name, value in secure.items() if name != "SECAGG_THRESHOLD"}
    assert configuration.run_dir(secure) == configuration.run_dir(before)


@pytest.mark.parametrize("constants, message", [
    ({"SECURE_AGGREGATION": "secagg"}, "SECURE_AGGREGATION must be one of none, secagg+, got"),
    ({"SECAGG_BITS": 0}, "SECAGG_BITS must be an integer from 1 to 32, got 0"),
    ({"SECAGG_MODULUS_BITS": 65}, "SECAGG_MODULUS_BITS must be an integer from 8 to 64"),
    ({"SECAGG_THRESHOLD": 1.5}, "SECAGG_THRESHOLD must be a number in (0, 1], got 1.5"),
    ({"AGGREGATION": "median"}, "SECURE_AGGREGATION secagg+ needs AGGREGATION one of fedavg, "
                                "got median: a robust rule needs every single update"),
    ({"COMPRESSION": "topk"}, "SECURE_AGGREGATION secagg+ needs COMPRESSION one of none"),
    ({"ALGORITHM": "feddyn"}, "SECURE_AGGREGATION secagg+ needs ALGORITHM one of fedavg, "
                              "fednova, fedprox, scaffold, got feddyn"),
    ({"SECAGG_BITS": 20}, "SECAGG_MODULUS_BITS 32 is too small for SECAGG_BITS 20: a round's "
                          "sum can reach"),
    ({"SECAGG_BITS": 2, "DP_CLIP_NORM": 0.5}, "SECAGG_BITS 2 is too few for DP_CLIP_NORM 0.5: "
                                              "rounding can move an update by up to 6.22")])
def test_secagg_refuses_bad_values_and_what_needs_single_updates(tmp_path, capsys, real_data_once,
                                                                 constants, message):
    assert_refused(tmp_path, capsys, message, **{"SECURE_AGGREGATION": "secagg+", **constants})


def test_secagg_runs_on_flower():
    import flower_app

    flower_app.refuse_unsupported({**Main.default_config(), "OUTPUT_DIR": "/tmp/x",
                                   "SECURE_AGGREGATION": "secagg+"})


@pytest.mark.parametrize("fraction, parties, wanted", [(0.6, 2, 2), (0.6, 3, 2), (0.6, 4, 3),
                                                       (0.5, 2, 1), (1.0, 5, 5), (0.01, 3, 1)])
def test_secagg_threshold_is_the_fraction_of_the_parties_rounded_up(fraction, parties, wanted):
    assert secure_aggregation.threshold({"SECAGG_THRESHOLD": fraction}, parties) == wanted


def final_weights(tmp_path, name, **constants):
    path = write_config(tmp_path / f"{name}.csv", OUTPUT_DIR=tmp_path / name, NUM_CLIENTS=10,
                        CLIENT_FRACTION=0.5, ROUNDS=1, SEED=2, **constants)
    assert Main.main(["-c", "-f", str(path)]) == 0
    (run,) = (tmp_path / name).iterdir()
    with np.load(run / "checkpoint.npz") as checkpoint:
        weights = [checkpoint[name] for name in sorted(
            (name for name in checkpoint.files if name.startswith("global_")),
            key=lambda name: int(name.split("_")[1]))]
    return weights, read_history(run)


@pytest.mark.slow
@pytest.mark.parametrize("privacy, other", [
    ({}, {}), ({"DP_CLIP_NORM": 0.5, "DP_NOISE_MULTIPLIER": 0.3}, {}),
    ({}, {"ALGORITHM": "fednova", "LOCAL_MOMENTUM": 0.5}), ({}, {"ALGORITHM": "scaffold"})],
    ids=["fedavg", "dp", "fednova", "scaffold"])
def test_secagg_round_on_real_data_stays_within_the_quantization_bound(
        tmp_path, tenth_of_the_data, privacy, other):
    """One round: the model from the decoded sum differs from the plain run's by less than a
    quantization step (24 bits of 2R = 0.1: 6e-9; FedNova's: times tau_eff, about 20) plus
    float32 rounding; the same epsilon under DP (seeded noise: the same draws); an upload
    costs 4 bytes a weight, as float32."""
    plain, plain_rows = final_weights(tmp_path, "plain", **privacy, **other)
    secure, secure_rows = final_weights(tmp_path, "secure", SECURE_AGGREGATION="secagg+",
                                        SECAGG_BITS=24, SECAGG_MODULUS_BITS=64, **privacy,
                                        **other)
    for before, after in zip(plain, secure, strict=True):
        assert np.max(np.abs(before - after)) < 1e-6
    assert any(not np.array_equal(before, after) for before, after in zip(plain, secure))
    assert secure_rows[-1].get("epsilon") == plain_rows[-1].get("epsilon")
    assert bool(privacy) == ("epsilon" in secure_rows[-1])
    assert int(secure_rows[-1]["bytes_up"]) == 2 * int(plain_rows[-1]["bytes_up"])  # uint64
