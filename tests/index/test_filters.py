"""Query options checked before anything is loaded: filters, views and their synonyms, ages, dates, k, level."""

from __future__ import annotations

import datetime as dt

import pytest

from cxr_search.dicom.values import VIEWS
from cxr_search.errors import ConfigError
from index.filters import (
    MAX_K,
    VIEW_SYNONYMS,
    Filters,
    check_k,
    check_level,
    check_returns,
    parse_filters,
    parse_view,
)


def test_repeated_view_filters_accumulate_in_order_without_repeats() -> None:
    f = parse_filters(["view=PA", "view=AP", "view=pa,LL"])
    assert f.views == ("PA", "AP", "LL")
    assert parse_filters(["sex=F", "sex=male"]).sexes == ("F", "M")
    assert parse_filters(["modality=dx", "modality=CR"]).modalities == ("DX", "CR")


def test_lat_means_every_lateral_and_dicom_spellings_are_understood() -> None:
    assert parse_view("LAT") == parse_view("lat") == ("LATERAL", "LL", "RL")
    assert set(VIEW_SYNONYMS["LAT"]) <= set(VIEWS)
    assert parse_view("POSTERO_ANTERIOR") == ("PA",)
    assert parse_view("LLAT") == ("LL",)
    for stored in VIEWS:
        assert parse_view(stored) == (stored,)


@pytest.mark.parametrize("bad", ["XYZ", "oblique", "PA AND LATERAL", "decubitus"])
def test_unknown_view_is_refused_with_the_vocabulary(bad: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_filters([f"view={bad}"])
    message = str(err.value)
    assert repr(bad) in message
    for view in VIEWS:
        assert view in message
    assert "LAT means any of LATERAL, LL, RL" in message


@pytest.mark.parametrize("spec, lo, hi", [
    ("40-60", 40, 60), ("40 - 60", 40, 60), ("40-", 40, None), ("40+", 40, None), ("0-60", 0, 60), ("60", 60, 60),
    ("2.5-3", 2.5, 3),
])
def test_age_ranges(spec: str, lo, hi) -> None:
    f = parse_filters([f"age={spec}"])
    assert (f.age_min, f.age_max) == (lo, hi)


@pytest.mark.parametrize("spec, words", [
    ("60-40", "inverted"), ("-5", "not negative"), ("-60", "not negative"), ("old", "write a range"),
    ("40+60", "write a range"), ("200", "0 to 130"), ("40-200", "0 to 130"),
])
def test_impossible_ages_are_refused(spec: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_filters([f"age={spec}"])


def test_dates_since_until_and_conflicts() -> None:
    f = parse_filters([], since="2020-01-01", until="2020-12-31")
    assert (f.since, f.until) == (dt.date(2020, 1, 1), dt.date(2020, 12, 31))
    assert parse_filters(["until=2019-05-01"]).until == dt.date(2019, 5, 1)
    with pytest.raises(ConfigError, match="after until"):
        parse_filters([], since="2021-01-01", until="2020-01-01")
    with pytest.raises(ConfigError, match="YYYY-MM-DD"):
        parse_filters(["since=yesterday"])
    with pytest.raises(ConfigError, match="give it once"):
        parse_filters(["age=40-50", "age=60-70"])
    with pytest.raises(ConfigError, match="give it once"):
        parse_filters(["since=2020-01-01"], since="2021-01-01")
    # The same value twice is no conflict.
    assert parse_filters(["since=2020-01-01"], since="2020-01-01").since == dt.date(2020, 1, 1)


def test_malformed_and_unknown_filters() -> None:
    with pytest.raises(ConfigError, match="unknown filter"):
        parse_filters(["colour=red"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_filters(["view"])
    with pytest.raises(ConfigError, match="M, F or O"):
        parse_filters(["sex=X"])
    with pytest.raises(ConfigError, match="modality"):
        parse_filters(["modality=D X!"])


def test_description_and_json_of_filters() -> None:
    f = parse_filters(["view=LAT", "sex=F", "age=40-60", "since=2020-01-01"])
    assert f.describe() == "view=LATERAL,LL,RL sex=F age=40-60 since=2020-01-01"
    assert f.to_dict() == {"views": ["LATERAL", "LL", "RL"], "sexes": ["F"], "age_min": 40.0, "age_max": 60.0,
                           "since": "2020-01-01"}
    assert Filters().empty and Filters().describe() == "" and Filters().to_dict() == {}


def test_k_level_and_returns_are_refused_not_clamped() -> None:
    assert check_k(1) == 1 and check_k(MAX_K) == MAX_K
    for bad in (0, -3, MAX_K + 1, 100_000, True, "5"):
        with pytest.raises(ConfigError, match=f"between 1 and {MAX_K}"):
            check_k(bad)
    assert check_level("study") == "study"
    with pytest.raises(ConfigError, match="image or study"):
        check_level("foo")
    assert check_returns("images") == "images"
    with pytest.raises(ConfigError, match="reports, images or studies"):
        check_returns("foo")
