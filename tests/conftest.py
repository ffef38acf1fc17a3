"""Make the top-level modules importable and load the real data set once per test session."""

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def fashion_mnist():
    """The real Fashion-MNIST, as Main.py loads it: (x_train, y_train, x_test, y_test, source)."""
    import Data_Preprocessing

    return Data_Preprocessing.load_fashion_mnist()


@pytest.fixture
def real_data_once(monkeypatch, fashion_mnist):
    """Serve the session's already loaded data to in-process runs of Main.main."""
    import Data_Preprocessing

    monkeypatch.setattr(Data_Preprocessing, "load_fashion_mnist", lambda data_dir: fashion_mnist)


def round_clients(config, round_num):
    """The server's (selected, returning) clients of a round, for a dict of constants."""
    import Server_side

    return Server_side.round_clients(Server_side.ServerSettings.from_config(config), round_num)
