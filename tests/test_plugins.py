"""The plug-in seam: algorithms/ and personalization/ found by their files, checked by their own
declarations, and no code outside a plug-in dispatching on a method's name."""

import pathlib
import re
import sys
import types

import pytest

import algorithms
import checkpoints
import constant_rules
import configuration
import Main
import personalization
from conftest import ROOT, assert_refused


def test_every_plugin_declares_its_paper_and_derives_from_its_base():
    for family, base in ((algorithms, algorithms.Algorithm),
                         (personalization, personalization.Method)):
        assert family.DEFAULT in family.NAMES
        for name in family.NAMES:
            plugin = family.get(name)
            assert issubclass(plugin, base) and plugin.PAPER, name
            assert set(plugin.CONSTANTS) <= set(Main.default_config()), name


def code_outside_plugins():
    """Every project module but the plug-ins' own files (and the tests)."""
    return [path for path in sorted(ROOT.glob("*.py"))] + [
        ROOT / family / "__init__.py" for family in ("algorithms", "personalization")]


# A comparison of the chosen algorithm or method with something: dispatch by name.
NAME_COMPARISON = re.compile(
    r"""(\[["'](ALGORITHM|PERSONALIZATION)["']\]|\.algorithm\b|\.personalization\b)"""
    r"""\s*(==|!=|\bin\b|\bnot in\b)""")


def test_no_code_outside_a_plugin_compares_a_method_name():
    offenders = [f"{path.name}:{number}: {line.strip()}"
                 for path in code_outside_plugins()
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if NAME_COMPARISON.search(line)]
    assert offenders == []
    # The pattern does find the comparisons the seam removed.
    assert NAME_COMPARISON.search('if config["ALGORITHM"] == "scaffold":')
    assert NAME_COMPARISON.search('if settings.personalization != "none":')


@pytest.mark.parametrize("constant, family", [("ALGORITHM", algorithms),
                                              ("PERSONALIZATION", personalization)])
def test_a_bad_name_is_refused_listing_the_plugins(tmp_path, capsys, constant, family):
    assert_refused(tmp_path, capsys,
                   f"{constant} must be one of {', '.join(family.NAMES)}, got 'nosuch'",
                   **{constant: "nosuch"})


@pytest.fixture
def whole_model_plugin(monkeypatch):
    """A new algorithm nobody listed anywhere: client state over the whole model."""
    module = types.ModuleType("algorithms.wholestate")

    class WholeState(algorithms.Algorithm):
        PAPER = "a test's"
        CLIENT_STATE = ("memo",)
        WHOLE_MODEL = True

    module.PLUGIN = WholeState
    monkeypatch.setitem(sys.modules, "algorithms.wholestate", module)
    monkeypatch.setattr(algorithms, "NAMES", algorithms.NAMES + ("wholestate",))
    monkeypatch.setitem(configuration.RULES, "ALGORITHM",
                        configuration.one_of(algorithms.NAMES))
    return "wholestate"


def test_a_new_plugin_is_refused_by_its_properties_not_its_name(tmp_path, capsys,
                                                                  whole_model_plugin):
    """Before the seam, a new algorithm with whole-model client state passed with fedper (only
    'scaffold' was refused by name) and crashed mid-run."""
    assert_refused(tmp_path, capsys, "PERSONALIZATION fedper needs ALGORITHM one of",
                   ALGORITHM=whole_model_plugin, PERSONALIZATION="fedper",
                   LOCAL_TEST_SHARE=0.25)
    assert_refused(tmp_path, capsys, "AGGREGATION median needs ALGORITHM one of fedavg",
                   ALGORITHM=whole_model_plugin, AGGREGATION="median")
    assert_refused(tmp_path, capsys, "DP_CLIP_NORM > 0 (DP-FedAvg) needs ALGORITHM one of",
                   ALGORITHM=whole_model_plugin, DP_CLIP_NORM=1.0)


def test_client_state_that_would_not_fit_in_memory_is_refused(tmp_path, capsys, monkeypatch,
                                                               whole_model_plugin):
    monkeypatch.setattr(configuration, "personal_state_budget", lambda: 2**20)
    assert_refused(tmp_path, capsys, f"ALGORITHM {whole_model_plugin} would keep up to",
                   ALGORITHM=whole_model_plugin)


def test_constants_of_unchosen_plugins_leave_the_run_folder_alone():
    """A plug-in constant names a run only when its plug-in is chosen (legacy ones always);
    secure aggregation's constants only when it is on."""
    import secure_aggregation

    config = Main.default_config()
    declared = constant_rules.option_names(algorithms, personalization)
    unread = checkpoints.unread_constants(config)
    assert unread <= set(declared) | set(secure_aggregation.CONSTANTS)
    assert set(secure_aggregation.CONSTANTS) <= unread
    assert not set(secure_aggregation.CONSTANTS) & checkpoints.unread_constants(
        {**config, "SECURE_AGGREGATION": "secagg+"})
    assert not unread & set(checkpoints.NAMED_EVERY_RUN)
    for name in unread:
        assert name not in checkpoints.identity(config)
    assert "PROX_MU" in checkpoints.identity(config)  # named every run before plug-ins


def test_the_adding_an_algorithm_walkthrough_is_the_shipped_file():
    page = (ROOT / "docs" / "algorithms.md").read_text()
    shipped = (ROOT / "algorithms" / "fedprox.py").read_text()
    code = page.split("## Adding an algorithm", 1)[1].split("```python\n", 1)[1].split("```")[0]
    assert code.strip() in shipped
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("## Adding an algorithm", 1)[1].split("```python\n", 1)[1]
    # The README shows the class without its docstring: each line as shipped, in order.
    lines = [line for line in shown.split("```")[0].splitlines() if line.strip()]
    positions = [shipped.index(line + "\n") for line in lines]
    assert positions == sorted(positions)
    assert pathlib.Path(algorithms.__file__).parent.name == "algorithms"
