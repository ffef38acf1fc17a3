"""What a SuperNode keeps on its own disk between rounds: the data set and its partition.

Flower 1.42 starts a new ClientApp process for every message, so without a cache every node
would read and decompress Fashion-MNIST and partition it again every round. The cache holds the
scaled arrays as .npy files (opened memory-mapped: a round reads only what it uses) and each
partition as .npz, keyed by the data files (path, size, modification time) and, for partitions,
by every constant the partition depends on. A file that cannot be read or has the wrong shape
is rebuilt; a changed data file or constant gives another key, so a stale entry is never read.
"""

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import zipfile

import numpy as np

import configuration
import Data_Preprocessing

LOGGER = logging.getLogger("flower_app")
PARTITION_CONSTANTS = ("NUM_CLIENTS", "DISTRIBUTION", "MAX_SAMPLE_SHARE", "CLASSES_PER_CLIENT",
                       "DIRICHLET_ALPHA", "SHARDS_PER_CLIENT", "SEED")
# What load_fashion_mnist returns: images with a channel axis, labels as they are.
_SHAPES = Data_Preprocessing.EXPECTED_SHAPES
ARRAYS = {"x_train": (np.float32, (*_SHAPES["train_images"], 1)),
          "y_train": (np.int32, _SHAPES["train_labels"]),
          "x_test": (np.float32, (*_SHAPES["test_images"], 1)),
          "y_test": (np.int32, _SHAPES["test_labels"])}


def default_cache_dir():
    """~/.cache/federated-deep-learning, or under XDG_CACHE_HOME when it is set."""
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "federated-deep-learning"


def load_data_and_partition(config, data_dir, cache_dir):
    """Return (FashionMNIST, client indices) from the cache, filling it on a miss.

    Without a data folder (Keras' download) nothing is cached: there are no files to key by.
    """
    directory = Data_Preprocessing.find_data_dir(data_dir)
    if directory is None:
        data = Data_Preprocessing.load_fashion_mnist(data_dir)
        return data, configuration.partition_data(config, data.y_train)
    data_key = _files_key(directory)
    folder = pathlib.Path(cache_dir) / f"fashion_mnist_{data_key}"
    data = _cached_data(folder, directory)
    return data, _cached_partition(folder, data_key, config, data.y_train)


def _files_key(directory):
    facts = []
    for name in Data_Preprocessing.FILE_NAMES.values():
        path = (directory / name).resolve()
        status = path.stat()
        facts.append([str(path), status.st_size, status.st_mtime_ns])
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]


def _cached_data(folder, directory):
    try:
        arrays = {name: _load_checked(folder / f"{name}.npy", dtype, shape)
                  for name, (dtype, shape) in ARRAYS.items()}
        return Data_Preprocessing.FashionMNIST(**arrays, source=str(directory))
    except (OSError, ValueError):
        data = Data_Preprocessing.load_fashion_mnist(directory)
        for name in ARRAYS:
            _write_atomically(folder / f"{name}.npy",
                              lambda file, array=getattr(data, name): np.save(file, array))
        return data


def _load_checked(path, dtype, shape):
    array = np.load(path, mmap_mode="r")
    if array.dtype != dtype or array.shape != shape:
        raise ValueError(f"{path} holds {array.dtype} {array.shape}")
    return array


def _cached_partition(folder, data_key, config, y_train):
    constants = [data_key] + [config[name] for name in PARTITION_CONSTANTS]
    key = hashlib.sha256(json.dumps(constants).encode()).hexdigest()[:16]
    path = folder / f"partition_{key}.npz"
    try:
        with np.load(path) as archive:
            flat, sizes = archive["indices"], archive["sizes"]
        if len(sizes) != config["NUM_CLIENTS"] or sizes.sum() != len(flat):
            raise ValueError(f"{path} does not hold {config['NUM_CLIENTS']} clients")
        return np.split(flat, np.cumsum(sizes)[:-1])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        client_indices = configuration.partition_data(config, y_train)
        _write_atomically(path, lambda file: np.savez(
            file, indices=np.concatenate(client_indices),
            sizes=np.array([len(indices) for indices in client_indices])))
        return client_indices


def _write_atomically(path, write):
    """Call write(file) on a file beside `path`, then rename it into place, so a node killed
    mid-write leaves no half file under the real name. A cache that cannot be written (a
    read-only folder, a full disk) is skipped with a warning: the node trains from what it
    loaded, and loads again next round."""
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except OSError as error:
        LOGGER.warning("node cache: could not write %s (%s)", path, error)
        with contextlib.suppress(OSError):
            temporary.unlink()
