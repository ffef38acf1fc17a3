"""Comparisons across runs: one table and one figure for several configurations and seeds.

`python Main.py -c -f a.csv b.csv` writes comparison.md (each configuration's mean and sample
standard deviation over its seeds), comparison_seeds.csv (every seed) and comparison.png (mean
curves with a band of one standard deviation; one panel per distribution when several appear).
"""

import csv
import pathlib

import matplotlib

# Plots are only ever written to files, so the display-free backend is always right.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)
import numpy as np  # noqa: E402

import personalization  # noqa: E402
import Utils  # noqa: E402


def rounds_to_reach(rows, target):
    """Return the first round whose test accuracy reaches `target`, or None."""
    return next((row["round"] for row in Utils.evaluated(rows) if row["test_accuracy"] >= target),
                None)


# Per-round means of the virtual clock's history columns (devices.py, fedbuff.py).
CLOCK_FIGURES = ("deadline_dropped", "partial", "over_selection_cut", "staleness_mean")
# The per-client figures (client_evaluation) comparisons carry, from each seed's last round.
CLIENT_FIGURES = ("local_pooled", "local_mean", "local_worst10", "personal_pooled",
                  "personal_mean", "personal_std", "personal_worst10", "personal_best10",
                  "unseen_local_pooled", "unseen_personal_pooled", "unseen_personal_worst10")
SEED_COLUMNS = ("run", "seed", "rounds", "diverged_in_round", "final_accuracy", "best_accuracy",
                "rounds_to_target", "mb_up", "wall_seconds", "baseline_accuracy",
                "epsilon") + CLIENT_FIGURES + ("virtual_hours", "virtual_hours_to_target",
                                               "samples_trained") + CLOCK_FIGURES


def seed_summary(config, rows, target):
    """Summarise one seed's run for comparisons: a dict of SEED_COLUMNS (but 'run')."""
    finished = len(rows) >= config["ROUNDS"]
    last = rows[-1] if rows and finished else {}
    return {"seed": config["SEED"], "rounds": len(rows),
            "diverged_in_round": "" if finished else len(rows) + 1,
            "final_accuracy": last.get("test_accuracy"),
            "best_accuracy": (max(row["test_accuracy"] for row in Utils.evaluated(rows))
                              if last else None),
            "rounds_to_target": rounds_to_reach(rows, target) if last else None,
            "mb_up": last.get("mb_up_total"),
            "wall_seconds": sum(float(row["seconds"]) for row in rows) if last else None,
            "baseline_accuracy": last.get("baseline_accuracy"), "epsilon": last.get("epsilon"),
            **{name: last.get(name) if last.get(name) != "" else None
               for name in CLIENT_FIGURES},
            "virtual_hours": last.get("virtual_hours_total"),
            "virtual_hours_to_target": virtual_hours_to_reach(rows, target) if last else None,
            "samples_trained": (sum(int(row["samples_trained"]) for row in rows)
                                if last and "samples_trained" in last else None),
            **{name: per_round_mean(rows, name) if last else None for name in CLOCK_FIGURES}}


def per_round_mean(rows, column):
    """The mean of a history column over the rounds, or None when the run does not log it."""
    if column not in rows[0]:
        return None
    return float(np.mean([float(row[column]) for row in rows]))


def virtual_hours_to_reach(rows, target):
    """The virtual hours (devices.py) until the test accuracy first reaches `target`, or None."""
    reached = rounds_to_reach(rows, target)
    if reached is None or "virtual_hours_total" not in rows[0]:
        return None
    return next(row["virtual_hours_total"] for row in rows if row["round"] == reached)


def mean_and_spread(values, digits):
    """'mean ± sample std' of the values that exist ('' if none; no ± for a single value)."""
    values = [float(value) for value in values if value is not None]
    if not values:
        return ""
    if len(values) == 1 or (np.isinf(values[0]) and len(set(values)) == 1):
        return f"{values[0]:.{digits}f}"  # one value, or inf in every seed (its std is nan)
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def group_runs(labels, configs, histories):
    """Group runs by label, in first-seen order: {label: [(config, rows), ...]}."""
    groups = {}
    for label, config, rows in zip(labels, configs, histories):
        groups.setdefault(label, []).append((config, rows))
    return groups


def comparison_table(groups, target):
    """Return a Markdown table, one line per configuration, mean ± std over its seeds."""
    lines = [f"| run | algorithm | server | distribution | seeds | final acc | best acc | "
             f"rounds to {target} | MB up | wall time (s) | centralized acc | epsilon |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in groups.items():
        config = runs[0][0]
        summaries = [seed_summary(config, rows, target) for config, rows in runs]
        finished = [summary for summary in summaries if not summary["diverged_in_round"]]
        diverged = [summary["diverged_in_round"] for summary in summaries
                    if summary["diverged_in_round"]]
        seeds = f"{len(runs)}" + (f" ({len(diverged)} diverged in round "
                                  f"{', '.join(map(str, diverged))})" if diverged else "")
        reached = [summary["rounds_to_target"] for summary in finished
                   if summary["rounds_to_target"] is not None]
        reached_text = (f"{mean_and_spread(reached, 1)} ({len(reached)}/{len(finished)})"
                        if reached else "not reached")
        column = {key: [summary[key] for summary in finished] for key in SEED_COLUMNS[2:]}
        lines.append(
            f"| {label} | {config['ALGORITHM']} | {config['SERVER_OPTIMIZER']} "
            f"(lr {config['SERVER_LR']}) | {config['DISTRIBUTION']} | {seeds} | "
            f"{mean_and_spread(column['final_accuracy'], 4)} | "
            f"{mean_and_spread(column['best_accuracy'], 4)} | "
            f"{reached_text if finished else ''} | {mean_and_spread(column['mb_up'], 1)} | "
            f"{mean_and_spread(column['wall_seconds'], 0)} | "
            f"{mean_and_spread(column['baseline_accuracy'], 4)} | "
            f"{mean_and_spread(column['epsilon'], 2)} |")
    return "\n".join(lines) + "\n"


def write_seed_table(path, groups, target):
    """Write every seed's figures (SEED_COLUMNS) as CSV, beside the comparison table."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=SEED_COLUMNS)
        writer.writeheader()
        for label, runs in groups.items():
            for config, rows in runs:
                summary = seed_summary(config, rows, target)
                writer.writerow({"run": label, **{key: "" if value is None else value
                                                  for key, value in summary.items()}})


def write_comparison(output_dir, labels, configs, histories, run_dirs=None):
    """Write comparison.md (mean ± std per configuration), comparison_seeds.csv and
    comparison.png (mean curves with a min-max band over seeds) into `output_dir`; with
    per-client evaluation also its table and comparison_clients.png (from the runs' folders,
    `run_dirs`, one per run)."""
    output_dir = pathlib.Path(output_dir)
    target = configs[0]["TARGET_ACCURACY"]
    groups = group_runs(labels, configs, histories)
    table = comparison_table(groups, target)
    per_client = {label: runs for label, runs in groups.items()
                  if runs[0][0].get("LOCAL_TEST_SHARE", 0) > 0}
    if per_client:
        table += "\n" + client_table(per_client, target)
    timed = {label: runs for label, runs in groups.items()
             if runs[0][0].get("DEVICE_HETEROGENEITY", "none") != "none"}
    if timed:
        table += "\n" + clock_table(timed, target)
        plot_virtual_time(output_dir / "comparison_time.png", timed, target)
    (output_dir / "comparison.md").write_text(table)
    write_seed_table(output_dir / "comparison_seeds.csv", groups, target)
    plot_comparison(output_dir / "comparison.png", groups, target)
    if per_client and run_dirs is not None:
        plot_client_accuracies(output_dir / "comparison_clients.png", {
            label: [run_dir for run_dir, group in zip(run_dirs, labels) if group == label]
            for label in per_client})


def finished_seeds(runs, target):
    """The seed summaries of a configuration's runs that did not diverge."""
    summaries = [seed_summary(config, rows, target) for config, rows in runs]
    return [summary for summary in summaries if not summary["diverged_in_round"]]


def clock_table(groups, target):
    """Each configuration's virtual time (devices.py), mean ± std over its finished seeds."""
    lines = [f"| run | devices | seeds | final acc | virtual hours | virtual hours to {target} "
             "| M samples trained | MB up | dropped / partial / cut per round | "
             "staleness (mean) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in groups.items():
        finished = finished_seeds(runs, target)
        column = {name: [summary[name] for summary in finished] for name in SEED_COLUMNS[1:]}
        reached = [hours for hours in column["virtual_hours_to_target"] if hours is not None]
        rounds_logged = any(value is not None for value in column["partial"])  # not FedBuff
        stragglers = (" / ".join(mean_and_spread(column[name], 1) for name in CLOCK_FIGURES[:3])
                      if rounds_logged else "")
        lines.append(
            f"| {label} | {runs[0][0]['DEVICE_HETEROGENEITY']} | {len(finished)} | "
            f"{mean_and_spread(column['final_accuracy'], 4)} | "
            f"{mean_and_spread(column['virtual_hours'], 2)} | "
            + (f"{mean_and_spread(reached, 2)} ({len(reached)}/{len(finished)})"
               if reached else "not reached")
            + f" | {mean_and_spread(millions(column['samples_trained']), 2)} | "
            f"{mean_and_spread(column['mb_up'], 1)} | {stragglers} | "
            f"{mean_and_spread(column['staleness_mean'], 2)} |")
    return "\n".join(lines) + "\n"


def millions(values):
    """Counts in millions (None stays None)."""
    return [None if value is None else value / 1e6 for value in values]


def plot_virtual_time(path, groups, target):
    """Each configuration's test accuracy against virtual hours, one line per seed."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = _curve_styles(groups)
    for label, runs in groups.items():
        for position, (_, rows) in enumerate(runs):
            rows = Utils.evaluated(rows)
            axis.plot([row["virtual_hours_total"] for row in rows],
                      [row["test_accuracy"] for row in rows],
                      label=label if position == 0 else None, **styles[label])
    axis.axhline(target, color="grey", linestyle=":", label=f"target {target}")
    axis.set_xlabel("virtual hours (devices.py)")
    axis.set_ylabel("test accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def client_table(groups, target):
    """Each configuration's clients' accuracy on their local test data at the last round,
    mean ± std over its finished seeds (client_evaluation's figures)."""
    lines = ["| run | personalization | epochs a round | seeds | global model: pooled | mean | "
             "worst 10 % | own models: pooled | mean | std | worst 10 % | best 10 % | "
             "unseen: global pooled | unseen: own pooled | unseen: own worst 10 % | MB up | "
             "global test acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in groups.items():
        finished = finished_seeds(runs, target)
        cells = [mean_and_spread([summary[name] for summary in finished], 4)
                 for name in CLIENT_FIGURES + ("mb_up", "final_accuracy")]
        cells[-2] = mean_and_spread([summary["mb_up"] for summary in finished], 1)
        lines.append(f"| {label} | {runs[0][0]['PERSONALIZATION']} | "
                     f"{personalization.epochs_per_round(runs[0][0])} | {len(finished)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_client_accuracies(path, run_dirs_by_label):
    """A box per configuration of its clients' accuracies at the last round (every seed's
    eligible honest clients in one box): the global model's beside the clients' own models'."""
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(run_dirs_by_label)), 4.5))
    labels = list(run_dirs_by_label)
    for offset, (model, color) in enumerate((("local", "tab:grey"), ("personal", "tab:blue"))):
        values = [[float(row[f"{model}_accuracy"]) for run_dir in run_dirs
                   for row in Utils.last_client_rows(pathlib.Path(run_dir) / "clients.csv")
                   if row["group"] == "eligible"]
                  for run_dirs in (run_dirs_by_label[label] for label in labels)]
        boxes = axis.boxplot(values, positions=np.arange(len(labels)) * 3 + offset,
                             widths=0.8, patch_artist=True)
        for box in boxes["boxes"]:
            box.set_facecolor(color)
        axis.plot([], [], color=color, linewidth=6,
                  label="global model" if model == "local" else "own models")
    axis.set_xticks(np.arange(len(labels)) * 3 + 0.5, labels, rotation=20, fontsize="small")
    axis.set_ylabel("client accuracy on its local test data")
    axis.set_title("last round, every seed's trained clients", fontsize="small")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _mean_curves(runs):
    """Evaluated rounds, and per such round the mean/min/max test accuracy and mean MB up over
    the finished seeds (all seeds when none finished)."""
    finished = [rows for config, rows in runs if len(rows) >= config["ROUNDS"]] or [
        rows for _, rows in runs]
    length = min(len(rows) for rows in finished)
    rounds = [row["round"] for row in Utils.evaluated(finished[0][:length])]
    accuracy = np.array([[row["test_accuracy"] for row in rows[:length]
                          if row["round"] in rounds] for rows in finished], dtype=float)
    traffic = np.array([[row["mb_up_total"] for row in rows[:length] if row["round"] in rounds]
                        for rows in finished], dtype=float)
    if not rounds:
        return np.array([]), None, None, None, None
    return (np.array(rounds), accuracy.mean(axis=0), accuracy.min(axis=0),
            accuracy.max(axis=0), traffic.mean(axis=0))


def panels_by_distribution(groups):
    """{distribution: [label, ...]} in first-seen order: a comparison over several
    distributions draws one accuracy panel per distribution, so curves compare like with like."""
    panels = {}
    for label, runs in groups.items():
        panels.setdefault(runs[0][0]["DISTRIBUTION"], []).append(label)
    return panels


def _curve_styles(groups):
    """{label: line style}. Over several distributions a method (algorithm, server optimizer)
    keeps its colour in every panel, unless some panel holds two runs of one method (say, DP
    noise levels); then, as for one distribution, every configuration has its own colour."""
    panels = panels_by_distribution(groups)

    def method(label):
        config = groups[label][0][0]
        return config["ALGORITHM"], config["SERVER_OPTIMIZER"]
    by_method = len(panels) > 1 and all(len({method(label) for label in labels}) == len(labels)
                                        for labels in panels.values())
    keys = list(dict.fromkeys(method(label) if by_method else label for label in groups))
    # tab10's colours are the most distinct, tab20 has 20; line styles cycle after that.
    colors = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20").colors
    lines = ("-", "--", ":")
    styles = {}
    for label in groups:
        index = keys.index(method(label) if by_method else label)
        styles[label] = {"color": colors[index % len(colors)],
                         "linestyle": lines[index // len(colors) % 3]}
    return styles


def _draw_mean_curve(axis, x_values, mean, low, high, name, style, banded):
    axis.plot(x_values, mean, label=name, **style)
    if banded:
        axis.fill_between(x_values, low, high, color=style["color"], alpha=0.2)


def plot_comparison(path, groups, target):
    """Each configuration as its mean test-accuracy curve over seeds, with a band from the lowest
    to the highest seed. One distribution: accuracy per round and per cumulative MB uploaded.
    Several: accuracy per round, one panel per distribution."""
    panels = panels_by_distribution(groups)
    if len(panels) > 1:
        figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), sharey=True)
        round_axes = dict(zip(panels, axes))
        traffic_axis = None
    else:
        figure, (round_axis, traffic_axis) = plt.subplots(1, 2, figsize=(13, 5))
        round_axes = {next(iter(panels)): round_axis}
    styles = _curve_styles(groups)
    for label, runs in groups.items():
        rounds, mean, low, high, traffic = _mean_curves(runs)
        if len(rounds) == 0:  # every seed diverged in round 1: nothing to draw
            continue
        name = label if len(runs) == 1 else f"{label} (mean of {len(runs)} seeds)"
        banded = len(runs) > 1
        round_axis = round_axes[runs[0][0]["DISTRIBUTION"]]
        _draw_mean_curve(round_axis, rounds, mean, low, high, name, styles[label], banded)
        if traffic_axis is not None:
            _draw_mean_curve(traffic_axis, traffic, mean, low, high, name, styles[label], banded)
    labelled = [(axis, "round") for axis in round_axes.values()]
    if traffic_axis is not None:
        labelled.append((traffic_axis, "cumulative MB uploaded"))
        traffic_axis.set_xscale("log")
    for axis, quantity in labelled:
        axis.axhline(target, color="grey", linestyle=":", label=f"target {target}")
        axis.set_xlabel(quantity)
        axis.set_ylabel("test accuracy")
        axis.grid(alpha=0.3)
    for distribution, axis in round_axes.items():
        axis.legend(fontsize="small", loc="lower right")
        prefix = f"{distribution}: " if len(panels) > 1 else ""
        axis.set_title(prefix + "bands: lowest to highest seed", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
