"""Request filters over the catalogue: {"category": "shoes", "genres": ["Comedy", "Drama"],
"price": {"min": 10, "max": 50}}. Lists mean "any of"; multi-valued columns match when they contain
a value; ranges are inclusive and either end may be left out."""

from __future__ import annotations

import numpy as np
import pandas as pd

from multimodal_rec.serving.errors import RequestError

RESERVED = {"item_id", "source_id", "title", "popularity", "cold", "has_image", "has_text", "withdrawn", "image"}


def is_multi(column: pd.Series) -> bool:
    sample = column.dropna()
    return len(sample) > 0 and isinstance(sample.iloc[0], (list, tuple, np.ndarray))


def filter_mask(catalog: pd.DataFrame, filters: dict) -> np.ndarray:
    """(N,) bool: the catalogue rows that pass every filter."""
    mask = np.ones(len(catalog), dtype=bool)
    for name, condition in filters.items():
        if name not in catalog.columns or name in RESERVED - {"cold"}:
            usable = sorted(c for c in catalog.columns if c not in RESERVED)
            raise RequestError(422, f"cannot filter on {name!r}; filterable attributes: {usable}")
        column = catalog[name]
        if isinstance(condition, dict):
            unknown = set(condition) - {"min", "max"}
            if unknown or not pd.api.types.is_numeric_dtype(column):
                raise RequestError(422, f"filter {name!r}: a range needs a numeric attribute and only min/max keys")
            values = column.to_numpy(np.float64)
            if condition.get("min") is not None:
                mask &= values >= float(condition["min"])
            if condition.get("max") is not None:
                mask &= values <= float(condition["max"])
            continue
        wanted = {str(v) for v in (condition if isinstance(condition, list) else [condition])}
        if is_multi(column):
            mask &= np.array([v is not None and bool(wanted & {str(x) for x in v}) for v in column], dtype=bool)
        else:
            mask &= column.astype("string").isin(wanted).fillna(False).to_numpy(bool)
    return mask
