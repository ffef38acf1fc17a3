"""SecAgg's protocol (secagg_protocol.py) among parties in one process: the server unmasks
exactly the survivors' sum, a party dropped after sharing its keys is unmasked from the others'
shares, below the threshold nothing is, and a masked input says nothing of its input."""

import numpy as np
import pytest

import secagg_protocol

BITS = 32
SHAPES = [(5, 3), (7,)]


def inputs(count, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, 2**BITS, shape, dtype=np.uint64) for shape in SHAPES]
            for _ in range(count)]


def run(vectors, threshold, drop_after_sharing=(), silent_in_unmask=()):
    """The four stages with parties 10, 20, ...; returns (server's sum, parties, masked)."""
    parties = [secagg_protocol.Party(10 * (position + 1), threshold, BITS)
               for position in range(len(vectors))]
    public_keys = {party.id: party.public_keys for party in parties}
    routed = {party.id: {} for party in parties}
    for party in parties:
        for target, ciphertext in party.share_keys(public_keys).items():
            routed[target][party.id] = ciphertext
    masked = {party.id: party.masked_input(vector, routed[party.id])
              for party, vector in zip(parties, vectors) if party.id not in drop_after_sharing}
    alive, dropped = sorted(masked), sorted(drop_after_sharing)
    revealed = {party.id: party.unmask(alive, dropped) for party in parties
                if party.id in masked and party.id not in silent_in_unmask}
    return (secagg_protocol.unmasked_sum(masked, revealed, public_keys, threshold, BITS),
            parties, masked)


def plain_sum(vectors):
    return [sum(layers) & np.uint64(2**BITS - 1) for layers in zip(*vectors)]


def test_secagg_protocol_unmasks_exactly_the_sum():
    vectors = inputs(4)
    total, _, _ = run(vectors, threshold=3)
    for got, wanted in zip(total, plain_sum(vectors), strict=True):
        np.testing.assert_array_equal(got, wanted)


def test_secagg_protocol_unmasks_the_survivors_when_a_party_drops_after_sharing_keys():
    vectors = inputs(4, seed=1)
    total, _, _ = run(vectors, threshold=3, drop_after_sharing=(30,))
    for got, wanted in zip(total, plain_sum([vectors[0], vectors[1], vectors[3]]), strict=True):
        np.testing.assert_array_equal(got, wanted)


def test_secagg_protocol_below_the_threshold_unmasks_nothing():
    with pytest.raises(secagg_protocol.BelowThreshold, match="fewer than the threshold 3"):
        run(inputs(4, seed=2), threshold=3, drop_after_sharing=(30,),
            silent_in_unmask=(40,))


def test_secagg_protocol_a_masked_input_is_not_its_input():
    """What the server receives from a party differs from its input in nearly every entry and
    is uncorrelated with it: the masks are uniform modulo 2^32."""
    vectors = inputs(3, seed=3)
    _, _, masked = run(vectors, threshold=2)
    sent, own = np.concatenate([np.ravel(layer) for layer in masked[10]]), np.concatenate(
        [np.ravel(layer) for layer in vectors[0]])
    assert np.mean(sent == own) < 0.1
    assert abs(np.corrcoef(sent.astype(float), own.astype(float))[0, 1]) < 0.5


def test_secagg_protocol_a_party_never_reveals_both_secrets_of_one_party():
    _, parties, _ = run(inputs(3, seed=4), threshold=2)
    with pytest.raises(ValueError, match="both alive and dropped"):
        parties[0].unmask([10, 20], [20])


def test_secagg_protocol_masks_are_uniform_and_keyed_by_the_whole_secret():
    first = secagg_protocol.masks(bytes(32), [(20000,)], 16)[0]
    other = secagg_protocol.masks(bytes(31) + b"\x01", [(20000,)], 16)[0]
    assert first.max() < 2**16 and abs(first.mean() / 2**16 - 0.5) < 0.01
    assert np.mean(first == other) < 0.01
