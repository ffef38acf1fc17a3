"""Measure the simulator's speed against one plain `model.fit`, and its memory, in one process.

Run:  python tests/benchmark.py --scenario NAME [--rounds N]   (NAME: see SCENARIOS below)

(1) The limit: one `model.fit` of the same CNN with the scenario's batch size and optimizer over
    as many samples as a round trains (at least 18,000, so that it is long enough to time), after
    a warm-up; the median of 3 fits taken before and after the simulation so that drift on a
    shared machine hits both sides. FedSGD (B = 0) fits with the mean client size as its batch.
(2) The project's own single compiled call: one client holding those samples, same batch size;
    what the simulator could reach with zero per-client and per-round overhead.
(3) The simulator: Main.py's own `build_federation` and `run_round` on the scenario for N rounds
    after one warm-up round: client samples trained per second of wall time, including
    selection, weight transfer, screening, aggregation and the test evaluation every EVAL_EVERY
    rounds (and after the last).
(4) Memory: peak RSS, and RSS growth from the first quarter of the rounds to the last.
(5) With LOCAL_TEST_SHARE (scenario personal_k100): a per-client evaluation round
    (ClientHost.evaluate: every client's global and own model on its local test data) against
    one test evaluation of the global model; and scoring K models on their clients' rows in
    the compiled calls against one Keras `predict` per client (medians of 3).
Prints a table and, as its last line, one JSON object with the figures (ratio = simulator / fit,
ratio_single_call = simulator / single call). Like Main.py it turns on TensorFlow's op
determinism; --no-determinism leaves it off, to measure what it costs.
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
import algorithms  # noqa: E402
import configuration  # noqa: E402
import Main  # noqa: E402
import models  # noqa: E402
import personalization  # noqa: E402
import Server_side  # noqa: E402
import upload_format  # noqa: E402
import Utils  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

LIMIT_REPEATS = 3
MIN_TIMED_SAMPLES = 18000
# Overrides of Main.py's defaults, and the timed rounds each runs unless --rounds says otherwise.
SCENARIOS = {
    "default": ({"EVAL_EVERY": 10}, 20),
    "cross_device_60": ({"NUM_CLIENTS": 1000, "CLIENT_FRACTION": 0.1, "DISTRIBUTION": "iid",
                         "EVAL_EVERY": 10}, 30),
    "cross_device_6": ({"NUM_CLIENTS": 10000, "CLIENT_FRACTION": 0.01, "DISTRIBUTION": "iid",
                        "EVAL_EVERY": 10}, 30),
    # NIID-Bench's setting (10 clients, all each round, #C=2), a tenth of the data per client.
    "momentum_b64": ({"NUM_CLIENTS": 10, "CLIENT_FRACTION": 1.0, "BATCH_SIZE": 64,
                      "LOCAL_MOMENTUM": 0.9, "DISTRIBUTION": "noniid_bi",
                      "CLASSES_PER_CLIENT": 2, "EVAL_EVERY": 10}, 10),
    "fedsgd": ({"BATCH_SIZE": 0, "EVAL_EVERY": 10}, 20),
    # The default federation on the virtual clock: log-normal devices, a deadline that gives
    # stragglers partial work (the clock is bookkeeping: its speed should match "default").
    "clock": ({"DEVICE_HETEROGENEITY": "lognormal", "ROUND_DEADLINE": 30.0,
               "STRAGGLER_POLICY": "partial", "EVAL_EVERY": 10}, 20),
    # The default federation with per-client evaluation and FedPer's own heads.
    "personal_k100": ({"LOCAL_TEST_SHARE": 0.25, "PERSONALIZATION": "fedper",
                       "EVAL_EVERY": 10}, 20),
}
# Every model plug-in in the default federation (the seed's CNN is "default"); few rounds, as
# McMahan et al.'s CNN trains about 50 times the seed CNN's weights.
SCENARIOS.update({f"model_{name}": ({"MODEL": name, "EVAL_EVERY": 10}, 5)
                  for name in models.NAMES if name != models.DEFAULT})
# Every algorithm plug-in in the default federation (FedAvg is "default"): its round time
# against FedAvg's is the ratio of the two scenarios' "ratio to fit" (MOON's extra passes).
SCENARIOS.update({f"algorithm_{name}": ({"ALGORITHM": name, "EVAL_EVERY": 10}, 10)
                  for name in algorithms.NAMES if name != algorithms.DEFAULT})
# Every personalization plug-in in the default federation with per-client evaluation
# ("personal_none" is FedAvg's, the same evaluation without a method): what a method's extra
# work costs (APFL trains a second model in the same steps, Per-FedAvg takes two gradients).
SCENARIOS.update({f"personal_{name}": ({"LOCAL_TEST_SHARE": 0.25, "PERSONALIZATION": name,
                                        "EVAL_EVERY": 10}, 10)
                  for name in personalization.NAMES})


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


def fit_samples_per_second(config, x_train, y_train, num_samples, batch_size):
    """Time one plain `model.fit` over `num_samples` samples; return samples per second."""
    model = Server_side.create_model(config["MODEL"])
    model.compile(optimizer=keras.optimizers.SGD(config["LEARNING_RATE"],
                                                 momentum=config["LOCAL_MOMENTUM"]),
                  loss="sparse_categorical_crossentropy")
    model.fit(x_train[:2000], y_train[:2000], batch_size=batch_size, verbose=0)
    start = time.perf_counter()
    model.fit(x_train[:num_samples], y_train[:num_samples], batch_size=batch_size,
              epochs=config["LOCAL_EPOCHS"], shuffle=True, verbose=0)
    return num_samples * config["LOCAL_EPOCHS"] / (time.perf_counter() - start)


def single_call_samples_per_second(federation, num_samples, batch_size, rng):
    """Time the simulator's compiled local training as one client holding `num_samples`."""
    weights = federation.global_model.get_weights()
    indices = np.arange(num_samples)
    trainer = Main.Client_side.LocalTrainer(
        federation.host.trainer.model, federation.host.trainer.x_train,
        federation.host.trainer.y_train, federation.host.trainer.learning_rate,
        federation.host.trainer.momentum, batch_size, federation.host.trainer.local_epochs)
    trainer.train(weights, indices[:2000], rng)
    start = time.perf_counter()
    trainer.train(weights, indices, rng)
    return num_samples * trainer.local_epochs / (time.perf_counter() - start)


def evaluation_seconds(federation, global_weights):
    """Time one test evaluation of the global model (median of 3)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        federation.evaluate(global_weights)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_seconds(job, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        job()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def client_evaluation_figures(federation, global_weights, config):
    """(5): seconds of a per-client evaluation round, of scoring every client's model in the
    compiled calls, and of one Keras predict per client."""
    host = federation.host
    clients = [client for client in range(config["NUM_CLIENTS"]) if len(host.test_indices[client])]
    rows = [host.test_indices[client] for client in clients]
    models = [list(global_weights) for _ in clients]
    model = host.trainer.model
    x_train, y_train = host.trainer.x_train.numpy(), host.trainer.y_train.numpy()

    def keras_per_client():
        for weights, indices in zip(models, rows):
            model.set_weights(weights)
            np.sum(np.argmax(model.predict(x_train[indices], verbose=0), axis=1)
                   == y_train[indices])
    host.scorer.count_correct(models, rows)  # warm-up: traces the compiled call
    host.evaluate(config["ROUNDS"], range(config["NUM_CLIENTS"]), global_weights)
    return {"client_evaluation_seconds": round(median_seconds(lambda: host.evaluate(
                config["ROUNDS"], range(config["NUM_CLIENTS"]), global_weights)), 3),
            "adapted_clients": sum(own is None for own in host.own_parts(clients)),
            "scoring_seconds": round(median_seconds(
                lambda: host.scorer.count_correct(models, rows)), 3),
            "keras_per_client_seconds": round(median_seconds(keras_per_client), 3),
            "local_test_samples": int(sum(map(len, rows)))}


def count_trained_samples(host, batch_size):
    """Make host.train add to the returned list the samples its clients' steps took each round:
    a straggler's partial work counts the steps it took, not its n x E."""
    trained, train = [], host.train

    def counting_train(*args, **kwargs):
        uploads = train(*args, **kwargs)
        trained.append(upload_format.samples_in_uploads(uploads, batch_size))
        return uploads

    host.train = counting_train
    return trained


def simulate(config, data, rounds):
    """Run Main.py's rounds 1..rounds after a warm-up round 0.

    Returns:
        (samples per second, seconds of each round, RSS after each round, the federation,
        the clients' sizes, the last global weights).
    """
    client_indices = configuration.partition_data(config, data.y_train)
    federation = Main.build_federation(config, data, client_indices)
    global_weights, _, _ = Main.run_round(0, config, federation,
                                       federation.global_model.get_weights(),
                                       federation.host)
    trained = count_trained_samples(federation.host, config["BATCH_SIZE"])
    rss, seconds = [], []
    start = time.perf_counter()
    for round_num in range(1, rounds + 1):
        global_weights, row, _ = Main.run_round(round_num, config, federation, global_weights,
                                             federation.host)
        seconds.append(row["seconds"])
        rss.append(rss_mb())
    rate = sum(trained) / (time.perf_counter() - start)
    return rate, seconds, rss, federation, [len(indices) for indices in client_indices], \
        global_weights


def parse_arguments():
    parser = argparse.ArgumentParser(description="Simulator speed versus plain model.fit.")
    parser.add_argument("--scenario", choices=SCENARIOS, default="default",
                        help="configuration to time (default: default)")
    parser.add_argument("--rounds", type=int,
                        help="timed rounds (default: the scenario's, 10 to 30)")
    parser.add_argument("-f", "--file", help="optional param,val CSV of further overrides")
    parser.add_argument("--no-determinism", action="store_true",
                        help="leave TensorFlow's op determinism off (Main.py turns it on), "
                             "to measure what it costs")
    arguments = parser.parse_args()
    if arguments.rounds is not None and arguments.rounds < 1:
        parser.error(f"--rounds must be an integer >= 1, got {arguments.rounds}")
    return arguments


def scenario_config(arguments):
    """Main.py's defaults with the scenario's (and the CSV's) overrides; ROUNDS = timed rounds."""
    overrides, default_rounds = SCENARIOS[arguments.scenario]
    config = {**Main.default_config(), **overrides}
    if arguments.file:
        config.update(Utils.read_overrides(arguments.file, config))
    config["ROUNDS"] = arguments.rounds or default_rounds  # so the last round is evaluated
    return configuration.validate_config(config)


def main():
    arguments = parse_arguments()
    config = scenario_config(arguments)
    if not arguments.no_determinism:
        Utils.make_deterministic()
    data = Main.Data_Preprocessing.load_fashion_mnist(config["DATA_DIR"])
    Utils.seed_everything(config["SEED"])
    per_round = Utils.num_selected_clients(config["NUM_CLIENTS"], config["CLIENT_FRACTION"])
    mean_client = len(data.y_train) / config["NUM_CLIENTS"]
    batch_size = config["BATCH_SIZE"] or max(1, round(mean_client))
    timed_samples = min(len(data.y_train),
                        max(MIN_TIMED_SAMPLES, round(per_round * mean_client)))
    limits = [fit_samples_per_second(config, data.x_train, data.y_train, timed_samples,
                                     batch_size) for _ in range(LIMIT_REPEATS)]
    sim_rate, seconds, rss, federation, sizes, weights = simulate(config, data, config["ROUNDS"])
    single_rates = [single_call_samples_per_second(federation, timed_samples, batch_size,
                                                   np.random.default_rng(repeat))
                    for repeat in range(LIMIT_REPEATS)]
    limits += [fit_samples_per_second(config, data.x_train, data.y_train, timed_samples,
                                      batch_size) for _ in range(LIMIT_REPEATS)]
    evaluation = evaluation_seconds(federation, weights)
    result = report(arguments, config, limits, single_rates, sim_rate, seconds, rss, sizes,
                    evaluation, batch_size)
    if config["LOCAL_TEST_SHARE"] > 0:
        result.update(client_evaluation_figures(federation, weights, config))
        result["client_evaluation_ratio"] = round(
            result["client_evaluation_seconds"] / evaluation, 2)
    print_report(result)


def report(arguments, config, limits, single_rates, sim_rate, seconds, rss, sizes, evaluation,
           batch_size):
    """Collect the figures of one benchmark run in a dict (the JSON line)."""
    limit_rate, single_rate = statistics.median(limits), statistics.median(single_rates)
    early = rss[len(rss) // 4]
    return {
        "scenario": arguments.scenario,
        "ratio": round(sim_rate / limit_rate, 3),
        "ratio_single_call": round(sim_rate / single_rate, 3),
        "seconds_per_round": round(statistics.median(seconds), 3),
        "rss_mb": round(peak_rss_mb(), 1),
        "rss_growth_pct": round(100 * (rss[-1] - early) / early, 2),
        "limit_samples_per_s": round(limit_rate, 1),
        "single_call_samples_per_s": round(single_rate, 1),
        "sim_samples_per_s": round(sim_rate, 1),
        "evaluation_seconds": round(evaluation, 3),
        "evaluation_share": round(evaluation / config["EVAL_EVERY"]
                                  / statistics.median(seconds), 3),
        "rounds": config["ROUNDS"],
        "eval_every": config["EVAL_EVERY"],
        "clients_per_round": Utils.num_selected_clients(config["NUM_CLIENTS"],
                                                              config["CLIENT_FRACTION"]),
        "median_client_samples": float(np.median(sizes)),
        "fit_batch_size": batch_size,
        "op_determinism": not arguments.no_determinism,
        "limit_fits_samples_per_s": [round(rate) for rate in limits],
        "machine": (f"{platform.machine()}, {os.cpu_count()} cores, "
                    f"TF {Main.Client_side.tf.__version__}"),
    }


def print_report(result):
    print(f"scenario {result['scenario']}: {result['clients_per_round']} clients a round, "
          f"median {result['median_client_samples']:g} samples each; machine: "
          f"{result['machine']}")
    limit_rate = result["limit_samples_per_s"]
    print(f"{'what':<50}{'samples/s':>12}{'ratio':>8}")
    print(f"{'plain model.fit, batch ' + str(result['fit_batch_size']) + ' (the limit)':<50}"
          f"{limit_rate:>12,.0f}{1:>8.2f}")
    single_rate = result["single_call_samples_per_s"]
    print(f"{'compiled client step, one call (reference)':<50}"
          f"{single_rate:>12,.0f}{single_rate / limit_rate:>8.2f}")
    simulator = f"simulator, {result['rounds']} rounds, test every {result['eval_every']}"
    print(f"{simulator:<50}{result['sim_samples_per_s']:>12,.0f}{result['ratio']:>8.2f}")
    print(f"simulator / single call {result['ratio_single_call']:.2f}; median seconds per round "
          f"{result['seconds_per_round']}; one test evaluation {result['evaluation_seconds']} s "
          f"({100 * result['evaluation_share']:.0f} % of a round, amortized); peak RSS "
          f"{result['rss_mb']} MB, RSS growth from round {result['rounds'] // 4 + 1} to "
          f"{result['rounds']}: {result['rss_growth_pct']} %")
    if "client_evaluation_seconds" in result:
        print(f"per-client evaluation round {result['client_evaluation_seconds']} s "
              f"({result['client_evaluation_ratio']}x the test evaluation; "
              f"{result['local_test_samples']:,} local test samples, "
              f"{result['adapted_clients']} clients adapted first); scoring every client's "
              f"model: {result['scoring_seconds']} s in compiled calls, "
              f"{result['keras_per_client_seconds']} s with one Keras predict per client")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
