"""Malicious clients: which clients attack, and what a poisoned update looks like.

MALICIOUS_FRACTION of the clients, chosen once per run from SEED, attack whenever selected:
label_flip trains on labels 9 - y (ClientHost gives them a trainer of their own), sign_flip
uploads -ATTACK_SCALE x its update (Fang et al. 2020's sign-flipping), gaussian uploads Gaussian
noise as long as its update. The robust rules of robust_rules.py are what the server opposes.
"""

import numpy as np

import Utils
import upload_format

ATTACKS = ("label_flip", "sign_flip", "gaussian")


def malicious_clients(num_clients, malicious_fraction, seed):
    """Return the set of attacking clients: C_mal K of them (rounded half up), fixed by SEED."""
    count = Utils.round_half_up(malicious_fraction * num_clients)
    return set(Utils.rng(seed, "attack").choice(num_clients, count, replace=False).tolist())


def attack_update(delta, attack, scale, rng):
    """Replace an honest update by a malicious one.

    sign_flip: -scale * delta; gaussian: Gaussian noise rescaled to the update's L2 norm.
    (label_flip attacks the training data instead, so it leaves the update as trained.)
    """
    if attack == "sign_flip":
        return [-scale * np.float64(layer) for layer in delta]
    if attack == "gaussian":
        noise = [rng.standard_normal(np.shape(layer)) for layer in delta]
        factor = upload_format.update_norm(delta) / max(upload_format.update_norm(noise), 1e-12)
        return [factor * layer for layer in noise]
    return delta
