"""Measure what SecAgg+ costs a round on Flower: real SuperLink and SuperNodes on loopback.

Run:  python tests/secagg_cost.py [--nodes 2 4] [--rounds 4]

For each node count, one cluster runs the same configuration twice, without and with
`SECURE_AGGREGATION = "secagg+"` (20 iid clients, 4 a round, the default model): the median
seconds a round (history.csv's `seconds`, the server's wall time for the round, its test
evaluation included; round 1, which pays for the nodes' start-up, left out) and the bytes a round
each way. The difference is the protocol's cost: three more message exchanges, keys, shares and
one masked sum per node instead of one contribution per client. Prints a table and, last, one
JSON line.
"""

import argparse
import csv
import json
import pathlib
import statistics
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from conftest import write_config  # noqa: E402
from flower_cluster import Cluster  # noqa: E402

SETTING = {"NUM_CLIENTS": 20, "CLIENT_FRACTION": 0.2, "DISTRIBUTION": "iid", "SEED": 3}


def measure(nodes, rounds, home):
    """{mode: (median seconds a round, bytes up a round, bytes down a round)} for one cluster."""
    (home / f"cluster{nodes}").mkdir()
    cluster = Cluster(home / f"cluster{nodes}", num_nodes=nodes).start()
    figures = {}
    try:
        for mode in ("none", "secagg+"):
            output = home / f"{nodes}_{mode}"
            path = write_config(home / f"{nodes}_{mode}.csv", OUTPUT_DIR=output, ROUNDS=rounds,
                                SECURE_AGGREGATION=mode, **SETTING)
            result = cluster.run_app(path, round_timeout=600, timeout=3600)
            if result.returncode != 0:
                raise SystemExit(result.stdout[-3000:] + result.stderr[-3000:])
            (history,) = output.glob("*/history.csv")
            rows = list(csv.DictReader(history.open()))[1:]
            figures[mode] = (statistics.median(float(row["seconds"]) for row in rows),
                             statistics.median(int(row["bytes_up"]) for row in rows),
                             statistics.median(int(row["bytes_down"]) for row in rows))
    finally:
        cluster.stop()
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rounds", type=int, default=4)
    arguments = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for nodes in arguments.nodes:
            results[nodes] = measure(nodes, arguments.rounds, pathlib.Path(folder))
    print("| nodes | seconds a round (none -> secagg+) | bytes up a round | bytes down a round |")
    print("|---|---|---|---|")
    for nodes, figures in results.items():
        (plain_s, plain_up, plain_down), (secure_s, secure_up, secure_down) = (
            figures["none"], figures["secagg+"])
        print(f"| {nodes} | {plain_s:.1f} -> {secure_s:.1f} (+{secure_s - plain_s:.1f}) | "
              f"{plain_up:,} -> {secure_up:,} | {plain_down:,} -> {secure_down:,} |")
    print(json.dumps({str(nodes): figures for nodes, figures in results.items()}))


if __name__ == "__main__":
    main()
