"""Checkpoints: a run's whole state in one file, written atomically, and resuming from it.

A checkpoint holds the global weights, every component's state (server optimizer and SCAFFOLD
variate, clients' kept state, the centralized baseline) and the history so far, with the
config that made it. RESUME continues a run from it when only RESUMABLE_CHANGES differ; without
RESUME a folder that holds rounds of an earlier run is never silently overwritten.
"""

import json
import os
import pathlib

import numpy as np

import algorithms
import constant_rules
import models
import personalization
import secure_aggregation
import Utils

CHECKPOINT_NAME = "checkpoint.npz"
# Constants that may change between a run and its resumption without changing its results.
RESUMABLE_CHANGES = ("ROUNDS", "RESUME", "CHECKPOINT_EVERY", "DATA_DIR", "OUTPUT_DIR",
                     "TARGET_ACCURACY", "REPEATS", "EVAL_EVERY")
# Constants added after runs were first named by a hash of every constant, with the value that
# gives the results of before they existed. At that value a constant is left out of the run
# folder's hash, and a checkpoint saved without it counts it as that value: adding a constant
# (or a plug-in it chooses) renames no existing run's folder and breaks no RESUME.
ADDED_CONSTANTS = {"MODEL": models.DEFAULT, "SECURE_AGGREGATION": "none",
                   "SECAGG_THRESHOLD": 0.6}
# The plug-ins' constants that named every run before plug-ins declared their constants. Any
# other plug-in constant names a run only when its plug-in is chosen: a new method's constants
# leave every other configuration's folder and RESUME as they were.
NAMED_EVERY_RUN = ("PROX_MU", "FINETUNE_EPOCHS", "HEAD_EPOCHS", "PERSONAL_EPOCHS",
                   "DITTO_LAMBDA")


def unread_constants(config):
    """The plug-in constants this configuration's chosen plug-ins do not read (beyond
    NAMED_EVERY_RUN), and secure aggregation's when it is off."""
    chosen = {**algorithms.get(config["ALGORITHM"]).CONSTANTS,
              **personalization.get(config["PERSONALIZATION"]).CONSTANTS}
    declared = constant_rules.option_names(algorithms, personalization)
    off = (secure_aggregation.CONSTANTS
           if config.get("SECURE_AGGREGATION", "none") == "none" else {})
    return (set(declared) - set(chosen) - set(NAMED_EVERY_RUN)) | set(off)


def identity(config):
    """The constants that name a run: all but RESUMABLE_CHANGES, the added constants at their
    value of before (see ADDED_CONSTANTS) and plug-in constants no chosen plug-in reads."""
    unread = unread_constants(config)
    return {name: value for name, value in config.items()
            if name not in RESUMABLE_CHANGES and name not in unread
            and not (name in ADDED_CONSTANTS and value == ADDED_CONSTANTS[name])}


def save_checkpoint(path, arrays, metadata):
    """Write named arrays and JSON metadata to one .npz file, atomically.

    The file is written beside its final name, synced to disk, then renamed over it: a crash at
    any moment leaves either the old checkpoint or the new one, never half of one.
    """
    path = pathlib.Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        np.savez(file, metadata=np.array(json.dumps(metadata)), **arrays)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_checkpoint(path):
    """Return (arrays by name, metadata) from a file written by save_checkpoint."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            metadata = json.loads(str(archive["metadata"]))
            arrays = {name: archive[name] for name in archive.files if name != "metadata"}
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"checkpoint {path} is unreadable ({error}); delete its folder to "
                         "start the run over") from None
    return arrays, metadata


def save_run_state(path, config, rows, global_weights, components):
    """Checkpoint a run: weights, every component's state and the history.

    Args:
        components: objects with get_state() -> list of arrays (server state, client memory,
            baseline), saved as '<name>_<index>'. Random draws are keyed by round and client
            (see `Utils.rng`), so no generator state needs saving.
    """
    arrays = {f"global_{index}": layer for index, layer in enumerate(global_weights)}
    sizes = {}
    for name, component in components.items():
        state = component.get_state()
        sizes[name] = len(state)
        arrays.update({f"{name}_{index}": array for index, array in enumerate(state)})
    metadata = {"round": rows[-1]["round"], "config": config, "history": rows,
                "state_sizes": sizes, "num_layers": len(global_weights)}
    save_checkpoint(path, arrays, json.loads(json.dumps(metadata, default=str)))


def restore_run_state(checkpoint, components):
    """Load what save_run_state wrote into the components.

    Returns:
        (global weights, history rows).
    """
    arrays, metadata = checkpoint
    for name, component in components.items():
        component.set_state([arrays[f"{name}_{index}"]
                             for index in range(metadata["state_sizes"][name])])
    global_weights = [arrays[f"global_{index}"] for index in range(metadata["num_layers"])]
    return global_weights, metadata["history"]


def config_differences(saved, current, ignored):
    """Return the names of constants whose JSON form differs between two configs; a constant
    the saved config predates counts as its value of before (ADDED_CONSTANTS)."""
    saved = {**ADDED_CONSTANTS, **saved}
    saved_json = json.loads(json.dumps(saved, default=str))
    current_json = json.loads(json.dumps(current, default=str))
    names = (set(saved_json) | set(current_json)) - set(ignored)
    return sorted(name for name in names if saved_json.get(name) != current_json.get(name))


def find_checkpoint(config, output_dir):
    """Return the checkpoint to resume from, or None for a fresh run; refuse risky cases.

    RESUME needs a checkpoint whose constants match (ROUNDS may grow). Without RESUME, an
    unfinished run in the same folder is an error rather than silently overwritten.
    """
    path = output_dir / CHECKPOINT_NAME
    if not config["RESUME"]:
        refuse_to_overwrite(path, output_dir)
        return None
    if not path.is_file():
        return None  # A run that never started starts now (see `check_resumable`).
    arrays, metadata = load_checkpoint(path)
    differing = config_differences(metadata["config"], config,
                                   RESUMABLE_CHANGES + tuple(unread_constants(config)))
    if differing:
        raise ValueError(f"RESUME: the checkpoint in {output_dir} was made with other values of "
                         f"{', '.join(differing)}; restore them or start a new run")
    if config["ROUNDS"] < metadata["round"]:
        raise ValueError(f"ROUNDS must be at least the checkpoint's round {metadata['round']} "
                         f"to resume, got {config['ROUNDS']}")
    return arrays, metadata


def refuse_to_overwrite(checkpoint_path, output_dir):
    """Raise ValueError when `output_dir` holds rounds of an earlier run, finished or not."""
    if checkpoint_path.is_file():
        _, metadata = load_checkpoint(checkpoint_path)
        done, planned = metadata["round"], metadata["config"]["ROUNDS"]
        state = (f"a finished run ({done} rounds)" if done >= planned
                 else f"an unfinished run (round {done} of {planned})")
    elif Utils.history_length(output_dir / "history.csv"):
        state = "the history of an earlier run"
    else:
        return
    raise ValueError(f"{output_dir} holds {state} of this configuration: set RESUME to True "
                     "to continue or extend it (more ROUNDS), or delete that folder to start over")


def check_resumable(runs):
    """Raise FileNotFoundError when RESUME finds no checkpoint for any run of the command.

    RESUME continues every run (seed, configuration) that has a checkpoint and starts the
    others, so a comparison stopped part-way continues where it stopped.
    """
    resumed = [prepared for prepared in runs if prepared.config["RESUME"]]
    if resumed and all(prepared.checkpoint is None for prepared in resumed):
        which = (f"{resumed[0].output_dir / CHECKPOINT_NAME}" if len(resumed) == 1 else
                 f"for any of the {len(resumed)} runs (the first: {resumed[0].output_dir})")
        raise FileNotFoundError(f"RESUME is True but there is no checkpoint {which}: no run "
                                "with exactly these constants (ROUNDS aside) was saved; run "
                                "once without RESUME first")
