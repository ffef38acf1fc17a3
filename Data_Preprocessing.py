"""Load Fashion-MNIST, scale it, and split the training set over simulated clients.

The four IDX files are the ones Keras downloads (Xiao et al. 2017). The non-IID splits follow the
project's seed (quantity skew, label skew), NIID-Bench's Dirichlet split (Li et al. 2022) and the
pathological shards of McMahan et al. (2017), "Communication-Efficient Learning of Deep Networks
from Decentralized Data".
"""

import gzip
import os
import pathlib
import typing
import zlib

import numpy as np

FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
EXPECTED_SHAPES = {
    "train_images": (60000, 28, 28),
    "train_labels": (60000,),
    "test_images": (10000, 28, 28),
    "test_labels": (10000,),
}
KERAS_CACHE_DIR = pathlib.Path.home() / ".keras" / "datasets" / "fashion-mnist"
DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
DISTRIBUTIONS = ("iid", "noniid_ib", "noniid_bi", "noniid_ii", "dirichlet", "shards")
NUM_CLASSES = 10
# NIID-Bench resamples the Dirichlet split until every client holds at least this many samples.
MIN_DIRICHLET_SAMPLES = 10
MAX_DIRICHLET_TRIES = 1000
# Redraws cost about K: with many tiny clients, give up after about this many client draws.
DIRICHLET_CLIENT_DRAWS = 200_000
# The seed's quantity-skewed split: a guaranteed minimum, then turns until this share is left.
IB_MIN_SHARE = 0.002
IB_STOP_SHARE = 0.001


class FashionMNIST(typing.NamedTuple):
    """The data set as the CNN reads it (see `load_fashion_mnist`)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str


class DataError(ValueError):
    """A data file is missing, truncated or not the IDX file it claims to be."""


def read_idx(path):
    """Read one gzip-compressed IDX file into a uint8 array.

    Args:
        path: a `.gz` file in the IDX format (magic 0x0000 0x08 ndim, big-endian int32 sizes).
    Returns:
        np.ndarray of dtype uint8 and the shape the header declares.
    Raises:
        DataError naming the file when it cannot be read, is not IDX uint8, or is truncated.
    """
    path = pathlib.Path(path)
    try:
        with gzip.open(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"data file {path} is unreadable or corrupt ({error}); "
                        "delete it and fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"data file {path} is not an IDX file of unsigned bytes (bad magic number)")
    num_dims = raw[3]
    header_size = 4 + 4 * num_dims
    if len(raw) < header_size:
        raise DataError(f"data file {path} is truncated inside its header")
    shape = tuple(int(size) for size in np.frombuffer(raw, ">i4", num_dims, offset=4))
    expected_bytes = int(np.prod(shape))
    if len(raw) - header_size != expected_bytes:
        raise DataError(f"data file {path} holds {len(raw) - header_size} bytes of data, but its "
                        f"header promises {expected_bytes} for shape {shape}: truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=header_size).reshape(shape)


def _has_all_files(directory):
    return all((directory / name).is_file() for name in FILE_NAMES.values())


def find_data_dir(data_dir=None):
    """Return the first folder holding the four Fashion-MNIST files, or None.

    A folder the user names (argument `data_dir`, else the FASHION_MNIST_DIR environment variable)
    must hold the files: silently reading other files would hide a typo. Otherwise the Keras cache
    and Debian's `dataset-fashion-mnist` location are tried in that order.
    """
    requested = data_dir or os.environ.get("FASHION_MNIST_DIR")
    if requested:
        directory = pathlib.Path(requested).expanduser()
        if not _has_all_files(directory):
            missing = [name for name in FILE_NAMES.values() if not (directory / name).is_file()]
            raise FileNotFoundError(f"DATA_DIR {directory} lacks {', '.join(missing)}; "
                                    "it must hold the four Fashion-MNIST .gz files")
        return directory
    for directory in (KERAS_CACHE_DIR, DEBIAN_DIR):
        if _has_all_files(directory):
            return directory
    return None


def _download_with_keras():
    """Fall back on Keras' downloader; one clear error when it cannot reach the network."""
    import tensorflow as tf  # Imported here so the offline paths never pay for TensorFlow.

    try:
        (x_train, y_train), (x_test, y_test) = tf.keras.datasets.fashion_mnist.load_data()
    except Exception as error:  # Keras raises several kinds (URLError, OSError, Exception).
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {KERAS_CACHE_DIR} or {DEBIAN_DIR}, and the download "
            f"failed ({type(error).__name__}). Install it with "
            "'apt-get install dataset-fashion-mnist', or set DATA_DIR to a folder holding "
            f"{', '.join(FILE_NAMES.values())}") from None
    return {"train_images": x_train, "train_labels": y_train,
            "test_images": x_test, "test_labels": y_test}


def load_fashion_mnist(data_dir=None):
    """Load Fashion-MNIST scaled for the CNN.

    Returns:
        FashionMNIST(x_train, y_train, x_test, y_test, source): images float32 in [0, 1] of shape
        (N, 28, 28, 1), labels int32 of shape (N,), N = 60,000 and 10,000, and the folder read
        (or "keras download").
    """
    directory = find_data_dir(data_dir)
    if directory is None:
        arrays, source = _download_with_keras(), "keras download"
    else:
        arrays = {key: read_idx(directory / name) for key, name in FILE_NAMES.items()}
        source = str(directory)
    for key, shape in EXPECTED_SHAPES.items():
        if arrays[key].shape != shape:
            raise DataError(f"data file {FILE_NAMES[key]} in {source} has shape "
                            f"{arrays[key].shape}, expected {shape}")
    if arrays["train_labels"].max() >= NUM_CLASSES or arrays["test_labels"].max() >= NUM_CLASSES:
        raise DataError(f"labels in {source} must lie in 0..{NUM_CLASSES - 1}")
    x_train = (arrays["train_images"].astype(np.float32) / 255.0)[..., np.newaxis]
    x_test = (arrays["test_images"].astype(np.float32) / 255.0)[..., np.newaxis]
    y_train = arrays["train_labels"].astype(np.int32)
    y_test = arrays["test_labels"].astype(np.int32)
    return FashionMNIST(x_train, y_train, x_test, y_test, source)


def partition(labels, num_clients, distribution, rng, max_sample_share=0.1,
              classes_per_client=3, dirichlet_alpha=0.5, shards_per_client=2):
    """Split sample indices over clients.

    Args:
        labels: int array (N,) of class labels 0..9.
        num_clients: K, the number of clients.
        distribution: one of DISTRIBUTIONS (see each `_split_*` function).
        rng: np.random.Generator; the same state gives the same split.
        max_sample_share, classes_per_client, dirichlet_alpha, shards_per_client: the parameters
            of the `noniid_ib`, `noniid_bi`/`noniid_ii`, `dirichlet` and `shards` schemes.
    Returns:
        list of K sorted int64 index arrays: disjoint and each non-empty.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"DISTRIBUTION must be one of {', '.join(DISTRIBUTIONS)}, "
                         f"got {distribution!r}")
    if not 1 <= num_clients <= len(labels):
        raise ValueError(f"NUM_CLIENTS must be between 1 and {len(labels)}, got {num_clients}")
    labels = np.asarray(labels)
    splitters = {
        "iid": lambda: _split_iid(len(labels), num_clients, rng),
        "noniid_ib": lambda: _split_quantity_skew(len(labels), num_clients, rng, max_sample_share),
        "noniid_bi": lambda: _split_label_skew(labels, num_clients, rng, classes_per_client),
        "noniid_ii": lambda: _split_label_and_quantity_skew(labels, num_clients, rng,
                                                            classes_per_client),
        "dirichlet": lambda: _split_dirichlet(labels, num_clients, rng, dirichlet_alpha),
        "shards": lambda: _split_shards(labels, num_clients, rng, shards_per_client),
    }
    return [np.sort(indices).astype(np.int64) for indices in splitters[distribution]()]


class ClientSplit(typing.NamedTuple):
    """Every client's rows of the training set: those it trains on, those it tests on."""

    train: list
    test: list


def split_local_test(client_indices, test_share, rng):
    """Split every client's samples at random into a local train and a local test part.

    A client of n samples tests on floor(test_share * n) of them but keeps at least one to
    train on, so a client of a single sample tests on none (per-client figures leave it out).
    test_share 0 returns the partition unchanged and empty test parts.
    Returns:
        ClientSplit of two lists of int64 index arrays; train keeps the partition's order.
    """
    if test_share == 0:
        return ClientSplit(list(client_indices),
                           [np.empty(0, np.int64) for _ in client_indices])
    train, test = [], []
    for indices in client_indices:
        # The 1e-9 absorbs binary rounding (0.29 * 100 is 28.999999999999996).
        count = min(int(test_share * len(indices) + 1e-9), len(indices) - 1)
        chosen = np.sort(rng.permutation(len(indices))[:count])
        test.append(np.asarray(indices)[chosen].astype(np.int64))
        train.append(np.delete(np.asarray(indices), chosen).astype(np.int64))
    return ClientSplit(train, test)


def class_counts(labels, client_indices):
    """Return an int array (K, 10): how many samples of each class every client holds."""
    return np.stack([np.bincount(labels[indices], minlength=NUM_CLASSES)
                     for indices in client_indices])


def _split_iid(num_samples, num_clients, rng):
    """IID: a random permutation cut into K parts whose sizes differ by at most one."""
    return np.array_split(rng.permutation(num_samples), num_clients)


def _split_quantity_skew(num_samples, num_clients, rng, max_sample_share):
    """The seed's `noniid_ib`: imbalanced sizes, classes balanced in expectation.

    Every client first gets 0.2% of the training set. The rest is dealt in turns over the clients;
    a turn gives one client a uniform random share in [0, max_sample_share) of what is left (at
    least one sample, so the loop always ends), until less than 0.1% is left. That remainder is
    then dealt one sample at a time, continuing the turns, so no sample is dropped.
    """
    min_size = max(1, int(IB_MIN_SHARE * num_samples))
    if min_size * num_clients > num_samples:
        raise ValueError(f"NUM_CLIENTS must be at most {num_samples // min_size} for noniid_ib "
                         f"(each client first gets 0.2% of the data), got {num_clients}")
    sizes = np.full(num_clients, min_size)
    remaining = num_samples - min_size * num_clients
    client = 0
    while remaining >= IB_STOP_SHARE * num_samples and remaining > 0:
        take = max(1, int(rng.uniform(0, max_sample_share) * remaining))
        sizes[client] += take
        remaining -= take
        client = (client + 1) % num_clients
    for _ in range(remaining):
        sizes[client] += 1
        client = (client + 1) % num_clients
    return np.split(rng.permutation(num_samples), np.cumsum(sizes)[:-1])


def _class_holders(num_clients, classes_per_client, rng):
    """Choose each client's classes as NIID-Bench's #C=k does; return the holders of each class.

    Client k holds class k mod 10, then `classes_per_client` - 1 other distinct classes drawn at
    random. The first class spreads the classes evenly; the random rest gives clients many
    different label sets (a fixed cycle would give only a handful).
    """
    if not 1 <= classes_per_client <= NUM_CLASSES:
        raise ValueError(f"CLASSES_PER_CLIENT must be between 1 and {NUM_CLASSES}, "
                         f"got {classes_per_client}")
    holders = {label: [] for label in range(NUM_CLASSES)}
    for client in range(num_clients):
        first = client % NUM_CLASSES
        others = rng.choice([label for label in range(NUM_CLASSES) if label != first],
                            classes_per_client - 1, replace=False)
        for label in sorted([first, *others.tolist()]):
            holders[label].append(client)
    return holders


def _split_label_skew(labels, num_clients, rng, classes_per_client):
    """`noniid_bi` (NIID-Bench's #C=k): each client holds exactly `classes_per_client` classes.

    Each class's samples are split over its holders as evenly as possible (sizes differ by at
    most one), so all samples of held classes are used; a class no client holds (possible only
    when K < 10) stays unused. Client sizes differ when classes have different numbers of holders.
    """
    parts = [[] for _ in range(num_clients)]
    for clients, class_indices in _held_classes(labels, num_clients, rng, classes_per_client,
                                                "noniid_bi"):
        for client, chunk in zip(clients, np.array_split(class_indices, len(clients))):
            parts[client].append(chunk)
    return [np.concatenate(part) for part in parts]


def _held_classes(labels, num_clients, rng, classes_per_client, distribution):
    """Deal the classes to their holders; yield (holders, the class's shuffled sample indices)
    for every class somebody holds, refusing a class with more holders than samples."""
    holders = _class_holders(num_clients, classes_per_client, rng)
    for label, clients in holders.items():
        if not clients:
            continue
        class_indices = rng.permutation(np.flatnonzero(labels == label))
        if len(class_indices) < len(clients):
            raise ValueError(f"NUM_CLIENTS x CLASSES_PER_CLIENT is too large for {distribution}: "
                             f"class {label} would have {len(clients)} holders but has "
                             f"{len(class_indices)} samples")
        yield clients, class_indices


def _split_label_and_quantity_skew(labels, num_clients, rng, classes_per_client):
    """`noniid_ii` (seed fig. 4): a subset of classes per client, in imbalanced counts.

    Each class is split over its holders by Dirichlet(1) proportions, after one sample each so no
    slot is empty; client sizes and their class mixes are therefore both imbalanced. All samples of
    held classes are used.
    """
    parts = [[] for _ in range(num_clients)]
    for clients, class_indices in _held_classes(labels, num_clients, rng, classes_per_client,
                                                "noniid_ii"):
        shares = rng.dirichlet(np.ones(len(clients)))
        sizes = 1 + rng.multinomial(len(class_indices) - len(clients), shares)
        for client, chunk in zip(clients, np.split(class_indices, np.cumsum(sizes)[:-1])):
            parts[client].append(chunk)
    return [np.concatenate(part) for part in parts]


def dirichlet_tries(num_clients):
    """Return how many draws `dirichlet` makes before giving up: 1,000 up to 200 clients, then
    fewer (20 for 10,000 clients), so that an impossible split is refused in seconds."""
    return max(3, min(MAX_DIRICHLET_TRIES, DIRICHLET_CLIENT_DRAWS // num_clients))


def _split_dirichlet(labels, num_clients, rng, dirichlet_alpha):
    """`dirichlet` (NIID-Bench): each class spread over clients by proportions ~ Dir(alpha).

    As in NIID-Bench, a client already holding more than N/K samples gets no share of further
    classes, and the whole split is redrawn until every client holds at least
    min(10, N/K) samples, at most `dirichlet_tries(K)` times.
    """
    if dirichlet_alpha <= 0:
        raise ValueError(f"DIRICHLET_ALPHA must be > 0, got {dirichlet_alpha}")
    min_size = max(1, min(MIN_DIRICHLET_SAMPLES, len(labels) // num_clients))
    tries = dirichlet_tries(num_clients)
    for _ in range(tries):
        parts = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for label in range(NUM_CLASSES):
            class_indices = rng.permutation(np.flatnonzero(labels == label))
            proportions = rng.dirichlet(np.full(num_clients, dirichlet_alpha))
            proportions = proportions * (sizes < len(labels) / num_clients)
            proportions = proportions / proportions.sum()
            cuts = (np.cumsum(proportions) * len(class_indices)).astype(np.int64)[:-1]
            for client, chunk in enumerate(np.split(class_indices, cuts)):
                parts[client].append(chunk)
                sizes[client] += len(chunk)
        if sizes.min() >= min_size:
            return [np.concatenate(part) for part in parts]
    raise ValueError(f"dirichlet split found no draw giving every client {min_size} samples in "
                     f"{tries} tries: raise DIRICHLET_ALPHA or lower NUM_CLIENTS")


def _split_shards(labels, num_clients, rng, shards_per_client):
    """`shards` (McMahan et al. 2017): sort by label, cut into S*K shards, deal S to each client.

    Shard sizes differ by at most one sample, so none is dropped; within a class the order is
    random, so which samples share a shard changes with the seed.
    """
    num_shards = shards_per_client * num_clients
    if shards_per_client < 1 or num_shards > len(labels):
        raise ValueError(f"SHARDS_PER_CLIENT x NUM_CLIENTS must be between 1 and {len(labels)}, "
                         f"got {shards_per_client} x {num_clients}")
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.concatenate([shards[shard] for shard in client_shards]) for client_shards in dealt]
