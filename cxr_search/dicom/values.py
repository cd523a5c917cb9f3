"""Normalisation of individual DICOM header values: ages, dates, sex, pixel spacing and views.

Header values in the wild are messy, so every parser here is total: a value it cannot understand
becomes ``None`` (or ``"UNKNOWN"`` for the view), never an exception. The parsers are public
because the dataset adapters reuse them on CSV metadata.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Iterable
from typing import Any, Optional

from pydicom.multival import MultiValue

__all__ = [
    "VIEWS",
    "age_from_dates",
    "as_text",
    "classify_view_text",
    "normalise_view",
    "parse_age",
    "parse_da",
    "parse_pixel_spacing",
    "parse_sex",
]

#: Normalised view positions, in the order the engine reports them.
VIEWS = ("PA", "AP", "LATERAL", "LL", "RL", "UNKNOWN")

_MAX_AGE_YEARS = 130.0
# Chest radiographs have ~0.1-0.2 mm pixels; anything outside this is a broken value.
_MIN_SPACING_MM = 1e-3
_MAX_SPACING_MM = 10.0


def as_text(value: Any) -> Optional[str]:
    """Turn an element value into stripped text.

    Args:
        value: A str, bytes, multi-value or any other element value, or None.

    Returns:
        The text with NULs blanked and surrounding whitespace stripped (multi-values joined
        with backslashes), or ``None`` when blank.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1", errors="replace")
    elif isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = str(value).replace("\x00", " ").strip()
    return text or None


_AGE_RE = re.compile(
    r"^(\d{1,3}(?:[.,]\d+)?)\s*"
    r"(Y|YR|YRS|YEAR|YEARS|M|MO|MOS|MONTH|MONTHS|W|WK|WKS|WEEK|WEEKS|D|DAY|DAYS)?$"
)
_AGE_UNIT_YEARS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


def parse_age(value: Any) -> Optional[float]:
    """Parse a DICOM Age String (``"045Y"``, ``"006M"``, ``"010W"``, ``"003D"``) into years.

    Also accepts the sloppy forms seen in exports: a bare number (years), spaces, lower case and
    unit words (``"45 years"``). Ages above 130 years are rejected.

    Args:
        value: The PatientAge value (str, bytes, number or None).

    Returns:
        The age in years, or ``None``.
    """
    text = as_text(value)
    if text is None:
        return None
    match = _AGE_RE.match(text.upper())
    if match is None:
        return None
    number = float(match.group(1).replace(",", "."))
    unit = (match.group(2) or "Y")[0]
    years = number * _AGE_UNIT_YEARS[unit]
    return years if 0.0 <= years <= _MAX_AGE_YEARS else None


def parse_da(value: Any) -> Optional[_dt.date]:
    """Parse a DICOM date (``"YYYYMMDD"``, also ``"YYYY.MM.DD"`` and ``"YYYY-MM-DD"``).

    Args:
        value: A DA value (str, bytes, :class:`datetime.date` or None).

    Returns:
        The date, or ``None`` for blanks, anonymised zeros and impossible dates.
    """
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return value
    text = as_text(value)
    if text is None:
        return None
    digits = re.sub(r"[.\-/]", "", text)
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return _dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def age_from_dates(birth: Any, study: Any) -> Optional[float]:
    """Age in years at `study` for a patient born on `birth` (DA values), or ``None``."""
    birth_date, study_date = parse_da(birth), parse_da(study)
    if birth_date is None or study_date is None:
        return None
    years = (study_date - birth_date).days / 365.25
    return years if 0.0 <= years <= _MAX_AGE_YEARS else None


_SEXES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}


def parse_sex(value: Any) -> Optional[str]:
    """Normalise PatientSex to ``"M"``, ``"F"``, ``"O"`` or ``None``."""
    text = as_text(value)
    return _SEXES.get(text.upper()) if text else None


def parse_pixel_spacing(value: Any) -> Optional[tuple[float, float]]:
    """Parse a PixelSpacing-like value into (row spacing, column spacing) in mm.

    Accepts what exports contain: pydicom multi-values, lists, a single number (square pixels),
    strings with backslashes (``"0.139\\\\0.139"``), commas as separators (``"0.139,0.139"``)
    or as decimal marks (``"0,139\\\\0,139"``, ``"0,139"``), and bytes. Non-positive,
    non-finite or implausible (> 10 mm) values give ``None``.

    Args:
        value: The raw or converted element value.

    Returns:
        A tuple of two floats, or ``None``.
    """
    parts: list[str]
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1", errors="replace")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        parts = [repr(float(value))]
    elif isinstance(value, str):
        text = value.strip().strip("\x00").strip()
        if not text:
            return None
        if "\\" in text:
            parts = text.split("\\")
        elif ";" in text:
            parts = text.split(";")
        elif "," in text and "." in text:
            parts = text.split(",")  # comma as separator: "0.139,0.139"
        elif "," in text and len(text.split()) > 1:
            parts = text.split()  # decimal commas, blank-separated: "0,139 0,139"
        elif text.count(",") == 1:
            parts = [text]  # one value with a decimal comma: "0,139"
        elif text.count(",") == 3:
            a, b, c, d = text.split(",")  # two values with decimal commas: "0,139,0,139"
            parts = [f"{a}.{b}", f"{c}.{d}"]
        elif "," in text:
            return None
        else:
            parts = text.split()
    elif isinstance(value, Iterable):
        parts = [str(v) for v in value]
    else:
        return None
    numbers: list[float] = []
    for part in parts:
        part = part.strip().strip("[]()'\"").strip()
        if not part:
            continue
        try:
            number = float(part.replace(",", "."))
        except ValueError:
            return None
        if not math.isfinite(number) or not _MIN_SPACING_MM <= number <= _MAX_SPACING_MM:
            return None
        numbers.append(number)
    if not numbers:
        return None
    if len(numbers) == 1:
        return (numbers[0], numbers[0])
    return (numbers[0], numbers[1])


_LATERAL_TOKENS = {"LAT", "LATERAL", "LATERALE", "LATERAAL", "LATERALIS", "SEITLICH"}
_LEFT_LATERAL_TOKENS = {"LL", "LLAT", "LLATERAL", "LTLAT"}
_RIGHT_LATERAL_TOKENS = {"RL", "RLAT", "RLATERAL", "RTLAT"}
_PA_TOKENS = {"PA", "POSTEROANTERIOR", "POSTERIORANTERIOR", "POSTANT"}
_AP_TOKENS = {"AP", "ANTEROPOSTERIOR", "ANTERIORPOSTERIOR", "ANTPOST"}
# Views that are definitely none of ours: stop looking and report UNKNOWN.
_OTHER_VIEW_TOKENS = {
    "DECUBITUS", "DECUB", "LLD", "RLD", "OBLIQUE", "OBL", "RAO", "LAO", "RPO", "LPO", "RLO",
    "LLO", "LORDOTIC", "APICAL",
}  # fmt: skip
_PHRASES = (
    ("POSTERO ANTERIOR", "POSTEROANTERIOR"),
    ("POSTERIOR ANTERIOR", "POSTERIORANTERIOR"),
    ("ANTERO POSTERIOR", "ANTEROPOSTERIOR"),
    ("ANTERIOR POSTERIOR", "ANTERIORPOSTERIOR"),
    ("P A", "PA"),
    ("A P", "AP"),
)


def classify_view_text(text: Any) -> Optional[str]:
    """Classify one view-describing string.

    Args:
        text: A ViewPosition value, a ViewCodeSequence code meaning, or free text such as a
            SeriesDescription.

    Returns:
        One of ``"PA"``, ``"AP"``, ``"LATERAL"``, ``"LL"``, ``"RL"`` when the text names exactly
        one of these; ``"UNKNOWN"`` when it names a view outside that set (decubitus, oblique,
        lordotic); ``None`` when it says nothing usable (blank, or several views such as
        ``"PA AND LATERAL"``).
    """
    raw = as_text(text)
    if raw is None:
        return None
    norm = " " + " ".join(re.findall(r"[A-Z0-9]+", raw.upper())) + " "
    for phrase, joined in _PHRASES:
        norm = norm.replace(f" {phrase} ", f" {joined} ")
    tokens = set(norm.split())
    if tokens & _OTHER_VIEW_TOKENS:
        return "UNKNOWN"
    found: set[str] = set()
    if tokens & _PA_TOKENS:
        found.add("PA")
    if tokens & _AP_TOKENS:
        found.add("AP")
    left = bool(tokens & _LEFT_LATERAL_TOKENS)
    right = bool(tokens & _RIGHT_LATERAL_TOKENS)
    if tokens & _LATERAL_TOKENS:
        left = left or bool(tokens & {"LEFT", "LT", "LINKS"})
        right = right or bool(tokens & {"RIGHT", "RT", "RECHTS"})
        if not (left or right):
            found.add("LATERAL")
    if left and not right:
        found.add("LL")
    elif right and not left:
        found.add("RL")
    elif left and right:
        found.add("LATERAL")
    return found.pop() if len(found) == 1 else None


def normalise_view(view_position: Any, *fallback_texts: Any) -> str:
    """Normalise a view from ViewPosition, then from fallback texts in order.

    Args:
        view_position: The ViewPosition value (``"PA"``, ``"POSTERO_ANTERIOR"``, ``"LAT"``,
            ``"LLAT"``, blank, ...).
        *fallback_texts: Other strings to try when ViewPosition is blank or unrecognised, most
            reliable first (code meaning, series description, protocol name, ...).

    Returns:
        One of :data:`VIEWS`.
    """
    for text in (view_position, *fallback_texts):
        view = classify_view_text(text)
        if view is not None:
            return view
    return "UNKNOWN"

