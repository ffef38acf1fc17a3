"""When a run diverges: stop it with the round, what went wrong and its likely cause.

Main.run stops a run whose global model or test loss stopped being finite numbers (and a round
whose every upload was NaN or infinite); the error names the round, the most likely cause for
the configuration and what the run's folder keeps. In a comparison the other runs go on.
"""

import numpy as np

import algorithms


class ClientsDiverged(Exception):
    """Every upload of a round was NaN or infinite: local training diverged on every client."""


class DivergenceError(Exception):
    """The global model's weights or test loss stopped being finite numbers.

    `rows` holds the history of the rounds before, for comparisons.
    """

    def __init__(self, message, rows=()):
        super().__init__(message)
        self.rows = list(rows)


def check_finite(round_num, global_weights, row, config, output_dir, rows):
    """Stop the run with DivergenceError when the new global model is NaN or infinite."""
    finite_weights = all(np.isfinite(layer).all() for layer in global_weights)
    if finite_weights and (row["test_loss"] == "" or np.isfinite(row["test_loss"])):
        return
    raise divergence(round_num, f"the global model diverged (test loss {row['test_loss']}, "
                     f"finite weights: {finite_weights})", config, output_dir, rows)


def divergence(round_num, what, config, output_dir, rows):
    """Build the DivergenceError of round `round_num`, naming the likely cause."""
    kept = (f"{output_dir} keeps the history of rounds 1-{round_num - 1} and its last checkpoint"
            if round_num > 1 else "no round had finished")
    return DivergenceError(f"round {round_num}: {what}; likely cause: "
                           f"{likely_divergence_cause(config)}; {kept}", rows)


def likely_divergence_cause(config):
    """Name what most likely made this configuration diverge, most specific first."""
    if config["MALICIOUS_FRACTION"] > 0:
        return (f"the {config['ATTACK']} attackers (MALICIOUS_FRACTION "
                f"{config['MALICIOUS_FRACTION']}, AGGREGATION {config['AGGREGATION']})")
    if config["SERVER_OPTIMIZER"] != "sgd" or config["SERVER_LR"] > 1:
        return (f"the server step: SERVER_OPTIMIZER {config['SERVER_OPTIMIZER']} with SERVER_LR "
                f"{config['SERVER_LR']} is too large")
    cause = algorithms.get(config["ALGORITHM"]).divergence_cause(config)
    if cause:
        return cause
    if config["LOCAL_MOMENTUM"] > 0:
        return (f"LEARNING_RATE {config['LEARNING_RATE']} is too high for LOCAL_MOMENTUM "
                f"{config['LOCAL_MOMENTUM']} (the effective step is about lr / (1 - momentum))")
    return f"LEARNING_RATE {config['LEARNING_RATE']} is too high"
