"""The server's checks of what arrived: nothing a client or a node sends is trusted.

Before anything is decoded, every upload is checked against what the server expects this round
(its client was selected and answers once, for this round), against what the client can hold
(its sample and step counts, a finite non-negative loss) and against the upload format
(`upload_format.update_problem`, with what the algorithm uploads besides); the algorithm may
judge its own extras too (algorithms.Algorithm.screen: SCAFFOLD compares its variate changes
within the round). A refused upload becomes a Rejection that names its kind as data.
"""

import dataclasses

import numpy as np

import algorithms
import secure_aggregation
import Utils
import upload_format

Problem = upload_format.Problem


@dataclasses.dataclass
class Rejection:
    """An upload the server refused: its round, client and node (when known), why, and the
    kind of problem (upload_format.MALFORMED, NON_FINITE, ...)."""

    round_num: int
    client: object
    node: object
    reason: str
    kind: str = upload_format.MALFORMED

    def __str__(self):
        return (f"round {self.round_num}: rejected the upload of client {self.client!r} from "
                f"node {'-' if self.node is None else self.node}: {self.reason}")


def screen_uploads(settings, round_num, uploads, expected_clients, client_sizes, shapes,
                   step_limits=None):
    """Check every upload before anything is decoded; nothing a client sends is trusted.

    Args:
        settings: the server's Server_side.ServerSettings.
        uploads: what the engine delivered: upload_format.Upload objects, and Rejection objects
            for replies the engine could not even read.
        expected_clients: the clients selected (and not dropped) this round.
        client_sizes: how many samples every client holds (the server knows the partition).
        step_limits: {client: the partial step count the server asked of it} (stragglers).
    Returns:
        (accepted uploads, rejections); a client's first acceptable upload is kept.
    """
    expected = {int(client) for client in expected_clients}
    accepted, rejections, answered = [], [], set()
    for upload in uploads:
        if isinstance(upload, Rejection):
            rejections.append(upload)
            continue
        problem = upload_problem(settings, round_num, upload, expected, answered, client_sizes,
                                 shapes, step_limits or {})
        if problem is None:
            accepted.append(upload)
            answered.add(upload.client)
        else:
            rejections.append(Rejection(round_num, getattr(upload, "client", None),
                                        getattr(upload, "node", None), problem.text,
                                        problem.kind))
    if secure_aggregation.is_on(settings):
        return accepted, rejections  # The algorithm's extras are in the sum: nothing to judge.
    return algorithms.get(settings.algorithm).screen(round_num, accepted, rejections)


# Kinds of rejection the server adds to the upload format's own.
UNEXPECTED, IMPLAUSIBLE, OUTLIER = "unexpected", "implausible", "outlier"
# Accepted, then left out of a secure sum whose protocol lost its node (or unmasked nothing).
LEFT_OUT = "left_out"


def upload_problem(settings, round_num, upload, expected, answered, client_sizes, shapes,
                   step_limits=None):
    """Return the upload_format.Problem that refuses `upload` this round, or None."""
    if not isinstance(upload, upload_format.Upload):
        return Problem(upload_format.MALFORMED, "not an upload")
    if not Utils.is_integer(upload.round_num) or upload.round_num != round_num:
        return Problem(UNEXPECTED, f"stale or replayed: made for round {upload.round_num!r}")
    if not Utils.is_integer(upload.client) or upload.client not in expected:
        return Problem(UNEXPECTED, f"client {upload.client!r} was not selected this round")
    if upload.client in answered:
        return Problem(UNEXPECTED, "this client already answered this round")
    return (_metrics_problem(settings, upload, client_sizes[upload.client],
                             (step_limits or {}).get(upload.client))
            or _update_problem(settings, upload.update, shapes)
            or upload_format.extras_problem(upload.extras, () if secure_aggregation.is_on(
                settings) else algorithms.get(settings.algorithm).UPLOADED, shapes))


def _update_problem(settings, update, shapes):
    """The update's format: COMPRESSION's encoding, or a secure sum's contribution."""
    if secure_aggregation.is_on(settings):
        text = secure_aggregation.update_problem(update, settings.options,
                                                 secure_aggregation.sum_shapes(
                                                     shapes, algorithms.get(
                                                         settings.algorithm).UPLOADED))
        return Problem(upload_format.MALFORMED, text) if text else None
    return upload_format.update_problem(update, settings.compression, settings.topk_fraction,
                                        shapes)


def _metrics_problem(settings, upload, size, step_limit=None):
    """The sample count must be one the client can hold, the steps those it must take."""
    if not Utils.is_integer(upload.num_examples) or not 1 <= upload.num_examples <= size:
        return Problem(IMPLAUSIBLE,
                       f"sample count {upload.num_examples!r} is outside 1..{size}, what it holds")
    steps = upload_format.num_local_steps(upload.num_examples, settings.batch_size,
                                          settings.local_epochs)
    if step_limit is not None:  # a straggler's partial work, as the server asked
        steps = min(steps, step_limit)
    if not Utils.is_integer(upload.num_steps) or upload.num_steps != steps:
        return Problem(IMPLAUSIBLE,
                       f"step count {upload.num_steps!r}, expected {steps} for its samples")
    loss = upload.train_loss
    if not isinstance(loss, (float, int, np.floating)):
        return Problem(upload_format.MALFORMED, f"training loss {loss!r} is not a number")
    if not np.isfinite(loss):
        return Problem(upload_format.NON_FINITE, "training loss is NaN or infinity")
    if loss < 0:
        return Problem(IMPLAUSIBLE, f"training loss {loss!r} is negative")
    return None


def rejection_lines(round_num, rejections):
    """What to print of a round's rejections: one line each, but one line for all the clients
    a secure sum left out for the same reason."""
    lines = [str(rejection) for rejection in rejections if rejection.kind != LEFT_OUT]
    left_out = {}
    for rejection in rejections:
        if rejection.kind == LEFT_OUT:
            left_out.setdefault(rejection.reason, []).append(rejection.client)
    return lines + [f"round {round_num}: clients {sorted(clients)} left out of the secure "
                    f"sum: {why}" for why, clients in left_out.items()]
