"""Secure aggregation (SECURE_AGGREGATION): the server learns only the sum of a round's updates.

SecAgg+ (Bell et al., CCS 2020; SecAgg, Bonawitz et al., CCS 2017) adds masks to integer
vectors that cancel in their sum modulo M, so whoever aggregates sees only the sum. Its
arithmetic, which is all that changes results, is this module: each client clips every
coordinate of its update to [-R, R] (SECAGG_RANGE), maps it onto the integers 0 .. 2^b - 1
(SECAGG_BITS) by stochastic rounding keyed by (SEED, round, client), and multiplies it by its
weight (its sample count; 1 under DP-FedAvg, whose mean is uniform); the server sums the
contributions modulo M = 2^SECAGG_MODULUS_BITS and decodes only the sum and the total weight.
A configuration whose sum could reach M is refused before training (`capacity_problem`).

In process the masks are skipped, as pfl-research does: they cancel exactly, so the sum is the
one the protocol reveals. The server then holds each client's quantized contribution in memory.
On Flower the contributions stay on their nodes (an upload's update is HELD) and the protocol
(flower_secagg.py) hands the server their sum: a SecureSum.
"""

import math
import typing

import numpy as np

from constant_rules import integer, number
import upload_format

MODES = ("none", "secagg+")
CONSTANTS = {"SECAGG_RANGE": number("> 0"), "SECAGG_BITS": integer(1, 32),
             "SECAGG_MODULUS_BITS": integer(8, 64), "SECAGG_THRESHOLD": number("(0, 1]")}
# The one array of a layer's contribution (upload_format's encoded layers are dicts).
KEY = "secagg"
# An upload's update that stays on its node, whose protocol adds it into the sum.
HELD = "held by its node"


class SecureSum(typing.NamedTuple):
    """What a secure aggregation protocol gives the server: the modular sum of `clients`'
    contributions (None when it could not unmask it), {client: why it is not in the sum} of
    the other accepted clients, and the protocol's bytes."""

    total: list
    clients: frozenset
    why_left_out: dict
    bytes_down: int
    bytes_up: int


def is_on(settings):
    return settings.secure_aggregation != "none"


def wire_dtype(modulus_bits):
    """The unsigned integers a contribution travels in: residues modulo 2^modulus_bits."""
    return np.dtype(np.uint32 if modulus_bits <= 32 else np.uint64)


def quantize(delta, clip_range, bits, rng):
    """Clip each coordinate to [-R, R] and round it stochastically onto 0 .. 2^bits - 1
    (unbiased: E[q] = (x + R) (2^bits - 1) / 2R). Returns uint64 layer arrays."""
    levels = 2**bits - 1
    quantized = []
    for layer in delta:
        scaled = (np.clip(np.float64(layer), -clip_range, clip_range) + clip_range) * (
            levels / (2 * clip_range))
        floor = np.floor(scaled)
        up = rng.random(np.shape(scaled)) < scaled - floor
        quantized.append(np.minimum(floor + up, levels).astype(np.uint64))
    return quantized


def rounding_margin(options, shapes):
    """The most stochastic rounding can move an update in L2 norm: under a step of 2R / L per
    coordinate, sqrt(d) steps. DP clips to S minus this, so what the server decodes stays
    within S, the sensitivity its accountant assumes."""
    size = sum(int(np.prod(shape)) for shape in shapes)
    return 2 * options["SECAGG_RANGE"] / (2**options["SECAGG_BITS"] - 1) * np.sqrt(size)


def contribution(delta, weight, options, rng):
    """A client's encoded update: weight * quantize(delta) modulo M, one {KEY: array} a layer."""
    quantized = quantize(delta, options["SECAGG_RANGE"], options["SECAGG_BITS"], rng)
    mask = _residue_mask(options["SECAGG_MODULUS_BITS"])
    dtype = wire_dtype(options["SECAGG_MODULUS_BITS"])
    return [{KEY: ((np.uint64(weight) * layer) & mask).astype(dtype)} for layer in quantized]


def modular_sum(contributions, options):
    """The sum of encoded updates modulo M (what SecAgg reveals), as uint64 layer arrays."""
    mask = _residue_mask(options["SECAGG_MODULUS_BITS"])
    total = None
    for encoded in contributions:
        layers = [np.asarray(layer[KEY], np.uint64) for layer in encoded]
        # uint64 wraps modulo 2^64, a multiple of M: masking afterwards gives the sum mod M.
        total = layers if total is None else [
            (accumulated + layer) & mask for accumulated, layer in zip(total, layers)]
    return total


def decode_sum(total, total_weight, options):
    """sum_k w_k x_k of the clients' clipped updates x_k, from the modular sum of their
    contributions and sum_k w_k (the stochastic rounding's error is zero in expectation)."""
    clip_range, levels = options["SECAGG_RANGE"], 2**options["SECAGG_BITS"] - 1
    return [np.float64(layer) * (2 * clip_range / levels) - clip_range * total_weight
            for layer in total]


def sum_shapes(upload_shapes, uploaded):
    """The layer shapes of one contribution: the update's, then each of the algorithm's
    `uploaded` extras' (an algorithm that uploads extras needs whole-model uploads, so they
    have the update's shapes)."""
    return list(upload_shapes) * (1 + len(uploaded))


def threshold(options, parties):
    """How many parties' shares unmask a sum of `parties` (SECAGG_THRESHOLD a fraction)."""
    return max(1, math.ceil(options["SECAGG_THRESHOLD"] * parties - 1e-9))


def upload_bytes(update):
    """The bytes an upload's update took on the wire: none for one HELD on its node."""
    return 0 if isinstance(update, str) and update == HELD else upload_format.encoded_bytes(
        update)


def encoded_size(options, shapes):
    """The bytes of one contribution of `shapes` on the wire."""
    return wire_dtype(options["SECAGG_MODULUS_BITS"]).itemsize * sum(
        int(np.prod(shape)) for shape in shapes)


def update_problem(update, options, shapes):
    """Why an upload's update is not a contribution of `shapes`, or None: one array a layer,
    of the wire's integers, each of its layer's shape. Its values cannot be checked: any
    residue modulo M is a possible contribution (a malicious client's too)."""
    dtype = wire_dtype(options["SECAGG_MODULUS_BITS"])
    if isinstance(update, str) and update == HELD:
        return None  # its node's protocol checks the format of the masked sum it sends
    if not isinstance(update, list) or len(update) != len(shapes):
        return f"not {len(shapes)} layers of a secure-sum contribution"
    for index, (layer, shape) in enumerate(zip(update, shapes)):
        if not isinstance(layer, dict) or set(layer) != {KEY}:
            return f"layer {index} is not a secure-sum contribution"
        array = layer[KEY]
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != shape:
            return (f"layer {index} is not {dtype} of shape {shape} "
                    f"(got {getattr(array, 'dtype', type(array).__name__)} "
                    f"{getattr(array, 'shape', '')})")
    return None


def capacity_problem(options, weights, per_round):
    """Why sums of this configuration could wrap around M, or None.

    Args:
        weights: each training client's weight (its sample count, or 1 under DP).
        per_round: the most clients whose contributions one sum can hold.
    """
    largest = int(np.sum(np.sort(np.asarray(weights, np.int64))[::-1][:per_round]))
    bits, modulus_bits = options["SECAGG_BITS"], options["SECAGG_MODULUS_BITS"]
    peak = largest * (2**bits - 1)
    if peak < 2**modulus_bits:
        return None
    return (f"SECAGG_MODULUS_BITS {modulus_bits} is too small for SECAGG_BITS {bits}: a round's "
            f"sum can reach {largest:,} (total weight of its {per_round} heaviest clients) x "
            f"{2**bits - 1:,} = {peak:,} >= 2^{modulus_bits}; it needs at least "
            f"{int(peak).bit_length()} bits, or fewer SECAGG_BITS")


def _residue_mask(modulus_bits):
    return np.uint64(2**modulus_bits - 1)
