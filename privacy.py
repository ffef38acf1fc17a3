"""DP-FedAvg at the server: clipped updates, Gaussian noise, and the privacy accountant.

McMahan et al. (2018), "Learning Differentially Private Recurrent Language Models": the server
clips every update to S, adds N(0, (z S)^2) to their sum and divides by a count that does not
depend on the data; epsilon comes from Google's dp-accounting (Renyi DP of the sampled Gaussian
mechanism) for the sampling and neighbouring relation actually run.
"""

import functools
import logging

import numpy as np

import Utils
import upload_format


def dp_noisy_mean(deltas, shapes, clip_norm, noise_multiplier, denominator, rng):
    """DP-FedAvg's server step: (sum of clipped updates + N(0, (z S)^2)) / denominator.

    The server clips every decoded update to S itself: it cannot trust that a client did, and
    the noise is calibrated to S. `denominator` must not depend on the data: the number of
    updates averaged for fixed-size sampling, the expected number for Poisson sampling
    (McMahan et al. 2018's fixed-denominator estimator). With no update at all (Poisson) the
    noise is still added, as the accounted mechanism does.

    Args:
        deltas: decoded client updates (lists of float64 layer arrays); may be empty.
        shapes: the layer shapes, for the empty case.
    Returns:
        list of float64 layer arrays.
    """
    clipped = [upload_format.clip_update(delta, clip_norm) for delta in deltas]
    total = [np.zeros(shape) for shape in shapes]
    for delta in clipped:
        total = [accumulated + layer for accumulated, layer in zip(total, delta)]
    return noisy_mean_of_sum(total, clip_norm, noise_multiplier, denominator, rng)


def noisy_mean_of_sum(total, clip_norm, noise_multiplier, denominator, rng):
    """(sum of updates clipped to S + N(0, (z S)^2)) / denominator, from the sum alone (under
    secure aggregation the clients clip: the server never sees an update to clip)."""
    deviation = noise_multiplier * clip_norm
    return [(layer + rng.normal(0.0, deviation, np.shape(layer))) / denominator
            for layer in total]


DP_NOISE_SOURCES = ("seeded", "secure")


def noise_generator(source, seed, round_num):
    """Return the generator of a round's DP noise.

    seeded: keyed by (SEED, round), so a simulation is reproducible, but anyone who knows the
    config can regenerate the noise and subtract it from the published model. secure: seeded
    from the operating system's entropy, which no one can regenerate (the Flower default).
    """
    if source == "seeded":
        return Utils.rng(seed, "privacy", round_num)
    if source == "secure":
        return Utils.secret_rng()
    raise ValueError(f"DP_NOISE must be one of {', '.join(DP_NOISE_SOURCES)}, got {source!r}")


def dp_denominator(sampling, num_returned, num_clients, client_fraction, dropout):
    """Return the count DP-FedAvg divides the noisy sum by (see `dp_noisy_mean`)."""
    if sampling == "poisson":
        return client_fraction * num_clients * (1 - dropout)
    return num_returned


def privacy_spent(noise_multiplier, sampling, num_clients, client_fraction, rounds, delta):
    """Epsilon of DP-FedAvg after `rounds` rounds, from Google's dp-accounting (RDP).

    Each round is a sampled Gaussian mechanism on the sum of clipped updates, noise std z S:
    - poisson: Poisson sampling at rate C, add-or-remove-one client (sensitivity S, so the
      noise multiplier is z), as in McMahan et al. 2018;
    - fixed: m of K clients without replacement, replace-one client (Wang et al. 2019; K is
      public). Replacing one client's update by another moves the sum by up to 2 S, so the
      noise multiplier is z / 2 (dp-accounting 0.6's RDP accountant does not double the
      sensitivity itself: tests/test_server_side.py checks that this still holds).
    Dropout only removes updates, so it is not counted (the bound stays valid).
    The orders are the library's defaults, fractional ones from 1.1 up included: the bound is
    often tightest below order 2.
    """
    from dp_accounting.rdp import rdp_privacy_accountant  # Only runs with DP pay for SciPy.

    if noise_multiplier == 0:
        return float("inf")
    orders, one_round = _round_rdp(noise_multiplier, sampling, num_clients, client_fraction)
    epsilon, _ = rdp_privacy_accountant.compute_epsilon(orders, rounds * one_round, delta)
    return float(epsilon)


@functools.lru_cache(maxsize=8)
def _round_rdp(noise_multiplier, sampling, num_clients, client_fraction):
    """Return (orders, one round's RDP at them); rounds compose by multiplying the RDP.

    Cached because the library recomputes the sampled mechanism on every compose (0.2 s for
    sampling without replacement), and the run asks for epsilon every round.
    """
    import dp_accounting

    if sampling == "poisson":
        accountant = dp_accounting.rdp.RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(
            client_fraction, dp_accounting.GaussianDpEvent(noise_multiplier))
    else:
        accountant = dp_accounting.rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, Utils.num_selected_clients(num_clients, client_fraction),
            dp_accounting.GaussianDpEvent(noise_multiplier / 2))
    # At low orders and high rates the library's series for fractional orders may not
    # converge; it then counts that order as infinite (still a valid bound) and warns per order.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        accountant.compose(event)
    finally:
        absl_logger.setLevel(level)
    return tuple(accountant.orders), accountant.rdp
