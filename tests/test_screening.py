"""The server trusts nothing a node sends: every upload is screened before it is decoded
(screening.py), and what it refuses is reported by kind."""

import dataclasses

import numpy as np
import pytest

import privacy
import Server_side
import robust_rules
import screening
import upload_format

SHAPES = [(3, 4), (5,)]
SIZES = [40] * 10  # every client holds 40 samples: E = 1, B = 32 gives 2 steps


def screening_config(**overrides):
    import Main

    return {**Main.default_config(), "NUM_CLIENTS": 10, "BATCH_SIZE": 32, "LOCAL_EPOCHS": 1,
            **overrides}


def server_settings(config):
    return Server_side.ServerSettings.from_config(config)


def screened(config, uploads, expected_clients):
    """Screen round 4's uploads against the test's clients (SIZES) and model (SHAPES)."""
    return screening.screen_uploads(server_settings(config), 4, uploads, expected_clients, SIZES,
                                    SHAPES)


def good_upload(client, config, round_num=4, seed=0):
    rng = np.random.default_rng(seed + client)
    delta = [rng.standard_normal(shape) * 0.1 for shape in SHAPES]
    variate = ([rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
               if config["ALGORITHM"] == "scaffold" else None)
    encoded = upload_format.encode_update(delta, config["COMPRESSION"], rng,
                                        config["TOPK_FRACTION"])
    return upload_format.Upload(client, round_num, encoded, 40, 2, 0.5,
                                None if variate is None else {"variate": variate})


def with_layer(upload, index, **arrays):
    """A copy of `upload` whose layer `index` has these arrays replaced (None removes one)."""
    layers = [dict(layer) for layer in upload.update]
    for name, value in arrays.items():
        if value is None:
            layers[index].pop(name)
        else:
            layers[index][name] = value
    return dataclasses.replace(upload, update=layers)


def topk_indices(upload, change):
    indices = upload.update[0]["indices"].copy()
    change(indices)
    return with_layer(upload, 0, indices=indices)


BAD_UPLOADS = {
    # name: (constants, how client 5's upload is spoilt, what the reason says)
    "wrong shape": ({}, lambda u: with_layer(u, 0, values=np.zeros((3, 5), np.float32)),
                    "has shape (3, 5)"),
    "oversized array": ({}, lambda u: with_layer(u, 1, values=np.zeros(10**6, np.float32)),
                        "has shape (1000000,)"),
    "wrong dtype": ({}, lambda u: with_layer(u, 0, values=np.zeros((3, 4))), "dtype float64"),
    "NaN": ({}, lambda u: with_layer(u, 1, values=np.full(5, np.nan, np.float32)), "NaN"),
    "infinity": ({}, lambda u: with_layer(u, 0, values=np.full((3, 4), np.inf, np.float32)),
                 "infinity"),
    "extra array": ({}, lambda u: with_layer(u, 0, extra=np.zeros(2, np.float32)), "holds"),
    "missing layer": ({}, lambda u: dataclasses.replace(u, update=u.update[:1]), "2 layers"),
    "layer not a dict": ({}, lambda u: dataclasses.replace(u, update=[[1, 2], u.update[1]]),
                         "holds list"),
    "missing int8 step": ({"COMPRESSION": "int8"}, lambda u: with_layer(u, 0, step=None),
                          "holds"),
    "negative int8 step": ({"COMPRESSION": "int8"},
                           lambda u: with_layer(u, 0, step=np.array(-0.1, np.float32)),
                           "step is negative"),
    "NaN int8 offset": ({"COMPRESSION": "int8"},
                        lambda u: with_layer(u, 1, offset=np.array(np.nan, np.float32)), "NaN"),
    "int8 codes of another dtype": ({"COMPRESSION": "int8"},
                                    lambda u: with_layer(u, 0, codes=np.zeros((3, 4), np.int16)),
                                    "dtype int16"),
    "top-k index out of range": ({"COMPRESSION": "topk", "TOPK_FRACTION": 0.25},
                                 lambda u: topk_indices(u, lambda i: i.__setitem__(0, 12)),
                                 "outside 0..11"),
    "negative top-k index": ({"COMPRESSION": "topk", "TOPK_FRACTION": 0.25},
                             lambda u: topk_indices(u, lambda i: i.__setitem__(0, -1)),
                             "outside 0..11"),
    "repeated top-k index": ({"COMPRESSION": "topk", "TOPK_FRACTION": 0.25},
                             lambda u: topk_indices(u, lambda i: i.__setitem__(1, i[0])),
                             "repeats"),
    "more top-k entries than sent": ({"COMPRESSION": "topk", "TOPK_FRACTION": 0.25},
                                     lambda u: with_layer(u, 0, indices=np.arange(6, dtype="i4"),
                                                          values=np.ones(6, np.float32)),
                                     "has shape (6,)"),
    "negative sample count": ({}, lambda u: dataclasses.replace(u, num_examples=-40),
                              "sample count -40"),
    "inflated sample count": ({}, lambda u: dataclasses.replace(u, num_examples=41, num_steps=2),
                              "sample count 41 is outside 1..40"),
    "sample count as text": ({}, lambda u: dataclasses.replace(u, num_examples="40"),
                             "sample count '40'"),
    "wrong step count": ({}, lambda u: dataclasses.replace(u, num_steps=9), "step count 9"),
    "NaN training loss": ({}, lambda u: dataclasses.replace(u, train_loss=float("nan")),
                          "training loss"),
    "stale round": ({}, lambda u: dataclasses.replace(u, round_num=3), "stale or replayed"),
    "client not selected": ({}, lambda u: dataclasses.replace(u, client=7), "not selected"),
    "client id not an integer": ({}, lambda u: dataclasses.replace(u, client=5.0),
                                 "not selected"),
    "not an upload": ({}, lambda u: {"client": 5}, "not an upload"),
    "variate without SCAFFOLD": ({}, lambda u: dataclasses.replace(
        u, extras={"variate": [np.zeros(shape, np.float32) for shape in SHAPES]}),
        "its algorithm uploads []"),
    "NaN variate": ({"ALGORITHM": "scaffold"}, lambda u: dataclasses.replace(
        u, extras={"variate": [np.full((3, 4), np.nan, np.float32),
                               u.extras["variate"][1]]}),
        "variate layer 0"),
}


def aggregated(config, uploads):
    server = Server_side.Server(server_settings(config), SHAPES)
    return server.aggregate(4, [np.zeros(shape, np.float32) for shape in SHAPES], uploads)


@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
def test_a_malformed_upload_is_rejected_with_its_reason_and_changes_nothing(name):
    constants, spoil, reason = BAD_UPLOADS[name]
    config = screening_config(**constants)
    honest = good_upload(2, config)
    delivered = [honest, spoil(good_upload(5, config))]
    accepted, rejections = screened(config, delivered, [2, 5])
    assert accepted == [honest]
    (rejection,) = rejections
    assert reason in rejection.reason and "round 4" in str(rejection)
    for with_bad, without in zip(aggregated(config, accepted), aggregated(config, [honest])):
        np.testing.assert_array_equal(with_bad, without)


def test_the_same_client_twice_keeps_only_its_first_upload():
    config = screening_config()
    first, again = good_upload(2, config), good_upload(2, config, seed=9)
    accepted, rejections = screened(config, [first, again], [2])
    assert accepted == [first] and "already answered" in rejections[0].reason


@pytest.mark.parametrize("compression", upload_format.COMPRESSIONS)
def test_honest_uploads_of_every_encoding_pass_the_checks(compression):
    for algorithm in ("fedavg", "scaffold"):
        config = screening_config(COMPRESSION=compression, ALGORITHM=algorithm,
                                  TOPK_FRACTION=0.25)
        uploads = [good_upload(client, config) for client in (2, 5)]
        accepted, rejections = screened(config, uploads, [2, 5])
        assert accepted == uploads and rejections == []


def test_a_round_where_every_upload_is_rejected_keeps_the_model():
    config = screening_config()
    bad = dataclasses.replace(good_upload(5, config), round_num=1)
    accepted, rejections = screened(config, [bad], [5])
    assert accepted == [] and len(rejections) == 1
    for layer in aggregated(config, accepted):
        assert not layer.any()


def test_secure_dp_noise_cannot_be_regenerated_from_the_config():
    """Seeded noise is keyed by (SEED, round): the same twice, so an observer who knows the
    config can subtract it. Secure noise comes from OS entropy: two draws of a round differ."""
    results = {}
    for source in privacy.DP_NOISE_SOURCES:
        config = screening_config(DP_CLIP_NORM=1.0, DP_NOISE=source)
        uploads = [good_upload(client, config) for client in (2, 5)]
        results[source] = [aggregated(config, uploads) for _ in range(2)]
    for first, second in zip(*results["seeded"]):
        np.testing.assert_array_equal(first, second)
    first, second = results["secure"]
    assert not np.array_equal(first[0], second[0])
    assert not np.array_equal(first[0], results["seeded"][0][0])


@pytest.mark.parametrize("rule", ["krum", "multi_krum"])
def test_krum_with_fewer_than_2f_plus_3_updates_keeps_the_model(rule):
    """With f = 1 Krum needs 5 updates: 4 keep the global model, 5 move it."""
    config = screening_config(AGGREGATION=rule, KRUM_F=1)
    start = [np.zeros(shape, np.float32) for shape in SHAPES]
    for count, moves in ((4, False), (5, True)):
        uploads = [good_upload(client, config) for client in range(count)]
        new = Server_side.Server(server_settings(config), SHAPES).aggregate(4, start, uploads)
        assert robust_rules.too_few_for_krum(rule, 1, count) is not moves
        assert any(not np.array_equal(layer, zero) for layer, zero in zip(new, start)) is moves


def test_a_scaffold_variate_change_far_beyond_the_rounds_others_is_rejected():
    """One client's c_i+ - c_i 1,000 times longer than the others' would move the server's c
    by itself; it is rejected, and c moves as if that client had not returned."""
    config = screening_config(ALGORITHM="scaffold")
    honest = [good_upload(client, config) for client in (1, 2, 3, 4)]
    forged = good_upload(5, config)
    forged = dataclasses.replace(forged, extras={"variate": [
        1000 * layer for layer in forged.extras["variate"]]})
    accepted, rejections = screened(config, honest + [forged], [1, 2, 3, 4, 5])
    assert accepted == honest
    (rejection,) = rejections
    assert rejection.client == 5 and "more than 10 times the round's median" in rejection.reason
    with_forged, without = (Server_side.Server(server_settings(config), SHAPES) for _ in range(2))
    start = [np.zeros(shape, np.float32) for shape in SHAPES]
    with_forged.aggregate(4, start, accepted)
    without.aggregate(4, start, honest)
    for kept, clean in zip(with_forged.sent_to_clients()["variate"],
                           without.sent_to_clients()["variate"]):
        np.testing.assert_array_equal(kept, clean)
    # Variates of the same scale all pass, whatever their spread within 10x.
    mixed = honest + [dataclasses.replace(good_upload(5, config), extras={"variate": [
        3 * layer for layer in good_upload(5, config).extras["variate"]]})]
    assert screened(config, mixed, [1, 2, 3, 4, 5])[1] == []


def test_the_servers_round_reports_what_it_refused_by_kind():
    """A round whose every upload is NaN diverged; one with a NaN and a stale upload did not:
    the kind of each rejection is data, not a phrase to search for."""
    config = screening_config()
    start = [np.zeros(shape, np.float32) for shape in SHAPES]
    nan = dataclasses.replace(good_upload(2, config), train_loss=float("nan"))
    stale = dataclasses.replace(good_upload(5, config), round_num=3)
    server = Server_side.Server(server_settings(config), SHAPES, SIZES)
    new, report = server.round(4, start, [nan], [2], num_selected=1)
    assert report.diverged and [rejection.kind for rejection in report.rejections] == [
        upload_format.NON_FINITE]
    new, report = server.round(4, start, [nan, stale], [2, 5], num_selected=2)
    assert not report.diverged and report.accepted == []
    assert [rejection.kind for rejection in report.rejections] == [upload_format.NON_FINITE,
                                                                   screening.UNEXPECTED]
    honest = good_upload(5, config)
    new, report = server.round(4, start, [honest], [2, 5], num_selected=3)
    model_bytes = 4 * (12 + 5)
    assert (report.bytes_down, report.bytes_up) == (3 * model_bytes, model_bytes)
    assert report.krum_skipped is None and report.epsilon is None
