"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", Algorithm 1 with option II): each client adds the correction c - c_i to every local
gradient and keeps its control variate c_i; the server averages updates uniformly and moves its
variate c by the participating share of the mean variate change."""

import numpy as np

import algorithms
import screening
import upload_format

# c moves by the plain mean of the variate changes, so one client could move it anywhere.
# Honest changes of a round stay close in norm: over the 50 rounds of each SCAFFOLD run of
# docs/algorithms.md (seed 0) the largest was at most 2.2 (shards), 3.4 (dirichlet) and 1.7
# (iid) times the round's median.
VARIATE_OUTLIER_FACTOR = 10


def client_variate(own, shared, global_weights, new_weights, num_steps, learning_rate):
    """SCAFFOLD's option II: c_i+ = c_i - c + (x - y_i) / (a_i * eta_l).

    The paper divides by K * eta_l, K local steps of plain SGD. With momentum the same K steps
    move the weights a_i * eta_l times the mean corrected gradient (see
    `upload_format.effective_steps`), so dividing by K would inflate the variates every time a
    client takes part; a_i = K without momentum, so plain SGD is the paper's formula.

    Args:
        own, shared: c_i and c, lists of layer arrays.
        global_weights, new_weights: x (the round's start) and y_i (after the local steps).
        num_steps: a_i, the client's effective steps; learning_rate: eta_l.
    Returns:
        c_i+ as float32 layer arrays.
    """
    return [(np.float64(mine) - common + (np.float64(start) - end) / (num_steps * learning_rate))
            .astype(np.float32)
            for mine, common, start, end in zip(own, shared, global_weights, new_weights,
                                                strict=True)]


def server_variate(variate, variate_deltas, num_clients):
    """c <- c + (|S| / N) * mean_i (c_i+ - c_i), over the |S| clients that returned."""
    mean_delta = algorithms.uniform_mean(variate_deltas)
    share = len(variate_deltas) / num_clients
    return [(np.float64(layer) + share * delta).astype(np.float32)
            for layer, delta in zip(variate, mean_delta)]


def without_variate_outliers(round_num, uploads):
    """Reject variate changes longer than VARIATE_OUTLIER_FACTOR times the round's median norm
    (a median needs at least 3 uploads to be one an outlier cannot set)."""
    if len(uploads) < 3:
        return uploads, []
    norms = [upload_format.update_norm(upload.extras["variate"]) for upload in uploads]
    median = float(np.median(norms))
    kept = [upload for upload, norm in zip(uploads, norms)
            if norm <= VARIATE_OUTLIER_FACTOR * median]
    rejected = [screening.Rejection(
        round_num, upload.client, upload.node,
        f"its control variate change has norm {norm:.3g}, more than "
        f"{VARIATE_OUTLIER_FACTOR} times the round's median {median:.3g}", screening.OUTLIER)
        for upload, norm in zip(uploads, norms) if norm > VARIATE_OUTLIER_FACTOR * median]
    return kept, rejected


class Scaffold(algorithms.Algorithm):
    """Control variates: c_i on each client, c on the server, c - c_i corrects local steps."""

    PAPER = ("Karimireddy et al. 2020, SCAFFOLD: Stochastic Controlled Averaging for Federated "
             "Learning (Algorithm 1, option II)")
    CLIENT_STATE = ("variate",)
    SERVER_STATE = ("variate",)
    SENT = ("variate",)
    UPLOADED = ("variate",)
    WHOLE_MODEL = True
    SUMMABLE = True

    def correction(self, kept, received):
        return [shared - own for shared, own in zip(received["variate"], kept["variate"])]

    def after_training(self, kept, received, global_weights, result):
        own = kept["variate"]
        new = client_variate(own, received["variate"], global_weights, result.new_weights,
                             upload_format.effective_steps(result.num_steps,
                                                           self.settings.local_momentum),
                             self.settings.learning_rate)
        return {"variate": new}, {"variate": [after - before for after, before in zip(new, own)]}

    @classmethod
    def screen(cls, round_num, accepted, rejections):
        kept, outliers = without_variate_outliers(round_num, accepted)
        return kept, rejections + outliers

    def combine(self, deltas, uploads, population):
        self.state["variate"] = server_variate(
            self.state["variate"], [upload.extras["variate"] for upload in uploads], population)
        return algorithms.uniform_mean(deltas)

    # Under secure aggregation the sum carries each update and variate change, uniformly
    # weighted. A variate change is a mean gradient; times the learning rate it is a mean step,
    # the size of an update over its steps, so SECAGG_RANGE fits it as it fits the update.
    def summand(self, delta, result, extras):
        return list(delta) + [self.settings.learning_rate * np.float64(layer)
                              for layer in extras["variate"]]

    def sum_weight(self, num_examples):
        return 1

    def from_secure_mean(self, mean, uploads, population):
        layers = len(self.shapes)
        mean_change = [layer / self.settings.learning_rate for layer in mean[layers:]]
        share = len(uploads) / population
        self.state["variate"] = [(np.float64(layer) + share * change).astype(np.float32)
                                 for layer, change in zip(self.state["variate"], mean_change)]
        return mean[:layers]

    @classmethod
    def divergence_cause(cls, config):
        return (f"SCAFFOLD's control variates grew: lower LEARNING_RATE "
                f"{config['LEARNING_RATE']} or LOCAL_MOMENTUM {config['LOCAL_MOMENTUM']}")


PLUGIN = Scaffold
