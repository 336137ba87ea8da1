"""Answers requests from loaded artifacts: build the query, retrieve with FAISS, re-rank, explain.

Errors a client can fix raise `RequestError` with an HTTP status; the app turns them into 4xx.

A request is answered in three steps, so that requests arriving together share the costly middle (batching.py):
`prepare_query` and `recommend_ask` / `rank_ask` check it and gather its inputs (a 4xx there concerns that
request alone); `answer_many` runs one forward of the history encoder for all of them, one index search per
fetch size and one forward of the ranking network; then each answer is finished on its own (its filters,
exclude_seen, reasons, attributes). `build_query`, `recommend` and `rank` are the same steps for one request.

Nothing done per request is O(catalogue) beyond the index search: the catalogue's columns as arrays, its
flags, the popularity order, the withdrawn mask and recent filter masks are derived once per version of the
catalogue (`derived`: rebuilt when items are added or the artifacts reloaded, the withdrawn mask when the
withdrawn set is replaced) and reused.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import torch

from multimodal_rec.data.features import standardised_rank
from multimodal_rec.models.components.ranker import Ranker
from multimodal_rec.models.components.scoring import retrieval_vectors
from multimodal_rec.serving.artifacts import Artifacts
from multimodal_rec.serving.catalog_api import _plain, attribute_columns
from multimodal_rec.serving.errors import RequestError
from multimodal_rec.serving.filters import filter_mask
from multimodal_rec.serving.live import LiveState

MAX_FETCH = 4096  # FAISS candidates fetched before falling back to scoring the filtered catalogue exactly
MIN_FETCH = 64  # the first search asks for at least this many (rounded up to a power of two: see _first_fetch)
BLEND_POOL = 100  # candidates the online signals re-order (the model's best, + the items picked up most now)
FILTER_MASKS = 32  # the most recent distinct filters whose catalogue masks are kept (per catalogue version)
RECORDS = 50_000  # items whose attributes (as answers give them) are kept (~20 MB), per catalogue version


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
        self.records: dict[int, dict] = {}  # row -> its attributes as answers give them (bounded: RECORDS)

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
        return np.concatenate([np.linalg.norm(_float32(self.modality_parts[start:start + 65536]), axis=-1)
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


# ---- the query ---------------------------------------------------------------------------------------------
@dataclass
class Query:
    vector: np.ndarray | None  # (dim,) float32: the query as exported (unit for cosine; + a 1 for the bias column)
    history_rows: np.ndarray  # rows of the whole history, stored + sent (for exclusion and reasons)
    strategy: str  # "history" | "profile" | "popularity"
    inputs: tuple | None = None  # (rows, profile codes, hour) the history encoder reads, until encode_queries


def _profile_codes(artifacts: Artifacts, profile: dict | None, base: dict | None) -> dict:
    """A request profile {column: value} -> the query tower's codes (unknown values count as missing)."""
    vocab = artifacts.parts["vocabularies"]
    categorical = base["categorical"].clone() if base else torch.zeros(1, len(vocab["user_categorical"]),
                                                                         dtype=torch.long)
    numeric = base["numeric"].clone() if base else torch.zeros(1, len(vocab["user_numeric"]))
    for column, value in (profile or {}).items():
        if column in vocab["user_categorical"]:
            values = vocab["user_categorical"][column]
            position = values.index(str(value)) + 1 if str(value) in values else 0
            categorical[0, list(vocab["user_categorical"]).index(column)] = position
        elif column in vocab["user_numeric"]:
            reference = vocab["user_numeric"][column]
            try:
                number = float(value)
            except (ValueError, OverflowError) as error:
                raise RequestError(422, f"profile attribute {column!r} must be a number, got {value!r}") from error
            if not math.isfinite(number):  # "nan" would rank as the largest value
                raise RequestError(422, f"profile attribute {column!r} must be a finite number, got {value!r}")
            numeric[0, list(vocab["user_numeric"]).index(column)] = standardised_rank(reference, number)
        else:
            known = sorted([*vocab["user_categorical"], *vocab["user_numeric"]])
            raise RequestError(422, f"unknown profile attribute {column!r}; known: {known}")
    return {"categorical": categorical, "numeric": numeric}


def continuation(stored: np.ndarray, session: np.ndarray) -> np.ndarray:
    """The sent history as the continuation of the stored one: without its longest prefix that repeats the
    stored history's end, so that a client sending the user's recent items (or all of them) with `user_id` has
    each read once."""
    if not len(stored) or not len(session):
        return session
    for start in np.flatnonzero(stored == session[0]):  # earliest first: the longest overlap
        overlap = len(stored) - start
        if overlap <= len(session) and np.array_equal(stored[start:], session[:overlap]):
            return session[overlap:]
    return session


@torch.inference_mode()
def prepare_query(artifacts: Artifacts, user_id: int | None, history: list[int] | None, profile: dict | None,
                  hour: int | None) -> Query:
    """The query's inputs, checked (404 / 422 here); its vector is left to encode_queries where the history
    encoder must run."""
    parts = artifacts.parts
    session_rows, unknown = item_rows(artifacts, history or [])
    if unknown:
        raise RequestError(404, f"unknown item ids in history: {unknown[:20]}", unknown_item_ids=unknown)
    base_profile, stored_rows = None, np.empty(0, dtype=np.int64)
    if user_id is not None:
        if user_id not in artifacts.user_row:
            raise RequestError(404, f"unknown user id {user_id}", unknown_user_id=user_id)
        row = artifacts.user_row[user_id]
        stored_rows, _ = item_rows(artifacts, artifacts.user_history(user_id))
        session_rows = continuation(stored_rows, session_rows)
        if not history and not profile and hour is None:  # the exported vector is exactly this query
            return Query(artifacts.user_vectors[row], stored_rows, "history" if len(stored_rows) else "profile")
        base_profile = parts["user_profiles"](torch.tensor([row]))
        if hour is None:
            hour = int(parts["histories"]["last_hour"][row])
    seen = np.concatenate([stored_rows, session_rows])  # all of it is excluded with exclude_seen
    rows = seen[-parts["max_len"]:]  # the model reads the most recent max_len
    codes = _profile_codes(artifacts, profile, base_profile)  # a bad profile is a 422 whatever the model reads
    reads_profiles = getattr(parts["history_encoder"], "profile", None) is not None
    if not len(rows) and (not reads_profiles or (not profile and base_profile is None)):
        return Query(np.empty(0, dtype=np.float32), seen, "popularity")  # nothing the model can use
    return Query(None, seen, "history" if len(rows) else "profile",
                 (rows, codes, hour if hour is not None else 12))


@torch.inference_mode()
def encode_queries(artifacts: Artifacts, queries: list[Query]) -> None:
    """Fills the vector of every query that needs the history encoder, in one forward: histories left-padded
    to the longest (the encoder reads real positions only, so each vector is the one it gets alone)."""
    pending = [query for query in queries if query.vector is None]
    if not pending:
        return
    parts, item_dim = artifacts.parts, artifacts.item_dim
    length = max(1, max(len(query.inputs[0]) for query in pending))
    index = np.zeros((len(pending), length), dtype=np.int64)
    mask = np.zeros((len(pending), length), dtype=bool)
    for position, query in enumerate(pending):
        rows = query.inputs[0]
        if len(rows):
            index[position, length - len(rows):] = rows
            mask[position, length - len(rows):] = True
    vectors = artifacts.item_vectors[index, :item_dim]  # (B, L, d): one gather
    vectors[~mask] = 0.0
    codes = {key: torch.cat([query.inputs[1][key] for query in pending]) for key in ("categorical", "numeric")}
    hours = torch.tensor([query.inputs[2] for query in pending])
    out = parts["history_encoder"](torch.from_numpy(vectors), torch.from_numpy(mask), codes, hours)[:, -1]
    out = retrieval_vectors(out, artifacts.score).numpy().astype(np.float32)
    if artifacts.dim > item_dim:  # item biases: q . [v, t * b] = cos + t * b
        out = np.concatenate([out, np.ones((len(out), 1), dtype=np.float32)], axis=1)
    for query, vector in zip(pending, out):
        query.vector, query.inputs = vector, None


def build_query(artifacts: Artifacts, user_id: int | None, history: list[int] | None, profile: dict | None,
                hour: int | None) -> Query:
    query = prepare_query(artifacts, user_id, history, profile, hour)
    encode_queries(artifacts, [query])
    return query


# ---- retrieval ---------------------------------------------------------------------------------------------
def _first_fetch(ntotal: int, want: int, excluded: int) -> int:
    """Candidates asked of the index first: enough for `want` past the excluded ones, rounded up to a power of two
    so that requests arriving together share one search (a longer prefix of the same ranking)."""
    needed = max(2 * want + excluded, MIN_FETCH)
    return min(1 << (needed - 1).bit_length(), ntotal)


def _search(artifacts: Artifacts, vectors: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
    with artifacts.lock:
        return artifacts.index.search(vectors, fetch)


def _retrieve(artifacts: Artifacts, query: Query, want: int, allowed: np.ndarray | None, excluded: Excluded,
              found: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, retrieval scores) of the best `want` items passing the filters, best first; `found`: the first
    search's answer when a batch made it.

    Asks the index for more candidates until enough pass; an approximate index may never reach some
    items (an HNSW graph from one query), so past MAX_FETCH (or the whole catalogue) the items that pass
    are scored exactly."""
    ntotal = artifacts.index.ntotal
    fetch = _first_fetch(ntotal, want, len(excluded))
    lookup = derived(artifacts)
    while True:
        scores, ids = found if found is not None else _search(artifacts, query.vector[None, :], fetch)
        found = None
        valid = ids[0] >= 0
        rows, known = lookup.rows_of_ids(ids[0][valid])
        scores = scores[0][valid][known]
        keep = ~excluded.hit(rows)
        if allowed is not None:
            keep &= allowed[rows]
        if np.count_nonzero(keep) >= want:
            return rows[keep][:want], scores[keep][:want]
        if fetch >= min(MAX_FETCH, ntotal):
            return _exact(artifacts, query, want, allowed, excluded)
        fetch = min(fetch * 4, ntotal)


def _exact(artifacts: Artifacts, query: Query, want: int, allowed: np.ndarray | None,
           excluded: Excluded) -> tuple[np.ndarray, np.ndarray]:
    """The search when the index did not reach enough items passing the filters: every item that passes,
    scored exactly (O(items passing))."""
    vectors = artifacts.item_vectors
    candidates = derived(artifacts).passing(allowed) if allowed is not None else np.arange(len(vectors))
    candidates = candidates[~excluded.hit(candidates)]
    if len(candidates) * 4 > len(vectors):  # most of the catalogue: one product over the contiguous matrix
        exact = (vectors @ query.vector)[candidates]
    else:
        exact = vectors[candidates] @ query.vector
    return candidates[(order := _top(exact, want))], exact[order]


def _top(scores: np.ndarray, want: int) -> np.ndarray:
    """Positions of the `want` best scores, best first, ties in position order: a stable sort's first `want`,
    without sorting all of them."""
    if len(scores) <= 4 * want:
        return np.argsort(-scores, kind="stable")[:want]
    bar = np.partition(-scores, want - 1)[want - 1]
    top = np.flatnonzero(-scores <= bar)  # the want best and whatever ties the last of them, in order
    return top[np.argsort(-scores[top], kind="stable")][:want]


@torch.inference_mode()
def rerank_many(artifacts: Artifacts, work: list[tuple[Query, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """The ranking network's scores for each (query, candidate rows, retrieval scores); the retrieval scores
    where there is no ranker. The project's ranker scores each (query, item) pair on its own, so the candidates
    of all requests go through it in one forward."""
    ranker = artifacts.parts["ranker"]
    if ranker is None:
        return [retrieval for _, _, retrieval in work]
    out = [retrieval for _, _, retrieval in work]
    todo = [position for position, (_, rows, _) in enumerate(work) if len(rows)]
    if not todo:
        return out
    item_dim = artifacts.item_dim
    if len(todo) > 1 and type(ranker) is Ranker:  # pointwise: one forward over every request's candidates
        rows = np.concatenate([work[p][1] for p in todo])
        queries = np.concatenate([np.broadcast_to(work[p][0].vector[:item_dim], (len(work[p][1]), item_dim))
                                  for p in todo])
        retrieval = np.concatenate([work[p][2] for p in todo]).astype(np.float32)
        scores = ranker(torch.from_numpy(queries), torch.from_numpy(artifacts.tower_vectors(rows))[:, None],
                        torch.from_numpy(retrieval)[:, None])[:, 0].numpy()
        ends = np.cumsum([len(work[p][1]) for p in todo])[:-1]
        for position, part in zip(todo, np.split(scores, ends)):
            out[position] = part
        return out
    for position in todo:
        query, rows, retrieval = work[position]
        items = torch.from_numpy(artifacts.tower_vectors(rows)).unsqueeze(0)  # (1, C, d)
        query_vector = torch.from_numpy(query.vector[:item_dim])[None]
        out[position] = ranker(query_vector, items, torch.from_numpy(retrieval)[None].float())[0].numpy()
    return out


def rerank(artifacts: Artifacts, query: Query, rows: np.ndarray, retrieval: np.ndarray) -> np.ndarray:
    """The ranking network's scores for (query, candidates); retrieval scores when there is no ranker."""
    return rerank_many(artifacts, [(query, rows, retrieval)])[0]


# ---- explanations and answers ------------------------------------------------------------------------------
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
        a, b = _float32(artifacts.modality_parts[anchors]), _float32(artifacts.modality_parts[rows])  # (C, M, d)
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


def _float32(values: np.ndarray) -> np.ndarray:
    """float16 -> float32, exactly as numpy's astype, ~10x faster (torch converts with the CPU's half instructions)."""
    return torch.from_numpy(np.ascontiguousarray(values)).float().numpy()


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


def _answer(artifacts: Artifacts, query: Query, rows: np.ndarray, scores: np.ndarray, retrieval: np.ndarray) -> dict:
    explained, attrs = reasons(artifacts, query, rows), attributes(artifacts, rows)
    items = [{"item_id": i, "title": str(t), "score": s, "retrieval_score": q, "reason": why, "attributes": a}
             for i, t, s, q, why, a in zip(artifacts.item_ids[rows].tolist(), artifacts.titles[rows].tolist(),
                                           np.asarray(scores).tolist(), np.asarray(retrieval).tolist(), explained,
                                           attrs)]
    return {"strategy": query.strategy, "cold_start": query.strategy != "history", "items": items}


# ---- requests: checked one by one, answered together -------------------------------------------------------
@dataclass(eq=False)  # compared by identity: it holds arrays
class Ask:
    """One /recommend or /rank request, checked, with its inputs; the working state of answer_many."""

    query: Query
    k: int = 10
    allowed: np.ndarray | None = None  # (N,) bool: rows passing the request's filters; None: no filter
    exclude_seen: bool = False
    live: LiveState | None = None
    time: float = 0.0
    candidates: np.ndarray | None = None  # /rank: the candidate rows (withdrawn ones left out); None: /recommend
    withdrawn_ids: list = field(default_factory=list)  # /rank: the candidates left out
    filters: dict | None = None  # what `allowed` was made from (made again if items were added meanwhile)
    # filled while answering
    excluded: Excluded | None = None
    want: int = 0
    fetch: int = 0
    found: tuple | None = None
    rows: np.ndarray | None = None
    retrieval: np.ndarray | None = None
    blends: bool = False


def recommend_ask(artifacts: Artifacts, query: Query, k: int, filters: dict | None, exclude_seen: bool,
                  live: LiveState | None = None, time: float = 0.0) -> Ask:
    return Ask(query, k, allowed_rows(artifacts, filters), exclude_seen, live, time, filters=filters)


def rank_ask(artifacts: Artifacts, query: Query, item_ids: list[int]) -> Ask:
    rows, unknown = item_rows(artifacts, item_ids)
    if unknown:
        raise RequestError(404, f"unknown item ids: {unknown[:20]}", unknown_item_ids=unknown)
    mask, count = derived(artifacts).withdrawn_mask(artifacts.withdrawn)
    gone = mask[rows] if count else np.zeros(len(rows), dtype=bool)
    withdrawn = artifacts.item_ids[rows[gone]].tolist()
    return Ask(query, candidates=rows[~gone], withdrawn_ids=withdrawn)


def shares_work(artifacts: Artifacts, ask: Ask) -> bool:
    """Whether answering the request with others saves work: the history encoder's forward, an index search or
    the ranker's forward. /rank with a known query and no ranker has none to share (batching would only delay)."""
    if ask.query.vector is None:
        return True
    if ask.query.strategy == "popularity":
        return False
    return ask.candidates is None or artifacts.parts["ranker"] is not None


def answer_many(artifacts: Artifacts, asks: list[Ask]) -> list[dict]:
    """The answers to checked requests, in order: the history encoder, the index and the ranker run once for
    all of them (one search per first fetch size); filters, exclusions, reasons per request."""
    encode_queries(artifacts, [ask.query for ask in asks])
    cache = derived(artifacts)
    n = len(artifacts.item_ids)
    withdrawn, count = cache.withdrawn_mask(artifacts.withdrawn)
    searching = []
    for ask in asks:  # items added or withdrawn since the request was checked count as they do now
        if ask.allowed is not None and len(ask.allowed) != cache.n:
            ask.allowed = allowed_rows(artifacts, ask.filters)
        if ask.candidates is not None and count and withdrawn[ask.candidates].any():
            gone = withdrawn[ask.candidates]
            ask.withdrawn_ids = ask.withdrawn_ids + artifacts.item_ids[ask.candidates[gone]].tolist()
            ask.candidates = ask.candidates[~gone]
        if ask.candidates is not None or ask.query.strategy == "popularity":
            continue
        ask.excluded = Excluded.of(artifacts, ask.query.history_rows if ask.exclude_seen else ())
        live = ask.live
        ask.blends = live is not None and live.settings.blends and live.events > 0
        ask.want = max(ask.k, int(artifacts.parts["rerank_top"]), BLEND_POOL if ask.blends else 0)
        ask.fetch = _first_fetch(artifacts.index.ntotal, ask.want, len(ask.excluded))
        searching.append(ask)
    for fetch in sorted({ask.fetch for ask in searching}):
        group = [ask for ask in searching if ask.fetch == fetch]
        scores, ids = _search(artifacts, np.stack([ask.query.vector for ask in group]), fetch)
        for position, ask in enumerate(group):
            ask.found = (scores[position:position + 1], ids[position:position + 1])
    work = []
    for ask in asks:
        if ask.candidates is not None:  # /rank: the given candidates, scored in one product
            ask.rows = ask.candidates
            if ask.query.strategy == "popularity":  # ordered by the exported counts, not re-ranked
                ask.retrieval = cache.popularity[ask.rows]
                continue
            ask.retrieval = (artifacts.item_vectors[ask.rows] @ ask.query.vector).astype(np.float32)
        elif ask.query.strategy == "popularity":
            continue
        else:
            ask.rows, ask.retrieval = _retrieve(artifacts, ask.query, ask.want, ask.allowed, ask.excluded, ask.found)
            if ask.blends:  # the items picked up most now join the model's candidates
                extra = _trending(ask.live, n, ask.time, ask.live.settings.candidates, ask.allowed, ask.excluded)
                ask.rows = np.concatenate([ask.rows, extra[~np.isin(extra, ask.rows)]])
                ask.retrieval = (artifacts.item_vectors[ask.rows] @ ask.query.vector).astype(np.float32)
        work.append(ask)
    reranked = dict(zip(map(id, work), rerank_many(artifacts, [(a.query, a.rows, a.retrieval) for a in work])))
    answers = []
    for ask in asks:
        if ask.candidates is not None:
            answers.append(_finish_rank(artifacts, ask, reranked.get(id(ask), ask.retrieval)))
        elif ask.query.strategy == "popularity":
            answers.append(_popular(artifacts, ask))
        else:
            answers.append(_finish_recommend(artifacts, ask, reranked[id(ask)]))
    return answers


def _finish_rank(artifacts: Artifacts, ask: Ask, scores: np.ndarray) -> dict:
    order = np.argsort(-scores, kind="stable")
    answer = _answer(artifacts, ask.query, ask.rows[order], scores[order], ask.retrieval[order])
    if ask.withdrawn_ids:  # the shop's candidate list may lag behind its withdrawals: answered without them
        answer["withdrawn_item_ids"] = ask.withdrawn_ids
    return answer


def _finish_recommend(artifacts: Artifacts, ask: Ask, scores: np.ndarray) -> dict:
    live, rows = ask.live, ask.rows
    if ask.blends:
        scores = _blended(live, derived(artifacts).cold, rows, scores, ask.time)
    order = np.argsort(-scores, kind="stable")[:ask.k]
    answer = _answer(artifacts, ask.query, rows[order], scores[order], ask.retrieval[order])
    if live is not None and live.events:
        _say_picked_up(artifacts, live, rows[order], answer["items"])
    return answer


def _popular(artifacts: Artifacts, ask: Ask) -> dict:
    """The popularity fallback: exported popularity, + what is picked up now when there are live events."""
    cache, live, k, allowed = derived(artifacts), ask.live, ask.k, ask.allowed
    withdrawn, count = cache.withdrawn_mask(artifacts.withdrawn)
    n = len(artifacts.item_ids)
    popularity = cache.log_popularity
    picked, boost = np.empty(0, dtype=np.int64), np.empty(0)
    if live is not None and live.events:  # trending: what is picked up now, over what was popular before
        picked = _picked_rows(live, n)  # the only rows whose score moves
        boost = (1 + live.settings.trending_weight) * np.log1p(_live_counts(live, picked, ask.time))
        keep = ~withdrawn[picked] if count else np.ones(len(picked), dtype=bool)
        if allowed is not None:
            keep &= allowed[picked]
        picked, boost = picked[keep], boost[keep]
    # the items passing the filters by exported popularity (ordered once per filter), walked until k are left
    ranked = cache.popularity_order if allowed is None else cache.passing(allowed, by_popularity=True)
    taken, start, chunk = [], 0, max(4 * k, 256)
    while start < len(ranked) and sum(map(len, taken)) < k:
        part = ranked[start:start + chunk]
        keep = ~withdrawn[part] if count else np.ones(len(part), dtype=bool)
        if len(picked):
            keep &= ~_among(part, picked)
        taken.append(part[keep][:k])
        start, chunk = start + chunk, chunk * 4
    order = np.concatenate(taken)[:k] if taken else np.empty(0, dtype=np.int64)
    if len(picked):  # the picked-up rows with their boost, and the best of the others: by score, ties by row
        rows = np.concatenate([order, picked])
        scores = np.concatenate([popularity[order], popularity[picked] + boost])
        best = np.lexsort((rows, -scores))[:k]
        order, shown = rows[best], scores[best]
    else:
        shown = popularity[order]
    answer = _answer(artifacts, ask.query, order, shown, shown)
    if live is not None and live.events:
        _say_picked_up(artifacts, live, order, answer["items"])
    return answer


# ---- the live signals, for the rows they concern only (live.py's functions read every row) ------------------
def _picked_rows(live: LiveState, n: int) -> np.ndarray:
    """The rows that have had live events (ascending): the only ones with a count."""
    with live.lock:
        rows = np.fromiter(live.pickers, dtype=np.int64, count=len(live.pickers))
    rows.sort()
    return rows[rows < n]


def _live_counts(live: LiveState, rows: np.ndarray, time: float) -> np.ndarray:
    """The rows' decayed counts at `time`, as live.decayed_counts(n, time)[rows] gives them."""
    out = np.zeros(len(rows))
    with live.lock:
        inside = rows < len(live.counts)
        known = rows[inside]
        age = np.maximum(time - live.last[known], 0.0)  # a query before the last event does not grow it
        out[inside] = live.counts[known] * np.exp2(-age / (3600.0 * live.settings.half_life_hours))
    return out


def _among(rows: np.ndarray, sorted_rows: np.ndarray) -> np.ndarray:
    where = np.minimum(np.searchsorted(sorted_rows, rows), len(sorted_rows) - 1)
    return sorted_rows[where] == rows


def _trending(live: LiveState, n: int, time: float, want: int, allowed: np.ndarray | None,
              excluded: Excluded) -> np.ndarray:
    """The `want` rows picked up most at `time` (decayed counts > 0) that pass the filters, most first (ties by
    row): live.trending_rows over the rows with events only."""
    rows = _picked_rows(live, n)
    counts = _live_counts(live, rows, time)
    keep = (counts > 0) & ~excluded.hit(rows)
    if allowed is not None:
        keep &= allowed[rows]
    rows, counts = rows[keep], counts[keep]
    return rows[np.argsort(-counts, kind="stable")[:want]]


def _blended(live: LiveState, cold: np.ndarray, rows: np.ndarray, scores: np.ndarray, time: float) -> np.ndarray:
    """live.blended: the model's scores standardised over the candidates, + trending_weight x log(1 + decayed
    count), + new_arrival_weight x the same for items the model never trained on."""
    spread = scores.std()
    standard = (scores - scores.mean()) / (spread if spread > 0 else 1.0)
    settings = live.settings
    signal = np.log1p(_live_counts(live, rows, time))
    return standard + signal * (settings.trending_weight + settings.new_arrival_weight * cold[rows])


def _say_picked_up(artifacts: Artifacts, live: LiveState, rows: np.ndarray, items: list[dict]) -> None:
    """A new arrival (never trained on) that shoppers are picking up says so in its reason."""
    cold = derived(artifacts).cold
    for row, item in zip(rows.tolist(), items):
        shoppers = live.picked_by(row) if cold[row] else 0
        if shoppers:
            item["reason"] = {**item["reason"], "kind": "new_arrival",
                              "text": f"new, and picked up by {shoppers} shopper{'s' if shoppers > 1 else ''} "
                                      f"recently; {item['reason']['text']}"}


def recommend(artifacts: Artifacts, query: Query, k: int, filters: dict | None, exclude_seen: bool,
              live: LiveState | None = None, time: float = 0.0) -> dict:
    """The top k; with `live`, its online counts at `time` lift trending items and new arrivals being picked up
    (live.py), and feed the popularity fallback."""
    return answer_many(artifacts, [recommend_ask(artifacts, query, k, filters, exclude_seen, live, time)])[0]


def rank(artifacts: Artifacts, query: Query, item_ids: list[int]) -> dict:
    return answer_many(artifacts, [rank_ask(artifacts, query, item_ids)])[0]


def similar(artifacts: Artifacts, row: int, k: int) -> dict:
    """The k items nearest to the item at `row` (a row the caller found: service.similar)."""
    row = int(row)
    rows = np.array([row], dtype=np.int64)
    vector = np.zeros(artifacts.dim, dtype=np.float32)  # the bias column (if any) stays 0: pure cosine
    vector[: artifacts.item_dim] = artifacts.tower_vectors(rows)[0]
    query = Query(vector, rows, "history")
    excluded = Excluded.of(artifacts, rows)
    if artifacts.score == "cosine":  # unit vectors: the inner-product index ranks by cosine
        found, scores = _retrieve(artifacts, query, k, None, excluded)
    else:
        found, scores = _exact_cosine(artifacts, row, k, excluded)
    return _answer(artifacts, query, found, scores, scores)


def _exact_cosine(artifacts: Artifacts, row: int, k: int, excluded: Excluded) -> tuple[np.ndarray, np.ndarray]:
    """The k items nearest to `row` by cosine, scored exactly (O(N d): ~30 ms for 1M items of 64 d). With dot
    scores the index would rank long vectors (popular items) first, which is not what "similar" means."""
    vectors = artifacts.item_vectors[:, : artifacts.item_dim]  # a view: the matrix is not copied
    cosines = (vectors @ _unit(vectors[row])) / (derived(artifacts).tower_norms + 1e-8)
    cosines[excluded.hit(np.arange(len(cosines)))] = -np.inf
    k = min(k, int(np.isfinite(cosines).sum()))
    top = np.argpartition(-cosines, k - 1)[:k] if k else np.empty(0, dtype=np.int64)
    top = top[np.argsort(-cosines[top], kind="stable")]
    return top, cosines[top].astype(np.float32)
