"""The README's experiments: every shipped CSV loads and validates, and every results table names
a folder of them that exists (no training)."""

import pathlib
import re

import pytest

import configuration
import Main

ROOT = pathlib.Path(Main.__file__).resolve().parent
EXPERIMENTS = ROOT / "experiments"
README = (ROOT / "README.md").read_text()


def results_sections():
    """The README's '### Results' sections (and the default run's), by heading."""
    return {match.group(1): match.group(2) for match in re.finditer(
        r"^### (Results[^\n]*)\n(.*?)(?=^##)", README, re.DOTALL | re.MULTILINE)}


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*/*.csv")),
                         ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_experiment_csv_loads_and_validates(path):
    runs = configuration.load_configs(Main.parse_arguments(["-c", "-f", str(path)]),
                                      Main.default_config())
    assert runs and all(config["OUTPUT_DIR"] == pathlib.Path("results") / path.parent.name
                        for _, config in runs)


def test_every_folder_of_an_experiment_compares_without_clashing_folders():
    for folder in sorted(path for path in EXPERIMENTS.iterdir() if path.is_dir()):
        files = [str(path) for path in sorted(folder.glob("*.csv"))]
        arguments = Main.parse_arguments(["-c", "-f", *files])
        assert len(configuration.load_configs(arguments, Main.default_config())) >= len(files)


def test_every_results_table_names_its_command_and_the_folder_exists():
    sections = results_sections()
    assert len(sections) >= 4
    for heading, text in sections.items():
        folders = re.findall(r"python Main\.py -c -f experiments/([a-z_]+)/\*\.csv", text)
        assert folders, f"'{heading}' names no experiments command"
        for folder in folders:
            assert list((EXPERIMENTS / folder).glob("*.csv")), f"experiments/{folder} is empty"
