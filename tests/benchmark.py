"""Measure the simulator's speed against one plain `model.fit`, and its memory, in one process.

Run:  python tests/benchmark.py --rounds 20

(1) The limit: one `model.fit` of the same CNN, batch and optimizer over as many samples as a
    default round trains (C * 60,000 = 18,000), timed after a warm-up; the median of 3 fits, taken
    before and after the simulation so that drift on a shared machine hits both sides.
    For reference it also times the simulator's own compiled client step as one client holding all
    those samples: the most the simulator could reach with zero per-client and per-round overhead.
(2) The simulator: Main.py's own `build_federation` and `run_round` on the default configuration
    (or a CSV given with -f) for N rounds after one warm-up round: client samples trained per
    second of wall time, including selection, weight transfer, aggregation and test evaluation.
(3) Memory: peak RSS, and RSS growth from round 5 to the last round.
Prints a table and, as its last line, one JSON object with the figures. Like Main.py it turns on
TensorFlow's op determinism; --no-determinism leaves it off, to measure what it costs.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import Main  # noqa: E402
import Server_side  # noqa: E402
import Utils  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

LIMIT_REPEATS = 3


def rss_mb():
    """Current resident memory in MB (Linux /proc; peak RSS where /proc is missing)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fit_samples_per_second(config, x_train, y_train, num_samples):
    """Time one plain `model.fit` over `num_samples` samples; return samples per second."""
    model = Server_side.create_model()
    model.compile(optimizer=keras.optimizers.SGD(config["LEARNING_RATE"],
                                                 momentum=config["LOCAL_MOMENTUM"]),
                  loss="sparse_categorical_crossentropy")
    model.fit(x_train[:2000], y_train[:2000], batch_size=config["BATCH_SIZE"], verbose=0)
    start = time.perf_counter()
    model.fit(x_train[:num_samples], y_train[:num_samples], batch_size=config["BATCH_SIZE"],
              epochs=config["LOCAL_EPOCHS"], shuffle=True, verbose=0)
    return num_samples * config["LOCAL_EPOCHS"] / (time.perf_counter() - start)


def single_call_samples_per_second(federation, num_samples, rng):
    """Time the simulator's compiled local training as one client holding `num_samples`."""
    weights = federation.global_model.get_weights()
    indices = np.arange(num_samples)
    trainer = federation.host.trainer
    trainer.train(weights, indices[:2000], rng)
    start = time.perf_counter()
    trainer.train(weights, indices, rng)
    return num_samples * trainer.local_epochs / (time.perf_counter() - start)


def simulate(config, data, rounds):
    """Run Main.py's rounds.

    Returns:
        (samples per second, seconds of each round, RSS after each round, the federation).
    """
    client_indices = Main.partition_data(config, data.y_train)
    federation = Main.build_federation(config, data, client_indices)
    global_weights, _ = Main.run_round(0, config, federation,
                                       federation.global_model.get_weights(),
                                       federation.host.train)
    rss, seconds, samples = [], [], 0
    start = time.perf_counter()
    for round_num in range(1, rounds + 1):
        global_weights, row = Main.run_round(round_num, config, federation, global_weights,
                                             federation.host.train)
        samples += row["samples"] * config["LOCAL_EPOCHS"]
        seconds.append(row["seconds"])
        rss.append(rss_mb())
    return samples / (time.perf_counter() - start), seconds, rss, federation


def parse_arguments():
    parser = argparse.ArgumentParser(description="Simulator speed versus plain model.fit.")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("-f", "--file", help="optional param,val CSV of Main.py constants")
    parser.add_argument("--no-determinism", action="store_true",
                        help="leave TensorFlow's op determinism off (Main.py turns it on), "
                             "to measure what it costs")
    return parser.parse_args()


def main():
    arguments = parse_arguments()
    config = Main.default_config()
    if arguments.file:
        config.update(Utils.read_overrides(arguments.file, config))
    Main.validate_config(config)
    if not arguments.no_determinism:
        Utils.make_deterministic()
    data = Main.Data_Preprocessing.load_fashion_mnist(config["DATA_DIR"])
    Utils.seed_everything(config["SEED"])
    samples_per_round = int(round(config["CLIENT_FRACTION"] * len(data[1])))
    limits = [fit_samples_per_second(config, data[0], data[1], samples_per_round)
              for _ in range(LIMIT_REPEATS)]
    sim_rate, seconds, rss, federation = simulate(config, data, arguments.rounds)
    single_rates = [single_call_samples_per_second(federation, samples_per_round,
                                                   np.random.default_rng(repeat))
                    for repeat in range(LIMIT_REPEATS)]
    limits += [fit_samples_per_second(config, data[0], data[1], samples_per_round)
               for _ in range(LIMIT_REPEATS)]
    limit_rate = statistics.median(limits)
    early = rss[min(4, len(rss) - 1)]
    result = {
        "limit_samples_per_s": round(limit_rate, 1),
        "sim_samples_per_s": round(sim_rate, 1),
        "ratio": round(sim_rate / limit_rate, 3),
        "seconds_per_round": round(statistics.median(seconds), 3),
        "rss_mb": round(peak_rss_mb(), 1),
        "rss_growth_pct": round(100 * (rss[-1] - early) / early, 2),
        "single_call_samples_per_s": round(statistics.median(single_rates), 1),
        "rounds": arguments.rounds,
        "op_determinism": not arguments.no_determinism,
        "limit_fits_samples_per_s": [round(rate) for rate in limits],
        "machine": (f"{platform.machine()}, {os.cpu_count()} cores, "
                    f"TF {Main.Client_side.tf.__version__}"),
    }
    print(f"machine: {result['machine']}")
    print(f"{'what':<44}{'samples/s':>12}{'ratio':>8}")
    print(f"{'plain model.fit, median of ' + str(len(limits)) + ' (the limit)':<44}"
          f"{limit_rate:>12,.0f}{1:>8.2f}")
    single_rate = result["single_call_samples_per_s"]
    print(f"{'compiled client step, one call (reference)':<44}"
          f"{single_rate:>12,.0f}{single_rate / limit_rate:>8.2f}")
    print(f"{'simulator, ' + str(arguments.rounds) + ' rounds incl. evaluation':<44}"
          f"{sim_rate:>12,.0f}{result['ratio']:>8.2f}")
    print(f"median seconds per round {result['seconds_per_round']}, peak RSS "
          f"{result['rss_mb']} MB, RSS growth round 5 -> {arguments.rounds}: "
          f"{result['rss_growth_pct']} %")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
