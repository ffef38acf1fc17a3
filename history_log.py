"""history.csv, one row per round: which columns a run logs and how a round becomes a row.

Main.py runs the rounds; this module decides what each one leaves in the log (Utils writes it).
"""

import client_evaluation
import robust_rules

HISTORY_COLUMNS = ("round", "test_accuracy", "test_loss", "train_loss", "clients", "returned",
                   "rejected", "malicious", "samples", "bytes_down", "bytes_up", "mb_down_total",
                   "mb_up_total", "seconds")
BASELINE_COLUMNS = ("baseline_accuracy", "baseline_loss")
PRIVACY_COLUMNS = ("epsilon",)
KRUM_COLUMNS = ("krum_skipped",)
CLOCK_COLUMNS = ("virtual_seconds", "virtual_hours_total", "samples_trained")
ROUND_CLOCK_COLUMNS = ("deadline_dropped", "partial", "over_selection_cut")
ASYNC_COLUMNS = ("staleness_mean", "staleness_max")


def history_columns(config):
    """The columns of the run's history.csv: the common ones and those its options add."""
    clock = config["DEVICE_HETEROGENEITY"] != "none"
    return (HISTORY_COLUMNS + (BASELINE_COLUMNS if config["CENTRALIZED_BASELINE"] else ())
            + (client_evaluation.history_columns(config["HELD_OUT_CLIENTS"] > 0)
               if config["LOCAL_TEST_SHARE"] > 0 else ())
            + (PRIVACY_COLUMNS if config["DP_CLIP_NORM"] > 0 else ())
            + (KRUM_COLUMNS if config["AGGREGATION"] in robust_rules.KRUM_RULES else ())
            + (CLOCK_COLUMNS + (ASYNC_COLUMNS if config["ASYNC_BUFFER"] else ROUND_CLOCK_COLUMNS)
               if clock else ()))


def round_row(round_num, report, evaluation, num_selected, malicious, seconds):
    """Summarise one round for history.csv.

    train_loss is the returned clients' sample-weighted mean, empty when none returned; the test
    figures are empty in rounds without evaluation (see EVAL_EVERY); krum_skipped only with
    Krum, epsilon only with DP.
    """
    uploads = report.accepted
    test_loss, test_accuracy = evaluation
    num_samples = sum(upload.num_examples for upload in uploads)
    train_loss = (round(sum(upload.train_loss * upload.num_examples for upload in uploads)
                        / num_samples, 6) if uploads else "")
    row = {"round": round_num, "test_accuracy": rounded(test_accuracy),
           "test_loss": rounded(test_loss), "train_loss": train_loss, "clients": num_selected,
           "returned": len(uploads), "samples": num_samples, "seconds": round(seconds, 3),
           "malicious": sum(upload.client in malicious for upload in uploads),
           "rejected": len(report.rejections), "bytes_down": report.bytes_down,
           "bytes_up": report.bytes_up}
    if report.krum_skipped is not None:
        row["krum_skipped"] = int(report.krum_skipped)
    if report.epsilon is not None:
        row["epsilon"] = round(report.epsilon, 6)
    return row


def rounded(value):
    """Round a logged figure to 6 digits; None (not measured this round) becomes empty."""
    return "" if value is None else round(value, 6)


def add_totals(row, rows):
    """Add the cumulative megabytes sent down and up (and virtual hours, with devices),
    including this round, to its row."""
    previous = rows[-1] if rows else {"mb_down_total": 0.0, "mb_up_total": 0.0,
                                      "virtual_hours_total": 0.0}
    row["mb_down_total"] = round(previous["mb_down_total"] + row["bytes_down"] / 1e6, 6)
    row["mb_up_total"] = round(previous["mb_up_total"] + row["bytes_up"] / 1e6, 6)
    if "virtual_seconds" in row:
        row["virtual_hours_total"] = round(previous["virtual_hours_total"]
                                           + row["virtual_seconds"] / 3600, 6)
