"""Rules for the constants' values: each a (test, what is allowed) pair, the test a function of
the value. configuration.RULES holds one per constant of Main.py; a plug-in (algorithms/,
personalization/) declares the rules of the constants it reads with the same helpers.
"""

import importlib
import numbers
import pathlib

import Utils


def integer(low, high=None, high_text=None, note=""):
    """A rule for an integer in [low, high] (no upper bound when high is None)."""
    allowed = (f"an integer >= {low}" if high is None
               else f"an integer from {low} to {high_text or high}")
    return (lambda value: Utils.is_integer(value) and low <= value
            and (high is None or value <= high)), allowed + note


def number(interval):
    """A rule for a finite number in an interval: '(0, 1]', '[0, 0.5)', '> 0' or '>= 0'."""
    if interval.startswith(">"):
        bound = interval.split()[1]
        interval_text = f"[{bound}, inf)" if interval.startswith(">=") else f"({bound}, inf)"
        allowed = f"a number {interval}"
    else:
        interval_text, allowed = interval, f"a number in {interval}"
    low, high = (float(bound) for bound in interval_text[1:-1].split(","))

    def is_allowed(value):
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and (low <= value if interval_text[0] == "[" else low < value)
                and (value <= high if interval_text[-1] == "]" else value < high))
    return is_allowed, allowed


def one_of(choices):
    """A rule for one of `choices` (a plug-in family's names)."""
    return (lambda value: value in choices), "one of " + ", ".join(choices)


BOOLEAN = (lambda value: isinstance(value, bool)), "True or False"


def device_model():
    def is_model(value):
        return isinstance(value, (str, pathlib.Path)) and str(value) != ""
    return is_model, "none, lognormal or the path of a CSV of device profiles"


def folder(optional):
    def is_folder(value):
        return ((optional and value is None)
                or (isinstance(value, (str, pathlib.Path)) and str(value) != ""))
    return is_folder, "None or a folder path" if optional else "a folder path"


def plugin(family, constant, name):
    """The PLUGIN class of file `name` in the plug-in package `family` (algorithms,
    personalization), whose NAMES are the values `constant` allows; ValueError listing them."""
    if name not in family.NAMES:
        raise ValueError(f"{constant} must be one of {', '.join(family.NAMES)}, got {name!r}")
    return importlib.import_module(f"{family.__name__}.{name}").PLUGIN


def plugin_constants(family):
    """{constant: rule} of every plug-in's CONSTANTS in `family` (one rule per constant)."""
    return {name: rule for member in family.NAMES
            for name, rule in plugin(family, "", member).CONSTANTS.items()}


def option_names(*families):
    """The constants the plug-ins of `families` declare, each once, in order."""
    return tuple({name: None for family in families for name in plugin_constants(family)})


def settings_option_names():
    """The constants a Settings' `options` carries: the plug-ins' and secure aggregation's."""
    import algorithms  # here: these modules import this one
    import personalization
    import secure_aggregation

    return option_names(algorithms, personalization) + tuple(secure_aggregation.CONSTANTS)
