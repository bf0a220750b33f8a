"""One preference type for the API, the CLI and the engine: key order, validation, normalization, syntax."""

from __future__ import annotations

import argparse

import pytest

from app.schemas import Preference as ApiPreference
from worker.cli.jobs import parse_preference
from worker.hipp.preference import KEYS, Preference, PreferenceError


def test_the_documented_syntax_and_the_older_forms_give_the_same_preference() -> None:
    expected = Preference(0.5, 0.25, 0.25)
    assert Preference.parse("utility=2,robustness=1,compression=1") == expected
    assert Preference.parse("2,1,1") == expected  # hipp plan's older positional form, KEYS order
    assert Preference.parse('{"utility": 2, "robustness": 1, "compression": 1}') == expected
    assert Preference.parse("compression=1") == Preference(0.0, 0.0, 1.0)  # missing keys are 0


@pytest.mark.parametrize(
    ("text", "message"),
    [("utility=-1,compression=1", "non-negative"), ("0,0,0", "all zero"), ("1,2", "needs 3 values"),
     ("speed=1", "unknown preference key"), ("utility=lots", "is not a number"), ("utility", "is not a number"),
     ("utility=1,robustness", "expected key=value"), ("utility=nan,compression=1", "finite"),
     ("[1, 2]", "is not a number")],
)
def test_bad_preferences_say_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(PreferenceError, match=message):
        Preference.parse(text)


def test_the_api_schema_and_the_cli_use_the_same_rules() -> None:
    assert tuple(ApiPreference.model_fields) == KEYS
    api = ApiPreference.model_validate({"utility": 2, "compression": 2})
    assert api.model_dump() == Preference.parse("utility=2,compression=2").as_dict() == parse_preference("2,0,2")
    with pytest.raises(argparse.ArgumentTypeError, match="all zero"):
        parse_preference("utility=0")
