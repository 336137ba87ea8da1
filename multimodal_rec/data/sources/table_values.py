"""Cell values of a shop's own files -> canonical values: ids as strings, times as epoch seconds, numbers
(a price such as "$1,299.00"), multi-valued attributes (a list, or a delimited string such as a category
path "Beauty > Skin Care > Serums") and texts joined from several columns. A value that cannot be read is
reported by the caller with its file and line."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

MISSING_WORDS = {"", "none", "null", "nan", "n/a", "na", "-"}
CURRENCY = re.compile(r"[$€£¥₹,\s]")
MS_THRESHOLD = 1e11  # epoch seconds stay below it until the year 5138; milliseconds pass it after 1973
TIMESTAMP_UNITS = ("auto", "s", "ms", "iso")


def is_missing(value) -> bool:
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING_WORDS


def id_key(value) -> str | None:
    """An id of any type as its string key (12.0 from a JSON number is "12"); None when missing."""
    if is_missing(value):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, (list, dict, np.ndarray)):
        return None
    key = str(value).strip()
    return key or None


def id_keys(values: pd.Series) -> pd.Series:
    return values.map(id_key)


def number(value) -> float | None:
    """A float, NaN when missing, None when the cell holds something that is not a number."""
    if is_missing(value):
        return math.nan
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, str):
        try:
            parsed = float(CURRENCY.sub("", value))
        except ValueError:
            return None
        return parsed if math.isfinite(parsed) else None
    return None


def epoch_seconds(values: pd.Series, unit: str = "auto") -> np.ndarray:
    """(n,) float64 epoch seconds; NaN where a value is missing or not a time. `auto`: numbers are seconds,
    or milliseconds past 1e11; anything else is read as an ISO 8601 date or date-time (UTC unless it says)."""
    if unit not in TIMESTAMP_UNITS:
        raise ValueError(f"timestamp_unit must be one of {TIMESTAMP_UNITS}, got {unit!r}")
    out = np.full(len(values), np.nan)
    if unit != "iso":
        numeric = pd.to_numeric(values.map(lambda v: None if is_missing(v) or isinstance(v, bool) else v),
                                errors="coerce").to_numpy(np.float64)
        scale = np.where(numeric > MS_THRESHOLD, 1e-3, 1.0) if unit == "auto" else (1e-3 if unit == "ms" else 1.0)
        out = numeric * scale
        if unit != "auto":
            return out
    textual = np.isnan(out) & ~values.map(is_missing).to_numpy(bool)
    if textual.any():
        parsed = pd.to_datetime(values[textual].astype(str).str.strip(), utc=True, format="ISO8601", errors="coerce")
        seconds = (parsed - pd.Timestamp("1970-01-01", tz="UTC")) / pd.Timedelta(seconds=1)
        out[textual] = seconds.to_numpy(np.float64, na_value=np.nan)
    return out


def multi_values(value, delimiter: str | None) -> list[str]:
    """A list of distinct non-empty strings from a list cell, or a string split on `delimiter`."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        parts = [p for v in value for p in (multi_values(v, delimiter) if isinstance(v, list) else [v])]
    elif is_missing(value):
        return []
    elif delimiter:
        parts = str(value).split(delimiter)
    else:
        parts = [value]
    cleaned = [str(p).strip() for p in parts if not is_missing(p)]
    return list(dict.fromkeys(p for p in cleaned if p))


def text_of(value) -> str:
    """A text cell as one string: lists (a description given as paragraphs) are joined."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        return " ".join(t for t in map(text_of, value) if t)
    return "" if is_missing(value) else str(value).strip()


def joined_text(parts: list[str]) -> str:
    """Non-empty parts joined into sentences ("Title. Description")."""
    kept = [p.strip() for p in parts if p and p.strip()]
    return " ".join([*(p if p[-1] in ".!?" else f"{p}." for p in kept[:-1]), *kept[-1:]])
