"""Why each item: the history item it is most similar to and the modality they agree on most; and the items'
catalogue attributes as answers give them (read from the derived column arrays, kept per row)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from multimodal_rec.serving.artifacts import Artifacts
from multimodal_rec.serving.catalog_api import _plain
from multimodal_rec.serving.derived import Derived, derived, float32
from multimodal_rec.serving.query import Query

RECORDS = 50_000  # items whose attributes (as answers give them) are kept (~20 MB), per catalogue version


def reasons(artifacts: Artifacts, query: Query, rows: np.ndarray) -> list[dict]:
    """Why each item: the history item it is most similar to, and the modality on which they agree most."""
    if query.strategy != "history":
        kind = {"profile": "matches the profile given", "popularity": "popular in the catalogue"}[query.strategy]
        return [{"kind": query.strategy, "text": kind} for _ in rows]
    if not len(rows):
        return []
    cache = derived(artifacts)
    history = np.unique(query.history_rows)
    similarity = cache.unit_towers(rows) @ cache.unit_towers(history).T  # (C, H) cosine
    closest = similarity.argmax(1)
    anchors = history[closest]  # (C,)
    names, cosines = artifacts.parts.get("part_names", artifacts.parts["modalities"]), None
    if artifacts.modality_parts is not None:
        a, b = float32(artifacts.modality_parts[anchors]), float32(artifacts.modality_parts[rows])  # (C, M, d)
        cosines = (a * b).sum(-1) / (cache.part_norms[anchors] * cache.part_norms[rows] + 1e-8)  # (C, M)
        informative = _informative_parts(cache, names, anchors, rows)
        cosines = _round4(np.where(informative, cosines, np.nan).astype(np.float64))  # NaN: not informative
        # the modality agreeing most: the first of the largest (rounded) values, as max() over the dict below
        most = np.where(np.isnan(cosines), -np.inf, cosines).argmax(1).tolist()
        cosines = cosines.tolist()
    # float64 first: no 0.66850000619 in JSON
    best = similarity[np.arange(len(rows)), closest].astype(np.float64).round(4).tolist()
    titles, anchor_ids = artifacts.titles[anchors].tolist(), artifacts.item_ids[anchors].tolist()
    out = []
    for position, (anchor_id, title) in enumerate(zip(anchor_ids, titles)):
        title = str(title)
        reason = {"kind": "history", "because_of": anchor_id, "because_of_title": title,
                  "similarity": best[position], "modality": None, "text": f"similar to {title!r}"}
        if cosines is not None:
            agree = {n: c for n, c in zip(names, cosines[position]) if c == c}
            reason["modality_similarity"] = agree
            if agree:
                reason["modality"] = names[most[position]]
                reason["text"] += f" (mostly by {reason['modality']})"
        out.append(reason)
    return out


def _round4(values: np.ndarray) -> np.ndarray:
    """round(v, 4) of each value, as Python rounds: numpy's rint(v * 1e4) / 1e4 is the same double wherever v * 1e4
    is not within float error of a half (for |v| <= 1 the error is ~1e-12); those few are rounded by Python."""
    scaled = values * 1e4
    out = np.rint(scaled) / 1e4
    with np.errstate(invalid="ignore"):
        near = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6
    for where in zip(*np.nonzero(near)):
        out[where] = round(float(values[where]), 4)
    return out


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + 1e-8)


def _informative_parts(cache: Derived, names: list[str], anchors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(C, M) whether fusion part m of both anchor c and item c says something of its own: an item without
    training interactions has the shared unknown-ID vector, one without an image or text the shared missing
    vector, so two such items "agree" on that part (cosine 1) without being alike."""
    both = {name: flags[anchors] & flags[rows] for name, flags in cache.own_parts.items()}
    return np.stack([both.get(name, np.ones(len(rows), dtype=bool)) for name in names], axis=1)


def attributes(artifacts: Artifacts, rows: np.ndarray) -> list[dict]:
    """Each row's catalogue attributes (JSON values; missing ones left out) and its cold flag: what
    catalog_api.attributes_of gives, read from the derived column arrays (only the rows asked for) once per row."""
    cache = derived(artifacts)
    records, wanted = cache.records, rows.tolist()
    missing = {row for row in wanted if row not in records}
    if missing:
        if len(records) + len(missing) > RECORDS:  # full: start again, with this request's rows
            records.clear()
            missing = set(wanted)
        missing = sorted(missing)
        records.update(zip(missing, _records(cache, np.asarray(missing, dtype=np.int64))))
    return [dict(records[row]) for row in wanted]  # a copy each: an answer may be changed by whoever holds it


def _records(cache: Derived, rows: np.ndarray) -> list[dict]:
    if not len(rows):
        return []
    columns = []
    for name, kind, values in cache.attribute_arrays:
        if kind == "exact":  # ints and bools: never missing
            taken = values[rows].tolist()
        elif kind == "float":
            taken = [v if math.isfinite(v) else None for v in values[rows].tolist()]
        elif kind == "arrow":
            taken = [_plain(v) for v in values.take(pa.array(rows)).to_pylist()]
        else:
            taken = [_plain(v) for v in values[rows]]
        columns.append((name, taken))
    records = [{} for _ in range(len(rows))]
    for name, taken in columns:
        for record, value in zip(records, taken):
            if value is not None and value != []:
                record[name] = value
    return records
