"""What a request reads of the catalogue, derived once per version of it and not per request: its columns as
arrays, its flags, the popularity order, the id lookup, norms, the withdrawn mask and recent filter masks
(rebuilt when items are added or the artifacts reloaded; the withdrawn mask when the withdrawn set is replaced).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import torch

from multimodal_rec.serving.artifacts import Artifacts
from multimodal_rec.serving.catalog_api import attribute_columns
from multimodal_rec.serving.filters import filter_mask

FILTER_MASKS = 32  # the most recent distinct filters whose catalogue masks are kept (per catalogue version)


# ---- what is derived from the catalogue once, not per request ---------------------------------------------
class Derived:
    """Arrays derived from one version of the artifacts (their catalogue, ids and vectors), each built on first
    use. A new version (items added: a new catalogue and longer ids; a reload: new artifacts) gets a new one."""

    def __init__(self, artifacts: Artifacts):
        # held, not just their ids: `derived` compares identities, which must not be reused by new objects
        self.catalog, self.item_ids, self.item_vectors = artifacts.catalog, artifacts.item_ids, artifacts.item_vectors
        self.modality_parts = artifacts.modality_parts
        self.n, self.item_dim = len(self.item_ids), artifacts.item_dim
        self.filter_masks: OrderedDict[str, np.ndarray] = OrderedDict()
        self._withdrawn: tuple | None = None  # (the frozenset it was built from, mask, count)
        self._passing: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # (id(filter mask), order) -> (mask, rows)
        self.records: dict[int, dict] = {}  # row -> its attributes as answers give them (bounded: explain.RECORDS)

    def current(self, artifacts: Artifacts) -> bool:
        return (artifacts.catalog is self.catalog and artifacts.item_ids is self.item_ids
                and artifacts.item_vectors is self.item_vectors and artifacts.modality_parts is self.modality_parts)

    @cached_property
    def cold(self) -> np.ndarray:
        return self.catalog["cold"].to_numpy(bool)

    @cached_property
    def popularity(self) -> np.ndarray:
        return self.catalog["popularity"].to_numpy(np.float32)

    @cached_property
    def log_popularity(self) -> np.ndarray:
        return np.log1p(self.catalog["popularity"].to_numpy(np.float64))

    @cached_property
    def popularity_order(self) -> np.ndarray:
        """Rows by exported popularity, most first, ties by row (as a stable sort of any subset orders them)."""
        return np.argsort(-self.log_popularity, kind="stable")

    @cached_property
    def own_parts(self) -> dict[str, np.ndarray]:
        """Whether each item's fusion part says something of its own (see _informative_parts)."""
        catalog = self.catalog
        return {"id": catalog["popularity"].to_numpy() > 0, "image": catalog["has_image"].to_numpy(bool),
                "text": catalog["has_text"].to_numpy(bool)}

    @cached_property
    def id_lookup(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids in ascending order, the rows that sort them or None when they already are): ids -> rows by binary
        search."""
        ids = self.item_ids
        if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
            return ids, None
        order = np.argsort(ids, kind="stable")
        return ids[order], order

    @cached_property
    def tower_norms(self) -> np.ndarray:
        """(N,) norms of the tower vectors (for cosine over them without normalising the whole matrix)."""
        return np.linalg.norm(self.item_vectors[:, : self.item_dim], axis=-1)

    @cached_property
    def part_norms(self) -> np.ndarray | None:
        """(N, M) norms of each item's modality parts in float32, as reasons computes them (chunk by chunk)."""
        if self.modality_parts is None:
            return None
        return np.concatenate([np.linalg.norm(float32(self.modality_parts[start:start + 65536]), axis=-1)
                               for start in range(0, len(self.modality_parts), 65536)])

    def unit_towers(self, rows: np.ndarray) -> np.ndarray:
        """(R, item_dim) the rows' tower vectors scaled to unit length (as _unit, with the norms derived once)."""
        return self.item_vectors[rows, : self.item_dim] / (self.tower_norms[rows, None] + 1e-8)

    @cached_property
    def attribute_arrays(self) -> list[tuple[str, str, object]]:
        """(name, kind, values) of each attribute answers carry, and `cold`, as catalog_api.attributes_of gives
        them: numeric columns as numpy arrays, Arrow-backed ones (strings) as one Arrow array (a row's value is
        taken without touching the others), anything else as Python objects."""
        out = []
        for name in [*attribute_columns(self.catalog), "cold"]:
            column = self.catalog[name]
            if isinstance(column.dtype, np.dtype) and column.dtype.kind in "biu":
                out.append((name, "exact", column.to_numpy()))
            elif isinstance(column.dtype, np.dtype) and column.dtype.kind == "f":
                out.append((name, "float", column.to_numpy()))
            elif hasattr(column.array, "__arrow_array__"):  # in one piece: a take from chunks copies them all
                values = pa.array(column.array)
                out.append((name, "arrow", values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values))
            else:
                out.append((name, "object", column.to_numpy(dtype=object)))
        return out

    def passing(self, allowed: np.ndarray, by_popularity: bool = False) -> np.ndarray:
        """The rows of a filter mask (ascending, or by exported popularity), kept with the mask when it is one of
        the cached filters'."""
        key = (id(allowed), by_popularity)
        rows = self._passing.get(key)
        if rows is None or rows[0] is not allowed:
            order = self.popularity_order if by_popularity else None
            rows = (allowed, order[allowed[order]] if by_popularity else np.flatnonzero(allowed))
            if any(mask is allowed for mask in self.filter_masks.values()):
                live = {id(mask) for mask in self.filter_masks.values()}
                self._passing = {key: value for key, value in self._passing.items() if key[0] in live}
                self._passing[key] = rows
        return rows[1]

    def withdrawn_mask(self, withdrawn: frozenset) -> tuple[np.ndarray, int]:
        """((N,) bool of the withdrawn rows, how many), for the withdrawn set in force (a new set is assigned at
        each withdrawal: service.withdraw_item)."""
        built = self._withdrawn
        if built is None or built[0] is not withdrawn:
            mask = np.zeros(self.n, dtype=bool)
            rows = np.fromiter(withdrawn, dtype=np.int64, count=len(withdrawn))
            mask[rows[(rows >= 0) & (rows < self.n)]] = True
            built = self._withdrawn = (withdrawn, mask, int(mask.sum()))
        return built[1], built[2]

    def rows_of_ids(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows of the ids the catalogue holds, which of `ids` it holds)."""
        ordered, order = self.id_lookup
        if not len(ordered):
            return np.empty(0, dtype=np.int64), np.zeros(len(ids), dtype=bool)
        where = np.minimum(np.searchsorted(ordered, ids), len(ordered) - 1)
        known = ordered[where] == ids
        where = where[known]
        return (where if order is None else order[where]).astype(np.int64, copy=False), known


def derived(artifacts: Artifacts) -> Derived:
    """The artifacts' derived arrays, for their current catalogue (built again after items were added)."""
    cached = artifacts.__dict__.get("_derived")
    if cached is None or not cached.current(artifacts):
        cached = Derived(artifacts)
        artifacts.__dict__["_derived"] = cached
    return cached


def allowed_rows(artifacts: Artifacts, filters: dict | None) -> np.ndarray | None:
    """(N,) bool of the rows passing `filters` (None: no filter); a filter seen recently is not computed again."""
    if not filters:
        return None
    cache = derived(artifacts)
    key = json.dumps(filters, sort_keys=True, default=repr)
    mask = cache.filter_masks.get(key)
    if mask is None:
        mask = filter_mask(artifacts.catalog, filters)  # a 422 for a bad filter, before anything is kept
        mask.flags.writeable = False
        cache.filter_masks[key] = mask
        while len(cache.filter_masks) > FILTER_MASKS:
            cache.filter_masks.popitem(last=False)
    else:
        cache.filter_masks.move_to_end(key)
    return mask


@dataclass
class Excluded:
    """What a request must not be answered: its own rows (the history with exclude_seen, the item itself for
    similar items) and every withdrawn item (a mask shared by all requests)."""

    rows: np.ndarray  # sorted distinct rows
    withdrawn: np.ndarray  # (N,) bool
    n_withdrawn: int

    @classmethod
    def of(cls, artifacts: Artifacts, rows) -> Excluded:
        mask, count = derived(artifacts).withdrawn_mask(artifacts.withdrawn)
        return cls(np.unique(np.asarray(rows, dtype=np.int64)), mask, count)

    def __len__(self) -> int:  # as len(set(rows) | withdrawn)
        inside = self.rows[(self.rows >= 0) & (self.rows < len(self.withdrawn))]
        return len(self.rows) + self.n_withdrawn - int(self.withdrawn[inside].sum())

    def hit(self, rows: np.ndarray) -> np.ndarray:
        """(R,) bool: which of `rows` are excluded."""
        if len(rows) and int(rows.max()) >= len(self.withdrawn):  # items added since the mask was built
            gone = np.zeros(len(rows), dtype=bool)
            inside = rows < len(self.withdrawn)
            gone[inside] = self.withdrawn[rows[inside]]
        else:
            gone = self.withdrawn[rows]
        if not len(self.rows):
            return gone
        where = np.minimum(np.searchsorted(self.rows, rows), len(self.rows) - 1)  # rows are sorted and distinct
        return gone | (self.rows[where] == rows)


def item_rows(artifacts: Artifacts, ids) -> tuple[np.ndarray, list]:
    """(rows of the known ids, in order; the unknown ids): artifacts.rows by binary search over the ids."""
    if not len(ids):
        return np.empty(0, dtype=np.int64), []
    values = np.asarray(ids, dtype=np.int64)
    rows, known = derived(artifacts).rows_of_ids(values)
    return rows, ([] if known.all() else values[~known].tolist())


def float32(values: np.ndarray) -> np.ndarray:
    """float16 -> float32, exactly as numpy's astype, ~10x faster (torch converts with the CPU's half instructions)."""
    return torch.from_numpy(np.ascontiguousarray(values)).float().numpy()
