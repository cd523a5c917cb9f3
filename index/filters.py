"""What a query asks for, checked before anything heavy is loaded: filters, number of hits, level, returns.

Everything here is plain Python (no model, no store, no FAISS), so the CLI refuses a bad ``--filter``,
``-k``, ``--level`` or ``--return`` at once, with exit code 2, instead of after loading a model.

Filters (``--filter key=value``, repeatable):

* ``view=PA[,AP]``: the views the index stores are those of :data:`cxr_search.dicom.values.VIEWS`;
  ``LAT`` means any lateral (``LATERAL``, ``LL``, ``RL``), and DICOM spellings such as
  ``POSTERO_ANTERIOR`` or ``LLAT`` are understood. An unknown view is refused with the list.
* ``sex=F`` (``M``, ``F``, ``O`` or ``male``/``female``/``other``).
* ``age=40-60`` (40 to 60 years old: ``40 <= age < 61``), ``age=40-`` or ``age=40+`` (40 and over),
  ``age=0-60`` (up to 60), ``age=60`` (60 years old). Ages are whole years between 0 and 130; an
  inverted range or a negative age is refused.
* ``since=YYYY-MM-DD`` / ``until=YYYY-MM-DD`` (both inclusive; also ``--since`` / ``--until``).
* ``modality=DX[,CR]``.

Repeated ``view``, ``sex`` and ``modality`` filters accumulate (``view=PA --filter view=AP`` keeps both);
``age``, ``since`` and ``until`` may be given once each.
"""

from __future__ import annotations

import datetime as _dt
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from cxr_search.dicom.values import VIEWS, classify_view_text
from cxr_search.errors import ConfigError

LEVELS = ("image", "study")
RETURNS = ("reports", "images", "studies")
FILTER_KEYS = ("view", "sex", "age", "since", "until", "modality")
#: Most hits one query returns (``-k``); more is refused, never clamped silently.
MAX_K = 1000
#: Oldest age a filter accepts (as DICOM header parsing does).
MAX_AGE = 130

#: View synonyms a user may type, beyond the stored values themselves.
VIEW_SYNONYMS: Dict[str, Tuple[str, ...]] = {"LAT": ("LATERAL", "LL", "RL")}
_VIEW_MEANING = {"PA": "posteroanterior", "AP": "anteroposterior", "LATERAL": "lateral, side not recorded",
                 "LL": "left lateral", "RL": "right lateral", "UNKNOWN": "view not recorded or another view"}
_SEXES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_NUMBER = r"\d+(?:\.\d+)?"


@dataclass(frozen=True)
class Filters:
    """Search filters; ``None`` means no constraint.

    Attributes:
        views: Stored view values allowed.
        sexes: ``M``, ``F``, ``O`` values allowed.
        age_min: Youngest age in years (inclusive).
        age_max: Oldest age in whole years (inclusive: an age of 60.7 years is within ``age_max=60``).
        since: First study date (inclusive).
        until: Last study date (inclusive).
        modalities: DICOM modalities allowed.
    """

    views: Optional[Tuple[str, ...]] = None
    sexes: Optional[Tuple[str, ...]] = None
    age_min: Optional[float] = None
    age_max: Optional[float] = None
    since: Optional[_dt.date] = None
    until: Optional[_dt.date] = None
    modalities: Optional[Tuple[str, ...]] = None

    @property
    def empty(self) -> bool:
        """Whether nothing is filtered."""
        return all(v is None for v in asdict(self).values())

    def to_dict(self) -> Dict[str, Any]:
        """The constraints set, JSON-ready (dates as ISO strings)."""
        out: Dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            out[key] = value.isoformat() if isinstance(value, _dt.date) else list(value) if isinstance(value, tuple) else value
        return out

    def describe(self) -> str:
        """One line for people, e.g. ``view=PA,AP sex=F age=40-60``; ``""`` when nothing is filtered."""
        parts: List[str] = []
        if self.views:
            parts.append("view=" + ",".join(self.views))
        if self.sexes:
            parts.append("sex=" + ",".join(self.sexes))
        if self.age_min is not None or self.age_max is not None:
            lo = "" if self.age_min is None else f"{self.age_min:g}"
            hi = "" if self.age_max is None else f"{self.age_max:g}"
            parts.append(f"age={lo}-{hi}")
        if self.since:
            parts.append(f"since={self.since.isoformat()}")
        if self.until:
            parts.append(f"until={self.until.isoformat()}")
        if self.modalities:
            parts.append("modality=" + ",".join(self.modalities))
        return " ".join(parts)


def known_views_text() -> str:
    """The view vocabulary, for messages and help."""
    stored = ", ".join(f"{v} ({_VIEW_MEANING.get(v, v)})" for v in VIEWS)
    syn = "; ".join(f"{k} means any of {', '.join(v)}" for k, v in VIEW_SYNONYMS.items())
    return f"{stored}; {syn}; DICOM spellings such as POSTERO_ANTERIOR or LLAT are understood"


def parse_view(text: str) -> Tuple[str, ...]:
    """The stored view values one typed view stands for (``"LAT"`` → ``("LATERAL", "LL", "RL")``).

    Raises:
        ConfigError: A view the index cannot hold (the message lists the views and synonyms).
    """
    value = text.strip().upper()
    if value in VIEWS:
        return (value,)
    if value in VIEW_SYNONYMS:
        return VIEW_SYNONYMS[value]
    classified = classify_view_text(value)
    if classified is not None and classified != "UNKNOWN":
        return (classified,)
    raise ConfigError(f"filter view={text!r}: unknown view; the views are {known_views_text()}")


def _parse_age(value: str) -> Tuple[Optional[float], Optional[float]]:
    text = value.replace(" ", "")
    if text.startswith("-"):
        raise ConfigError(f"filter age={value!r}: ages are not negative; for 'up to 60' write age=0-60")
    m = re.fullmatch(rf"({_NUMBER})(?:(-|\+)({_NUMBER})?)?", text)
    if not m or (m.group(2) == "+" and m.group(3)):
        raise ConfigError(f"filter age={value!r}: write a range such as 40-60, 40- (40 and over), 0-60 (up to 60) "
                          "or one age such as 60")
    lo = float(m.group(1))
    hi = lo if m.group(2) is None else (float(m.group(3)) if m.group(3) else None)
    for age in (lo, hi):
        if age is not None and age > MAX_AGE:
            raise ConfigError(f"filter age={value!r}: ages go from 0 to {MAX_AGE} years")
    if hi is not None and hi < lo:
        raise ConfigError(f"filter age={value!r}: the range is inverted; write the younger age first "
                          f"(age={hi:g}-{lo:g})")
    return lo, hi


def _date(text: str, key: str) -> _dt.date:
    try:
        return _dt.date.fromisoformat(text.strip())
    except ValueError as exc:
        raise ConfigError(f"filter {key}={text!r}: not a date; write YYYY-MM-DD") from exc


def _add_once(out: Dict[str, Any], key: str, value: Any, item: str) -> None:
    if key in out and out[key] != value:
        raise ConfigError(f"filter {item!r}: {key.split('_')[0]} is already given; give it once")
    out[key] = value


def parse_filters(items: Iterable[str] = (), *, since: Optional[str] = None, until: Optional[str] = None) -> Filters:
    """Parse ``key=value`` filters (``view=PA``, ``view=PA,AP``, ``sex=F``, ``age=40-60``, ``since=2020-01-01``).

    Repeated ``view``/``sex``/``modality`` filters accumulate; ``age``, ``since`` and ``until`` are given
    at most once (``since``/``until`` also as the keyword arguments, i.e. ``--since``/``--until``).

    Raises:
        ConfigError: An unknown key, a malformed or impossible value, a conflict (the message says what
            is accepted).
    """
    out: Dict[str, Any] = {}
    lists: Dict[str, List[str]] = {"views": [], "sexes": [], "modalities": []}
    pairs = [str(i) for i in items] + ([f"since={since}"] if since else []) + ([f"until={until}"] if until else [])
    for item in pairs:
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise ConfigError(f"filter {item!r}: write key=value, for example view=PA or age=40-60")
        if key not in FILTER_KEYS:
            raise ConfigError(f"unknown filter {key!r}; known filters: {', '.join(FILTER_KEYS)}")
        values = [v.strip() for v in value.split(",") if v.strip()]
        if key == "view":
            lists["views"] += [v for typed in values for v in parse_view(typed)]
        elif key == "modality":
            for v in values:
                if not re.fullmatch(r"[A-Za-z0-9_]{1,16}", v):
                    raise ConfigError(f"filter modality={value!r}: write DICOM modality codes such as DX or CR")
            lists["modalities"] += [v.upper() for v in values]
        elif key == "sex":
            unknown = [v for v in values if v.upper() not in _SEXES]
            if unknown or not values:
                raise ConfigError(f"filter sex={value!r}: use M, F or O")
            lists["sexes"] += [_SEXES[v.upper()] for v in values]
        elif key == "age":
            lo, hi = _parse_age(value)
            _add_once(out, "age_min", lo, item)
            _add_once(out, "age_max", hi, item)
        else:
            _add_once(out, key, _date(value, key), item)
    for key, vals in lists.items():
        if vals:
            out[key] = tuple(dict.fromkeys(vals))  # first-seen order, no repeats
    if out.get("since") and out.get("until") and out["since"] > out["until"]:
        raise ConfigError(f"since={out['since']} is after until={out['until']}: no study can match")
    return Filters(**out)


def check_k(k: Any) -> int:
    """``k`` when it is a number of hits between 1 and :data:`MAX_K`.

    Raises:
        ConfigError: Out of range (refused, not clamped).
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ConfigError(f"-k {k!r}: give a number of hits between 1 and {MAX_K}")
    return k


def check_level(level: str) -> str:
    """``level`` when it is ``image`` or ``study``.

    Raises:
        ConfigError: Another value.
    """
    if level not in LEVELS:
        raise ConfigError(f"--level {level!r}: use {' or '.join(LEVELS)}")
    return level


def check_returns(returns: str) -> str:
    """``returns`` when it is ``reports``, ``images`` or ``studies``.

    Raises:
        ConfigError: Another value.
    """
    if returns not in RETURNS:
        raise ConfigError(f"--return {returns!r}: use {', '.join(RETURNS[:-1])} or {RETURNS[-1]}")
    return returns


__all__ = ["FILTER_KEYS", "Filters", "LEVELS", "MAX_AGE", "MAX_K", "RETURNS", "VIEW_SYNONYMS", "check_k",
           "check_level", "check_returns", "known_views_text", "parse_filters", "parse_view"]
