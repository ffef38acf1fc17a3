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


def serve_subset(monkeypatch, data, num_train, num_test):
    """Serve the first num_train training and num_test test images to in-process runs."""
    import Data_Preprocessing

    subset = data._replace(x_train=data.x_train[:num_train], y_train=data.y_train[:num_train],
                           x_test=data.x_test[:num_test], y_test=data.y_test[:num_test])
    monkeypatch.setattr(Data_Preprocessing, "load_fashion_mnist", lambda data_dir: subset)
    return subset


@pytest.fixture
def tenth_of_the_data(monkeypatch, fashion_mnist):
    """The first 6,000 training and 1,000 test images, served to in-process runs."""
    return serve_subset(monkeypatch, fashion_mnist, 6000, 1000)


def write_config(path, **constants):
    """A CSV of constants for `python Main.py -c -f`."""
    lines = ["param,val"] + [f"{name},{value}" for name, value in constants.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_one_clear_line(stderr, message):
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr and "Traceback" not in stderr, stderr


def assert_refused(tmp_path, capsys, message, **constants):
    """Main.main with these constants exits 2 with one line holding `message`, writing
    nothing."""
    import Main

    path = write_config(tmp_path / "refused.csv", OUTPUT_DIR=tmp_path / "out", **constants)
    assert Main.main(["-c", "-f", str(path)]) == Main.EXIT_BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()


def run_whole_and_resumed(tmp_path, setting, stop_after):
    """Run `setting` straight into tmp_path/whole, and into tmp_path/parts stopped after
    `stop_after` rounds, then resumed to the end."""
    import Main

    whole = write_config(tmp_path / "whole.csv", OUTPUT_DIR=tmp_path / "whole", **setting)
    assert Main.main(["-c", "-f", str(whole)]) == 0
    first = write_config(tmp_path / "first.csv", OUTPUT_DIR=tmp_path / "parts",
                         **{**setting, "ROUNDS": stop_after})
    assert Main.main(["-c", "-f", str(first)]) == 0
    rest = write_config(tmp_path / "rest.csv", OUTPUT_DIR=tmp_path / "parts", **setting,
                        RESUME=True)
    assert Main.main(["-c", "-f", str(rest)]) == 0


def round_clients(config, round_num):
    """The server's (selected, returning) clients of a round, for a dict of constants."""
    import Server_side

    return Server_side.round_clients(Server_side.ServerSettings.from_config(config), round_num)
