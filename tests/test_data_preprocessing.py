"""Tests of the IDX loader and of every partition scheme's invariants."""

import gzip
import struct

import numpy as np
import pytest

import Data_Preprocessing

NUM_CLIENTS = 100
SCHEME_ARGUMENTS = dict(max_sample_share=0.1, classes_per_client=3, dirichlet_alpha=0.5,
                        shards_per_client=2)


def write_idx(path, array, truncate_by=0):
    """Write `array` (uint8) as a gzip IDX file, optionally cutting bytes off the end."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + array.tobytes()
    with gzip.open(path, "wb") as file:
        file.write(payload[:len(payload) - truncate_by])


def test_read_idx_round_trips_images_and_labels(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels.gz", labels)
    np.testing.assert_array_equal(Data_Preprocessing.read_idx(tmp_path / "images.gz"), images)
    np.testing.assert_array_equal(Data_Preprocessing.read_idx(tmp_path / "labels.gz"), labels)


def test_read_idx_names_a_truncated_file(tmp_path):
    write_idx(tmp_path / "short.gz", np.ones((5, 28, 28), np.uint8), truncate_by=100)
    with pytest.raises(Data_Preprocessing.DataError, match="short.gz.*truncated"):
        Data_Preprocessing.read_idx(tmp_path / "short.gz")


def test_read_idx_names_a_file_with_a_bad_magic_number(tmp_path):
    with gzip.open(tmp_path / "wrong.gz", "wb") as file:
        file.write(b"\x00\x00\x0d\x01" + struct.pack(">i", 3) + bytes(12))
    with pytest.raises(Data_Preprocessing.DataError, match="wrong.gz.*magic"):
        Data_Preprocessing.read_idx(tmp_path / "wrong.gz")


def test_read_idx_names_a_file_that_is_not_gzip(tmp_path):
    (tmp_path / "plain.gz").write_bytes(b"this is not gzip data")
    with pytest.raises(Data_Preprocessing.DataError, match="plain.gz"):
        Data_Preprocessing.read_idx(tmp_path / "plain.gz")


def test_a_named_data_dir_without_the_files_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="DATA_DIR.*train-images-idx3-ubyte.gz"):
        Data_Preprocessing.find_data_dir(tmp_path)


def test_real_data_has_the_documented_shapes_and_scale(fashion_mnist):
    x_train, y_train, x_test, y_test, _ = fashion_mnist
    assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
    assert x_train.dtype == np.float32 and 0.0 == x_train.min() and x_train.max() == 1.0
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(y_train), np.full(10, 6000))


@pytest.fixture(scope="module")
def train_labels(fashion_mnist):
    return fashion_mnist[1]


def split(labels, distribution, seed=0, num_clients=NUM_CLIENTS, **overrides):
    arguments = {**SCHEME_ARGUMENTS, **overrides}
    return Data_Preprocessing.partition(labels, num_clients, distribution,
                                        np.random.default_rng(seed), **arguments)


@pytest.mark.parametrize("distribution", Data_Preprocessing.DISTRIBUTIONS)
def test_every_scheme_gives_disjoint_nonempty_deterministic_parts(train_labels, distribution):
    parts = split(train_labels, distribution)
    assert len(parts) == NUM_CLIENTS
    assert all(len(part) > 0 for part in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "a sample was given to two clients"
    assert joined.min() >= 0 and joined.max() < len(train_labels)
    again = split(train_labels, distribution)
    assert all(np.array_equal(first, second) for first, second in zip(parts, again))
    other_seed = split(train_labels, distribution, seed=1)
    assert not all(np.array_equal(first, second) for first, second in zip(parts, other_seed))


@pytest.mark.parametrize("distribution", Data_Preprocessing.DISTRIBUTIONS)
def test_schemes_that_promise_it_drop_no_sample(train_labels, distribution):
    assert sum(len(part) for part in split(train_labels, distribution)) == len(train_labels)


def test_iid_has_equal_sizes_and_all_classes(train_labels):
    parts = split(train_labels, "iid")
    assert {len(part) for part in parts} == {600}
    counts = Data_Preprocessing.class_counts(train_labels, parts)
    assert (counts > 0).all()


def test_noniid_ib_has_the_minimum_and_imbalanced_sizes(train_labels):
    sizes = np.array([len(part) for part in split(train_labels, "noniid_ib")])
    assert sizes.min() >= 120  # 0.2% of 60,000
    assert sizes.max() > 5 * sizes.min()
    # Classes are balanced in expectation: the pooled class shares of the big clients are even.
    counts = Data_Preprocessing.class_counts(train_labels, split(train_labels, "noniid_ib"))
    big = counts[sizes > np.median(sizes)].sum(axis=0)
    assert big.min() / big.max() > 0.9


def test_noniid_ib_rejects_more_clients_than_its_minimum_allows(train_labels):
    with pytest.raises(ValueError, match="NUM_CLIENTS must be at most 500"):
        split(train_labels, "noniid_ib", num_clients=501)


@pytest.mark.parametrize("classes_per_client", [1, 2, 3, 10])
def test_noniid_bi_is_niid_bench_label_skew(train_labels, classes_per_client):
    """NIID-Bench's #C=k: client i holds class i mod 10 and k - 1 others, exactly k in all."""
    parts = split(train_labels, "noniid_bi", classes_per_client=classes_per_client)
    counts = Data_Preprocessing.class_counts(train_labels, parts)
    assert ((counts > 0).sum(axis=1) == classes_per_client).all()
    assert (counts[np.arange(NUM_CLIENTS), np.arange(NUM_CLIENTS) % 10] > 0).all()
    # Each class is split over its holders as evenly as possible.
    for label in range(10):
        held = counts[:, label][counts[:, label] > 0]
        assert held.max() - held.min() <= 1


def test_noniid_bi_gives_many_distinct_label_sets(train_labels):
    """A fixed cycle of classes gave only 5 distinct pairs for K = 100, 2 classes."""
    counts = Data_Preprocessing.class_counts(
        train_labels, split(train_labels, "noniid_bi", classes_per_client=2))
    label_sets = {tuple(np.flatnonzero(row)) for row in counts}
    assert len(label_sets) >= 30


def test_noniid_bi_uses_every_sample_for_uneven_holder_counts(train_labels):
    """K = 7, 3 classes used to keep only 42,000 samples (slots sized by the rarest class)."""
    parts = split(train_labels, "noniid_bi", num_clients=7, classes_per_client=3)
    counts = Data_Preprocessing.class_counts(train_labels, parts)
    held_classes = counts.sum(axis=0) > 0
    assert counts.sum() == 6000 * held_classes.sum()


def test_noniid_bi_names_the_constants_when_a_class_has_too_many_holders(train_labels):
    with pytest.raises(ValueError, match="NUM_CLIENTS x CLASSES_PER_CLIENT is too large"):
        split(train_labels, "noniid_bi", num_clients=60000, classes_per_client=10)


def test_noniid_ii_gives_c_classes_in_imbalanced_counts(train_labels):
    parts = split(train_labels, "noniid_ii")
    counts = Data_Preprocessing.class_counts(train_labels, parts)
    assert ((counts > 0).sum(axis=1) == 3).all()
    sizes = counts.sum(axis=1)
    assert sizes.max() > 5 * sizes.min()


def test_dirichlet_gives_every_client_the_minimum_and_skews_more_with_small_alpha(train_labels):
    def mean_classes_held(alpha):
        counts = Data_Preprocessing.class_counts(
            train_labels, split(train_labels, "dirichlet", dirichlet_alpha=alpha))
        assert counts.sum(axis=1).min() >= Data_Preprocessing.MIN_DIRICHLET_SAMPLES
        return (counts > 0).sum(axis=1).mean()

    assert mean_classes_held(0.1) < mean_classes_held(100.0)


def test_dirichlet_that_cannot_split_many_tiny_clients_gives_up_after_a_bounded_effort(
        train_labels):
    # 10,000 clients of at least 6 samples each: alpha 0.5 leaves some short in every draw. The
    # old loop made 1,000 draws (6 minutes) before saying so.
    class CountingGenerator:
        def __init__(self):
            self.generator, self.dirichlet_draws = np.random.default_rng(0), 0

        def permutation(self, values):
            return self.generator.permutation(values)

        def dirichlet(self, alpha):
            self.dirichlet_draws += 1
            return self.generator.dirichlet(alpha)

    generator = CountingGenerator()
    with pytest.raises(ValueError, match="NUM_CLIENTS"):
        Data_Preprocessing.partition(train_labels, 10000, "dirichlet", generator,
                                     dirichlet_alpha=0.5)
    assert generator.dirichlet_draws <= 10 * 20  # 10 classes a split


@pytest.mark.parametrize("distribution, num_clients, smallest", [
    ("iid", 60000, 1), ("shards", 60000, 1), ("iid", 10000, 6), ("noniid_bi", 10000, 1)])
def test_tiny_clients_hold_every_sample_once(train_labels, distribution, num_clients, smallest):
    parts = Data_Preprocessing.partition(train_labels, num_clients, distribution,
                                         np.random.default_rng(0), **{
                                             **SCHEME_ARGUMENTS, "shards_per_client": 1})
    assert len(parts) == num_clients
    assert min(len(part) for part in parts) >= smallest
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(train_labels)))


@pytest.mark.parametrize("distribution, message", [
    ("noniid_ib", "at most 500 for noniid_ib"), ("noniid_bi", "too large for noniid_bi"),
    ("noniid_ii", "too large for noniid_ii")])
def test_distributions_that_cannot_make_60000_clients_say_so(train_labels, distribution,
                                                             message):
    with pytest.raises(ValueError, match=message):
        Data_Preprocessing.partition(train_labels, 60000, distribution,
                                     np.random.default_rng(0), **SCHEME_ARGUMENTS)


def test_shards_give_each_client_at_most_s_classes(train_labels):
    parts = split(train_labels, "shards", shards_per_client=2)
    counts = Data_Preprocessing.class_counts(train_labels, parts)
    # 60,000 / 200 = 300 per shard and 6,000 per class, so every shard holds a single class.
    assert ((counts > 0).sum(axis=1) <= 2).all()
    assert {len(part) for part in parts} == {600}


@pytest.mark.parametrize("distribution, overrides, message", [
    ("nope", {}, "DISTRIBUTION must be one of"),
    ("noniid_bi", {"classes_per_client": 0}, "CLASSES_PER_CLIENT"),
    ("dirichlet", {"dirichlet_alpha": 0.0}, "DIRICHLET_ALPHA"),
    ("shards", {"shards_per_client": 0}, "SHARDS_PER_CLIENT"),
])
def test_bad_scheme_parameters_name_the_constant(train_labels, distribution, overrides, message):
    with pytest.raises(ValueError, match=message):
        split(train_labels, distribution, **overrides)


def test_a_nodes_cache_gives_the_same_data_and_partition_and_rebuilds_what_is_broken(
        tmp_path, fashion_mnist):
    """A SuperNode reads the data and its partition from its disk after the first round:
    the same arrays bit for bit; a truncated file is rebuilt, another constant another entry."""
    import configuration
    import Main
    import node_cache

    config = {**Main.default_config(), "NUM_CLIENTS": 50, "DISTRIBUTION": "dirichlet"}
    expected = configuration.partition_data(config, fashion_mnist.y_train)
    for attempt in ("fill", "hit", "after damage"):
        data, client_indices = node_cache.load_data_and_partition(config, None, tmp_path)
        for name in ("x_train", "y_train", "x_test", "y_test"):
            np.testing.assert_array_equal(getattr(data, name), getattr(fashion_mnist, name))
            assert getattr(data, name).dtype == getattr(fashion_mnist, name).dtype
        assert len(client_indices) == 50
        for cached, direct in zip(client_indices, expected, strict=True):
            np.testing.assert_array_equal(cached, direct)
        (folder,) = tmp_path.iterdir()
        if attempt == "hit":
            for path in (folder / "x_train.npy", *folder.glob("partition_*.npz")):
                path.write_bytes(path.read_bytes()[:1000])
    other = {**config, "SEED": 1}
    node_cache.load_data_and_partition(other, None, tmp_path)
    assert len(list(folder.glob("partition_*.npz"))) == 2


def test_a_node_cache_that_cannot_be_written_still_gives_the_data(tmp_path, fashion_mnist,
                                                                  caplog):
    """A cache folder that cannot be created (here a file stands in its way) is skipped with a
    warning; the node trains from the data it loaded, not from nothing."""
    import configuration
    import Main
    import node_cache

    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the cache would go")
    config = {**Main.default_config(), "NUM_CLIENTS": 20, "DISTRIBUTION": "iid"}
    data, client_indices = node_cache.load_data_and_partition(config, None, blocked)
    np.testing.assert_array_equal(data.x_train, fashion_mnist.x_train)
    for cached, direct in zip(client_indices,
                              configuration.partition_data(config, fashion_mnist.y_train),
                              strict=True):
        np.testing.assert_array_equal(cached, direct)
    assert "node cache: could not write" in caplog.text
