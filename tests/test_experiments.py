"""The documented experiments: every shipped CSV loads and validates, and every results table of
the README and of the pages under docs/ names a folder of them that exists (no training)."""

import pathlib
import re

import pytest

import configuration
import Main

ROOT = pathlib.Path(Main.__file__).resolve().parent
EXPERIMENTS = ROOT / "experiments"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.DOTALL | re.MULTILINE)


def results_sections():
    """The results sections, by file and heading: '### Results...' in the README, '## Results...'
    in a page of docs/ (its sections sit a level higher), each up to the next heading of the same
    or a higher level. Headings are looked for outside fenced code, whose '# -> ...' lines are
    comments."""
    sections = {}
    for path in PAGES:
        text = path.read_text()
        hashes = "###" if path.name == "README.md" else "##"
        # Blank out fenced code (keeping its length) so that only real headings bound a section.
        bare = FENCE.sub(lambda match: re.sub(r"[^\n]", " ", match.group()), text)
        for match in re.finditer(rf"^{hashes} (Results[^\n]*)\n", bare, re.MULTILINE):
            end = re.compile(rf"^#{{1,{len(hashes)}}} ", re.MULTILINE).search(bare, match.end())
            body = text[match.end():end.start() if end else None]
            sections[f"{path.name}: {match.group(1)}"] = body
    return sections


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
