"""Federated learning of a CNN on non-IID Fashion-MNIST with FedAvg.

Each round the server samples a fraction C of the K clients, every sampled client retrains the
global model on its own data for E epochs with batch B, and the server averages the returned
weights by client sample count (Algorithm 1 of McMahan et al. 2017, "Communication-Efficient
Learning of Deep Networks from Decentralized Data"). The global model is tested after every round.

Run:   python Main.py                  (the constants below)
       python Main.py -c -f my.csv     (override constants from a CSV with header 'param,val')
"""

import argparse
import dataclasses
import os
import pathlib
import sys
import time

# TensorFlow's C++ start-up lines about CPU features are noise for a user; level 2 still shows
# its errors, and a level the user set wins. It must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


import attacks  # noqa: E402
import centralized_baseline  # noqa: E402
import checkpoints  # noqa: E402
import client_evaluation  # noqa: E402
import client_host  # noqa: E402
import Client_side  # noqa: E402
import comparison  # noqa: E402
import configuration  # noqa: E402
import Data_Preprocessing  # noqa: E402
import devices  # noqa: E402
import divergence  # noqa: E402
import fedbuff  # noqa: E402
import history_log  # noqa: E402
import screening  # noqa: E402
import Server_side  # noqa: E402
import upload_format  # noqa: E402
import Utils  # noqa: E402

# -----------------------------------------------------------------------------
# Federated setup
NUM_CLIENTS = 100  # K: number of clients, an integer >= 1
ROUNDS = 100  # T: communication rounds, an integer >= 1
CLIENT_FRACTION = 0.3  # C: share of clients trained each round, in (0, 1]
CLIENT_SAMPLING = "fixed"  # fixed: round(C K) clients a round | poisson: each with chance C
# Local training
LOCAL_EPOCHS = 1  # E: passes over its data each selected client makes, an integer >= 1
BATCH_SIZE = 32  # B: local minibatch size, integer >= 0; 0 = all local data (B = inf, FedSGD)
LEARNING_RATE = 0.01  # eta: local SGD learning rate, > 0
LOCAL_MOMENTUM = 0.0  # local SGD momentum, in [0, 1); its buffer restarts for every client
MODEL = "seed_cnn"  # seed_cnn | mcmahan_cnn | mcmahan_2nn | niid_bench_cnn | pflib_fedavgcnn
# Algorithm
ALGORITHM = "fedavg"  # fedavg|fedprox|scaffold|fednova|feddyn|fedexp|moon (algorithms/)
PROX_MU = 0.01  # fedprox: mu, weight of (mu/2)||w - w_global||^2 in the local loss, >= 0
FEDDYN_ALPHA = 0.01  # feddyn: alpha, weight of its dynamic regularizer, > 0
FEDEXP_EPSILON = 1e-3  # fedexp: epsilon of its server step size's denominator, > 0
MOON_MU = 1.0  # moon: mu, weight of its model-contrastive loss, >= 0
MOON_TEMPERATURE = 0.5  # moon: temperature of its cosine similarities, > 0
SERVER_OPTIMIZER = "sgd"  # sgd | fedavgm | fedadam | fedyogi | fedadagrad (Reddi et al. 2021)
SERVER_LR = 1.0  # eta_g: server learning rate, > 0; sgd with 1.0 is FedAvg; adaptive ones: ~0.01
SERVER_MOMENTUM = 0.9  # fedavgm: server momentum beta, in [0, 1)
SERVER_BETA1 = 0.9  # fedadam, fedyogi, fedadagrad: first-moment decay, in [0, 1)
SERVER_BETA2 = 0.99  # fedadam, fedyogi: second-moment decay, in [0, 1)
SERVER_TAU = 1e-3  # fedadam, fedyogi, fedadagrad: adaptivity tau, > 0
CENTRALIZED_BASELINE = False  # True: also train the model on the pooled data, sample for sample
# Data
DISTRIBUTION = "noniid_ib"  # iid | noniid_ib | noniid_bi | noniid_ii | dirichlet | shards
MAX_SAMPLE_SHARE = 0.1  # noniid_ib: largest share of the rest a client gets per turn, in (0, 1]
CLASSES_PER_CLIENT = 3  # noniid_bi, noniid_ii: classes each client holds, 1..10
DIRICHLET_ALPHA = 0.5  # dirichlet: concentration, > 0 (small = more skewed)
SHARDS_PER_CLIENT = 2  # shards: label-sorted shards dealt to each client, an integer >= 1
SEED = 0  # seeds partition, client sampling, shuffling, initialisation and dropout; int >= 0
REPEATS = 1  # runs of each configuration, with SEED, SEED + 1, ...; compared by mean and std
DATA_DIR = None  # folder with the four Fashion-MNIST .gz files; None = search the usual places
# Per-client evaluation and personalization (client_evaluation.py, personalization.py)
LOCAL_TEST_SHARE = 0.0  # share of each client's samples kept as its test data, [0, 1); 0 = off
HELD_OUT_CLIENTS = 0.0  # share of clients never trained, only evaluated (unseen_*), [0, 1)
PERSONALIZATION = "none"  # none|finetune|fedper|fedrep|ditto|local|lgfedavg|fedbabu|apfl|perfedavg
FINETUNE_EPOCHS = 1  # finetune, fedbabu; new clients of others: adaptation epochs, int >= 1
HEAD_EPOCHS = 1  # fedrep: epochs on the head (body frozen) before the body's, int >= 1
PERSONAL_EPOCHS = 1  # ditto: epochs of each selected client's own model a round, int >= 1
DITTO_LAMBDA = 0.1  # ditto: lambda of (lambda/2)||v_i - w_global||^2, >= 0
APFL_ALPHA = 0.25  # apfl: alpha, v's share of the mixture alpha v + (1 - alpha) w, [0, 1]
PERFEDAVG_ALPHA = 0.01  # perfedavg: alpha, the step of adaptation (beta is LEARNING_RATE), > 0
# Devices on a virtual clock (devices.py)
DEVICE_HETEROGENEITY = "none"  # none | lognormal | path of a CSV of device profiles
DEVICE_SPEED = 100.0  # lognormal: median samples a second a device trains, > 0 (assumed)
DEVICE_SPEED_SIGMA = 1.0  # lognormal: log-space spread of the speeds, >= 0
DEVICE_DOWN_MBPS = 20.0  # lognormal: median download Mbit/s, > 0 (assumed)
DEVICE_UP_MBPS = 5.0  # lognormal: median upload Mbit/s, > 0 (assumed)
DEVICE_BANDWIDTH_SIGMA = 1.0  # lognormal: log-space spread of both bandwidths, >= 0
ROUND_DEADLINE = 0.0  # virtual seconds a round waits, >= 0; 0 = for every selected client
STRAGGLER_POLICY = "drop"  # a client late for the deadline: drop (sends nothing) | partial
OVER_SELECTION = 1.0  # select ceil(factor m) clients, aggregate the first m to finish, >= 1
ASYNC_BUFFER = 0  # FedBuff: server step every this many arrivals, int >= 0; 0 = rounds
MAX_CONCURRENCY = 10  # FedBuff: clients training at once, int >= 1
# Reliability
CLIENT_DROPOUT = 0.0  # chance that a selected client never returns its update, in [0, 1)
CHECKPOINT_EVERY = 1  # save a checkpoint every this many rounds (and at the end), int >= 1
RESUME = False  # True: continue this configuration's run from its last checkpoint
# Communication
COMPRESSION = "none"  # none | int8 | topk: how a client encodes its update before upload
TOPK_FRACTION = 0.01  # topk: share of each tensor's entries sent (rest kept as error feedback)
STOCHASTIC_ROUNDING = False  # int8: unbiased random rounding instead of rounding to nearest
# Privacy (DP-FedAvg, McMahan et al. 2018)
DP_CLIP_NORM = 0.0  # S: clip each client update to this L2 norm, >= 0; 0 turns DP off
DP_NOISE_MULTIPLIER = 1.0  # z: server noise std is z * S / (clients averaged), >= 0
DP_DELTA = 1e-5  # delta of the (epsilon, delta) reported, in (0, 1)
DP_NOISE = "seeded"  # seeded: from (SEED, round), reproducible | secure: OS entropy (on Flower)
# Secure aggregation (secure_aggregation.py): the server learns only the sum of the updates
SECURE_AGGREGATION = "none"  # none | secagg+ (SecAgg+: masked on Flower, its sum in process)
SECAGG_RANGE = 0.05  # R: each coordinate of an update is clipped to [-R, R], > 0
SECAGG_BITS = 16  # b: a coordinate becomes an integer in 0 .. 2^b - 1, integer 1..32
SECAGG_MODULUS_BITS = 32  # the sum is taken modulo 2^this, 8..64 (4-byte integers, 8 above 32)
SECAGG_THRESHOLD = 0.6  # on Flower: share of a round's nodes whose shares unmask it, (0, 1]
# Robustness
AGGREGATION = "fedavg"  # fedavg | median | trimmed_mean | krum | multi_krum
TRIM_RATIO = 0.1  # trimmed_mean: share of values dropped at each end, in [0, 0.5)
KRUM_F = 1  # krum, multi_krum: attackers assumed per round, integer >= 0
MALICIOUS_FRACTION = 0.0  # share of clients that attack, fixed per run by SEED, in [0, 1)
ATTACK = "sign_flip"  # label_flip | sign_flip | gaussian
ATTACK_SCALE = 1.0  # sign_flip: attackers upload -ATTACK_SCALE x their update, > 0
# Output
OUTPUT_DIR = pathlib.Path(__file__).resolve().parent / "results"  # runs go in subfolders here
TARGET_ACCURACY = 0.8  # comparisons report the first round reaching this test accuracy, (0, 1]
EVAL_EVERY = 1  # test the global model every this many rounds (and after the last), int >= 1
# -----------------------------------------------------------------------------
# Taken here, before any other upper-case name exists: exactly the constants above.
CONSTANT_NAMES = tuple(name for name in dir() if name.isupper())

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def main(argv=None, make_engine=None, engine_defaults=None):
    """Run federated training; return the exit code (0 done, 2 bad input, 3 diverged, 130 Ctrl-C).

    Everything that can be wrong with the input is checked before any output folder is touched.

    Args:
        argv: the command line (default: sys.argv).
        make_engine: None trains every client in this process; the Flower ServerApp passes a
            function config -> engine (see `run`) that may refuse a configuration with
            ValueError.
        engine_defaults: constants' defaults the engine changes, e.g. {"DP_NOISE": "secure"}
            on Flower; a CSV that sets the constant still decides.
    """
    arguments = parse_arguments(argv)
    if arguments.distributions:
        return draw_distributions(arguments)
    try:
        loaded_data = {}
        labels, configs = zip(*configuration.load_configs(arguments, default_config(),
                                                             engine_defaults))
        runs = [configuration.prepare_run(config, loaded_data) for config in configs]
        checkpoints.check_resumable(runs)
        engines = [make_engine(prepared.config) if make_engine else None for prepared in runs]
        for prepared in runs:
            configuration.prepare_output_dir(prepared.config, prepared.output_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    Utils.make_deterministic()
    histories, exit_code = [], 0
    for prepared, engine in zip(runs, engines):
        try:
            histories.append(run(prepared, engine))
        except divergence.DivergenceError as error:
            # In a comparison the other runs still go on; the table marks this one.
            print(f"error: {error}", file=sys.stderr)
            histories.append(error.rows)
            exit_code = EXIT_DIVERGED
        except KeyboardInterrupt:
            print(f"\ninterrupted: {prepared.output_dir} keeps the history and the last "
                  "checkpoint; to continue, run again with RESUME set to True (e.g. a CSV row "
                  "'RESUME,True')", file=sys.stderr)
            return EXIT_INTERRUPTED
    if len(runs) > 1:
        write_comparison(labels, runs, histories)
    return exit_code


def run(prepared, engine=None):
    """Train for ROUNDS rounds (from the checkpoint, if any), logging and checkpointing each.

    Args:
        prepared: a PreparedRun.
        engine: what trains the clients, with engine.train(round_num, clients, global_weights,
            received) -> list of upload_format.Upload, engine.settle(round_num,
            accepted clients), which lets the clients keep the state of accepted uploads only,
            and engine.evaluate(round_num, clients, global_weights) -> list of
            client_evaluation.ClientScore (with LOCAL_TEST_SHARE); None trains every client
            here, in this process (client_host.ClientHost); the Flower ServerApp passes one
            that asks the SuperNodes.
    Returns:
        the history rows, one dict per round.
    """
    config, output_dir = prepared.config, prepared.output_dir
    name = Utils.run_name(config)
    Utils.print_setup(config, prepared.data.source, prepared.client_indices, output_dir,
                      len(Server_side.training_clients(
                          Server_side.ServerSettings.from_config(config))))
    Utils.plot_distribution(output_dir / "distribution.png",
                            Data_Preprocessing.class_counts(prepared.data.y_train,
                                                            prepared.client_indices), name)
    federation = build_federation(config, prepared.data, prepared.client_indices,
                                  in_process=engine is None)
    engine = engine or federation.host
    global_weights, rows = federation.global_model.get_weights(), []
    if prepared.checkpoint is not None:
        global_weights, rows = checkpoints.restore_run_state(prepared.checkpoint,
                                                             federation.components)
        print(f"resuming after round {len(rows)}")
    history = Utils.HistoryWriter(output_dir / "history.csv", history_log.history_columns(config),
                                rows)
    tensorboard = Utils.TensorBoardLog(output_dir / "tensorboard", rows)
    clients_log = client_evaluation.ClientsLog(output_dir / "clients.csv", len(rows),
                                               config["LOCAL_TEST_SHARE"] > 0)
    try:
        for round_num in range(len(rows) + 1, config["ROUNDS"] + 1):
            try:
                global_weights, row, client_rows = run_round(round_num, config, federation,
                                                             global_weights, engine)
            except divergence.ClientsDiverged as error:
                raise divergence.divergence(round_num, str(error), config, output_dir,
                                            rows) from None
            history_log.add_totals(row, rows)
            divergence.check_finite(round_num, global_weights, row, config, output_dir, rows)
            rows.append(row)
            # Ctrl-C waits until the row and the checkpoint are whole on disk.
            with Utils.deferred_interrupts():
                history.append(row)
                tensorboard.append(row)
                clients_log.append(client_rows)
                if round_num % config["CHECKPOINT_EVERY"] == 0 or round_num == config["ROUNDS"]:
                    checkpoints.save_run_state(output_dir / checkpoints.CHECKPOINT_NAME, config,
                                               rows, global_weights, federation.components)
            print(Utils.format_progress(row, config["ROUNDS"]), flush=True)
    finally:
        history.close()
        tensorboard.close()
        clients_log.close()
        if rows:
            Utils.plot_history(output_dir / "accuracy.png", rows, name)
            Utils.plot_communication(output_dir / "communication.png", rows, name)
            clients_log.plot(output_dir / "clients.png", name)
    federation.global_model.set_weights(global_weights)
    federation.global_model.save(output_dir / "global_model.keras")
    Utils.print_summary(config, rows, output_dir)
    return rows


def run_round(round_num, config, federation, global_weights, engine):
    """One round of Algorithm 1: sample clients, train them, aggregate, evaluate.

    Returns:
        (new global weights, the round's history row, its rows of clients.csv).
    """
    start = time.perf_counter()
    if config["ASYNC_BUFFER"]:
        global_weights, report, num_clients, clock = fedbuff.server_step(
            config, federation, global_weights, engine)
    else:
        global_weights, report, num_clients, clock = synchronous_round(
            round_num, config, federation, global_weights, engine)
    say_what_was_refused(round_num, report, config)
    evaluated = round_num % config["EVAL_EVERY"] == 0 or round_num == config["ROUNDS"]
    evaluation = federation.evaluate(global_weights) if evaluated else (None, None)
    figures, client_rows = {}, []
    if evaluated and config["LOCAL_TEST_SHARE"] > 0:
        figures, client_rows = evaluate_clients(round_num, config, federation, global_weights,
                                                engine)
    row = history_log.round_row(round_num, report, evaluation, num_clients,
                                federation.malicious, time.perf_counter() - start)
    row.update(figures)
    row.update(clock)
    if federation.devices is not None:
        row["samples_trained"] = devices.samples_trained(config, report.accepted)
    if federation.baseline is not None:
        # As many samples as the clients' steps took (a straggler's partial work: fewer).
        trained = upload_format.samples_in_uploads(report.accepted, config["BATCH_SIZE"])
        row.update(baseline_columns(federation, trained, evaluated))
    return global_weights, row, client_rows


def synchronous_round(round_num, config, federation, global_weights, engine):
    """Sample clients, train them, aggregate: (new weights, RoundReport, clients selected,
    clock columns)."""
    selected, returning = Server_side.round_clients(federation.server.settings, round_num)
    # Clients that drop out never send an update, so they are not trained at all; on a
    # virtual clock the plan also leaves out stragglers and over-selected clients.
    plan = plan_round(config, federation, returning)
    training = returning if plan is None else plan.clients
    step_limits = {} if plan is None else plan.step_limits
    delivered = engine.train(round_num, training, global_weights,
                             federation.server.sent_to_clients(), step_limits)
    global_weights, report = federation.server.round(
        round_num, global_weights, delivered, training, len(selected), step_limits,
        getattr(engine, "secure_sum", None))
    # Clients keep their new state (SCAFFOLD's c_i, top-k residuals) only for what the server
    # accepted, so the server's c stays the mean of the clients' c_i.
    engine.settle(round_num, [upload.client for upload in report.accepted])
    clock = {} if plan is None else {
        "virtual_seconds": round(plan.seconds, 3), "deadline_dropped": plan.dropped,
        "partial": plan.partial, "over_selection_cut": plan.cut}
    return global_weights, report, len(selected), clock


def plan_round(config, federation, returning):
    """With devices on a virtual clock, the round's devices.RoundPlan (who counts, partial
    step limits, its virtual seconds); else None."""
    if federation.devices is None:
        return None
    server = federation.server
    wanted = (Utils.num_selected_clients(server.population, config["CLIENT_FRACTION"])
              if config["CLIENT_SAMPLING"] == "fixed" else len(returning))
    return devices.plan_round(federation.devices, config, returning, server.client_sizes,
                              *server.client_traffic(), wanted)


def evaluate_clients(round_num, config, federation, global_weights, engine):
    """Every client's accuracy on its local test data (LOCAL_TEST_SHARE): the round's figures
    for history.csv and its rows of clients.csv; refused reports are printed."""
    # Clients without local test data are not asked: a score of theirs is refused.
    scores = engine.evaluate(round_num, [client for client, rows in enumerate(federation.split.test)
                                         if len(rows)], global_weights)
    figures, client_rows, refused = client_evaluation.round_figures(
        round_num, scores, federation.split.test, federation.held_out, federation.malicious)
    for text in refused:
        print(text, file=sys.stderr, flush=True)
    return figures, client_rows


def say_what_was_refused(round_num, report, config):
    """Print the round's rejections and a skipped Krum; stop when local training diverged."""
    for line in screening.rejection_lines(round_num, report.rejections):
        print(line, file=sys.stderr, flush=True)
    # The server drops NaN updates, so the global model stays finite; when every client's
    # update was NaN, training itself diverged and the run stops as it would have before.
    if report.diverged:
        raise divergence.ClientsDiverged(
            f"local training diverged: every returned client's update "
            f"({len(report.rejections)}) was NaN or infinite")
    if report.krum_skipped:
        print(f"round {round_num}: {len(report.accepted)} updates, fewer than the "
              f"{config['AGGREGATION']} needs (2 KRUM_F + 3 = {2 * config['KRUM_F'] + 3}): "
              "the global model is kept", file=sys.stderr, flush=True)


def baseline_columns(federation, num_samples, evaluated):
    """Train the centralized baseline on `num_samples` more samples; return its row entries."""
    weights = federation.baseline.train(num_samples)
    loss, accuracy = federation.evaluate(weights) if evaluated else (None, None)
    return {"baseline_accuracy": history_log.rounded(accuracy),
            "baseline_loss": history_log.rounded(loss)}


# --- Setting up a run: the server side and, in process, the clients ---------------------------

@dataclasses.dataclass
class Federation:
    """The server side of a run and, in process, its clients.

    components: every object whose state a checkpoint must carry.
    """

    global_model: object
    server: Server_side.Server
    evaluate: Server_side.Evaluator
    malicious: set
    components: dict
    split: Data_Preprocessing.ClientSplit
    held_out: set
    devices: devices.DeviceProfiles
    async_queue: fedbuff.EventQueue
    host: client_host.ClientHost = None
    baseline: centralized_baseline.CentralizedBaseline = None


def build_federation(config, data, client_indices, in_process=True):
    """Create the global model, the server, the evaluator and (in process) the clients.

    client_indices: the partition; each client's local test part (LOCAL_TEST_SHARE) is split
    off here, as every SuperNode does.
    """
    client_settings = Client_side.ClientSettings.from_config(config)
    split = configuration.client_split(config, client_indices)
    Utils.seed_everything(config["SEED"])
    global_model = Server_side.create_model(config["MODEL"])
    initial_weights = global_model.get_weights()
    shapes = [layer.shape for layer in initial_weights]
    server_settings = Server_side.ServerSettings.from_config(config)
    server = Server_side.Server(server_settings, shapes,
                                [len(indices) for indices in split.train])
    components = {"server": server}
    async_queue = None
    if config["ASYNC_BUFFER"]:
        async_queue = components["async"] = fedbuff.EventQueue(server.upload_shapes)
    host = None
    if in_process:
        host = client_host.ClientHost(client_settings, Server_side.create_model(config["MODEL"]),
                                      data.x_train, data.y_train, split.train,
                                      split.test if config["LOCAL_TEST_SHARE"] > 0 else None)
        components.update({f"client_{name}": memory for name, memory in host.memory.items()})
    baseline = None
    if config["CENTRALIZED_BASELINE"]:
        baseline_trainer = Client_side.LocalTrainer.for_baseline(
            Server_side.create_model(config["MODEL"]), data.x_train, data.y_train,
            client_settings)
        baseline = centralized_baseline.CentralizedBaseline(
            baseline_trainer, initial_weights, len(data.y_train), config["SEED"])
        components["baseline"] = baseline
    return Federation(global_model, server,
                      Server_side.Evaluator(global_model, data.x_test, data.y_test),
                      attacks.malicious_clients(config["NUM_CLIENTS"],
                                                    config["MALICIOUS_FRACTION"], config["SEED"]),
                      components, split,
                      set(Server_side.held_out_clients(config["NUM_CLIENTS"],
                                                       config["HELD_OUT_CLIENTS"],
                                                       config["SEED"]).tolist()),
                      devices.device_profiles(config), async_queue, host, baseline)


# --- The constants and the command line (their checks: configuration.py) ------------------------

def default_config():
    """Return the constants above by name."""
    return {name: globals()[name] for name in CONSTANT_NAMES}


def parse_arguments(argv):
    """Read the seed's command line: -c turns on CSV overrides, -f names the CSV(s)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", action="store_true",
                        help="override constants from the CSV(s) named by -f")
    parser.add_argument("-f", "--file", nargs="+", default=["config.csv"],
                        help="CSV with header 'param,val' and one constant per row; several "
                             "files run one after another and are compared in one table")
    parser.add_argument("--distributions", metavar="FOLDER", type=pathlib.Path,
                        help="only draw distribution_<name>.png for every DISTRIBUTION with "
                             "the constants (and -c -f overrides) into FOLDER, then stop")
    return parser.parse_args(argv)


# --- Pictures and comparisons -------------------------------------------------------------------

def draw_distributions(arguments):
    """Draw every DISTRIBUTION's split of the first configuration (the README's pictures)."""
    try:
        (_, config), *_ = configuration.load_configs(arguments, default_config())
        data = Data_Preprocessing.load_fashion_mnist(config["DATA_DIR"])
        arguments.distributions.mkdir(parents=True, exist_ok=True)
        for distribution in Data_Preprocessing.DISTRIBUTIONS:
            config = {**config, "DISTRIBUTION": distribution}
            counts = Data_Preprocessing.class_counts(
                data.y_train, configuration.partition_data(config, data.y_train))
            path = arguments.distributions / f"distribution_{distribution}.png"
            Utils.plot_distribution(path, counts, Utils.run_name(config))
            print(f"wrote {path}")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def write_comparison(labels, runs, histories):
    """Write comparison.md, comparison_seeds.csv and comparison.png into the first OUTPUT_DIR."""
    output_dir = pathlib.Path(runs[0].config["OUTPUT_DIR"]).expanduser()
    comparison.write_comparison(output_dir, labels, [prepared.config for prepared in runs],
                                histories, [prepared.output_dir for prepared in runs])
    print(f"comparison: {output_dir / 'comparison.md'}, comparison_seeds.csv and "
          "comparison.png")


if __name__ == "__main__":
    sys.exit(main())
