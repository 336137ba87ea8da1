"""Answers requests from loaded artifacts: build the query, retrieve with FAISS, re-rank, explain.

Errors a client can fix raise `RequestError` with an HTTP status; the app turns them into 4xx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from multimodal_rec.data.features import standardised_rank
from multimodal_rec.models.components.scoring import retrieval_vectors
from multimodal_rec.serving.artifacts import Artifacts
from multimodal_rec.serving.catalog_api import attributes_of
from multimodal_rec.serving.errors import RequestError
from multimodal_rec.serving.filters import filter_mask
from multimodal_rec.serving.live import LiveState, blended, trending_rows

MAX_FETCH = 4096  # FAISS candidates fetched before falling back to scoring the filtered catalogue exactly
BLEND_POOL = 100  # candidates the online signals re-order (the model's best, + the items picked up most now)


@dataclass
class Query:
    vector: np.ndarray  # (dim,) float32: the query as exported (unit for cosine; + a 1 for the bias column)
    history_rows: np.ndarray  # rows of the whole history, stored + sent (for exclusion and reasons)
    strategy: str  # "history" | "profile" | "popularity"


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


@torch.no_grad()
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


@torch.no_grad()
def build_query(artifacts: Artifacts, user_id: int | None, history: list[int] | None, profile: dict | None,
                hour: int | None) -> Query:
    parts = artifacts.parts
    session_rows, unknown = artifacts.rows(history or [])
    if unknown:
        raise RequestError(404, f"unknown item ids in history: {unknown[:20]}", unknown_item_ids=unknown)
    base_profile, stored_rows = None, np.empty(0, dtype=np.int64)
    if user_id is not None:
        if user_id not in artifacts.user_row:
            raise RequestError(404, f"unknown user id {user_id}", unknown_user_id=user_id)
        row = artifacts.user_row[user_id]
        stored_rows, _ = artifacts.rows(artifacts.user_history(user_id))
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
    vectors = torch.from_numpy(artifacts.tower_vectors(rows)).unsqueeze(0)  # (1, L, d)
    if not len(rows):
        vectors = torch.zeros(1, 1, artifacts.item_dim)
    mask = torch.ones(vectors.shape[:2], dtype=torch.bool) if len(rows) else torch.zeros(1, 1, dtype=torch.bool)
    hours = torch.tensor([hour if hour is not None else 12])
    query = parts["history_encoder"](vectors, mask, codes, hours)[:, -1]
    vector = retrieval_vectors(query, artifacts.score)[0].numpy().astype(np.float32)
    if artifacts.dim > artifacts.item_dim:  # item biases: q . [v, t * b] = cos + t * b
        vector = np.append(vector, np.float32(1.0))
    return Query(vector, seen, "history" if len(rows) else "profile")


def _retrieve(artifacts: Artifacts, query: Query, want: int, allowed: np.ndarray | None,
              excluded: set) -> tuple[np.ndarray, np.ndarray]:
    """(rows, retrieval scores) of the best `want` items passing the filters, best first.

    Asks the index for more candidates until enough pass; an approximate index may never reach some
    items (an HNSW graph from one query), so past MAX_FETCH (or the whole catalogue) the items that pass
    are scored exactly."""
    ntotal = artifacts.index.ntotal
    fetch = min(max(2 * want + len(excluded), 64), ntotal)
    while True:
        with artifacts.lock:
            scores, ids = artifacts.index.search(query.vector[None, :], fetch)
        found = ids[0] >= 0
        rows, _ = artifacts.rows(ids[0][found])
        scores = scores[0][found]
        keep = np.array([r not in excluded and (allowed is None or allowed[r]) for r in rows], dtype=bool)
        if keep.sum() >= want:
            return rows[keep][:want], scores[keep][:want]
        if fetch >= min(MAX_FETCH, ntotal):
            return _exact(artifacts, query, want, allowed, excluded)
        fetch = min(fetch * 4, ntotal)


def _exact(artifacts: Artifacts, query: Query, want: int, allowed: np.ndarray | None,
           excluded: set) -> tuple[np.ndarray, np.ndarray]:
    candidates = np.flatnonzero(allowed) if allowed is not None else np.arange(len(artifacts.item_vectors))
    if excluded:
        candidates = candidates[~np.isin(candidates, np.fromiter(excluded, dtype=np.int64))]
    exact = artifacts.item_vectors[candidates] @ query.vector
    order = np.argsort(-exact, kind="stable")[:want]
    return candidates[order], exact[order]


@torch.no_grad()
def rerank(artifacts: Artifacts, query: Query, rows: np.ndarray, retrieval: np.ndarray) -> np.ndarray:
    """The ranking network's scores for (query, candidates); retrieval scores when there is no ranker."""
    ranker = artifacts.parts["ranker"]
    if ranker is None or not len(rows):
        return retrieval
    items = torch.from_numpy(artifacts.tower_vectors(rows)).unsqueeze(0)  # (1, C, d)
    query_vector = torch.from_numpy(query.vector[: artifacts.item_dim])[None]
    scores = ranker(query_vector, items, torch.from_numpy(retrieval)[None].float())
    return scores[0].numpy()


def reasons(artifacts: Artifacts, query: Query, rows: np.ndarray) -> list[dict]:
    """Why each item: the history item it is most similar to, and the modality on which they agree most."""
    if query.strategy != "history":
        kind = {"profile": "matches the profile given", "popularity": "popular in the catalogue"}[query.strategy]
        return [{"kind": query.strategy, "text": kind} for _ in rows]
    history = np.unique(query.history_rows)
    similarity = _unit(artifacts.tower_vectors(rows)) @ _unit(artifacts.tower_vectors(history)).T  # (C, H) cosine
    anchors = history[similarity.argmax(1)]  # (C,)
    names, cosines = artifacts.parts.get("part_names", artifacts.parts["modalities"]), None
    if artifacts.modality_parts is not None:
        a = artifacts.modality_parts[anchors].astype(np.float32)  # (C, M, d)
        b = artifacts.modality_parts[rows].astype(np.float32)
        cosines = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-8)  # (C, M)
        informative = _informative_parts(artifacts.catalog, names, anchors, rows)
        cosines = np.where(informative, cosines, np.nan)
    out = []
    best = similarity.max(1).astype(np.float64).round(4).tolist()  # float64 first: no 0.66850000619 in JSON
    for position, anchor in enumerate(anchors.tolist()):
        title = str(artifacts.titles[anchor])
        reason = {"kind": "history", "because_of": int(artifacts.item_ids[anchor]), "because_of_title": title,
                  "similarity": best[position], "modality": None, "text": f"similar to {title!r}"}
        if cosines is not None:
            agree = {n: round(float(c), 4) for n, c in zip(names, cosines[position]) if not np.isnan(c)}
            reason["modality_similarity"] = agree
            if agree:
                reason["modality"] = max(agree, key=agree.get)
                reason["text"] += f" (mostly by {reason['modality']})"
        out.append(reason)
    return out


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / (np.linalg.norm(vectors, axis=-1, keepdims=True) + 1e-8)


def _informative_parts(catalog: pd.DataFrame, names: list[str], anchors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(C, M) whether fusion part m of both anchor c and item c says something of its own: an item without
    training interactions has the shared unknown-ID vector, one without an image or text the shared missing
    vector, so two such items "agree" on that part (cosine 1) without being alike."""
    own = {"id": catalog["popularity"].to_numpy() > 0, "image": catalog["has_image"].to_numpy(bool),
           "text": catalog["has_text"].to_numpy(bool)}
    both = {name: flags[anchors] & flags[rows] for name, flags in own.items()}
    return np.stack([both.get(name, np.ones(len(rows), dtype=bool)) for name in names], axis=1)


def recommend(artifacts: Artifacts, query: Query, k: int, filters: dict | None, exclude_seen: bool,
              live: LiveState | None = None, time: float = 0.0) -> dict:
    """The top k; with `live`, its online counts at `time` lift trending items and new arrivals being picked up
    (live.py), and feed the popularity fallback."""
    allowed = filter_mask(artifacts.catalog, filters) if filters else None
    excluded = (set(query.history_rows.tolist()) if exclude_seen else set()) | artifacts.withdrawn
    n = len(artifacts.item_ids)
    if query.strategy == "popularity":
        popularity = np.log1p(artifacts.catalog["popularity"].to_numpy(np.float64))
        if live is not None and live.events:  # trending: what is picked up now, over what was popular before
            popularity = popularity + (1 + live.settings.trending_weight) * np.log1p(live.decayed_counts(n, time))
        candidates = np.flatnonzero(allowed) if allowed is not None else np.arange(len(popularity))
        candidates = candidates[~np.isin(candidates, list(artifacts.withdrawn))]
        order = candidates[np.argsort(-popularity[candidates], kind="stable")][:k]
        return _answer(artifacts, query, order, popularity[order], popularity[order])
    blends = live is not None and live.settings.blends and live.events > 0
    want = max(k, int(artifacts.parts["rerank_top"]), BLEND_POOL if blends else 0)
    rows, retrieval = _retrieve(artifacts, query, want, allowed, excluded)
    if blends:  # the items picked up most now join the model's candidates
        extra = trending_rows(live, n, time, live.settings.candidates, allowed, excluded)
        rows = np.concatenate([rows, extra[~np.isin(extra, rows)]])
        retrieval = (artifacts.item_vectors[rows] @ query.vector).astype(np.float32)
    scores = rerank(artifacts, query, rows, retrieval)
    if blends:
        scores = blended(live, artifacts.catalog["cold"].to_numpy(bool), rows, scores, time)
    order = np.argsort(-scores, kind="stable")[:k]
    answer = _answer(artifacts, query, rows[order], scores[order], retrieval[order])
    if live is not None and live.events:
        _say_picked_up(artifacts, live, rows[order], answer["items"])
    return answer


def _say_picked_up(artifacts: Artifacts, live: LiveState, rows: np.ndarray, items: list[dict]) -> None:
    """A new arrival (never trained on) that shoppers are picking up says so in its reason."""
    cold = artifacts.catalog["cold"].to_numpy(bool)
    for row, item in zip(rows.tolist(), items):
        shoppers = live.picked_by(row) if cold[row] else 0
        if shoppers:
            item["reason"] = {**item["reason"], "kind": "new_arrival",
                              "text": f"new, and picked up by {shoppers} shopper{'s' if shoppers > 1 else ''} "
                                      f"recently; {item['reason']['text']}"}


def rank(artifacts: Artifacts, query: Query, item_ids: list[int]) -> dict:
    rows, unknown = artifacts.rows(item_ids)
    if unknown:
        raise RequestError(404, f"unknown item ids: {unknown[:20]}", unknown_item_ids=unknown)
    gone = np.isin(rows, list(artifacts.withdrawn))
    withdrawn, rows = [int(artifacts.item_ids[r]) for r in rows[gone]], rows[~gone]
    if query.strategy == "popularity":
        retrieval = artifacts.catalog["popularity"].to_numpy(np.float32)[rows]
        scores = retrieval
    else:
        retrieval = (artifacts.item_vectors[rows] @ query.vector).astype(np.float32)
        scores = rerank(artifacts, query, rows, retrieval)
    order = np.argsort(-scores, kind="stable")
    answer = _answer(artifacts, query, rows[order], scores[order], retrieval[order])
    if withdrawn:  # the shop's candidate list may lag behind its withdrawals: answered without them
        answer["withdrawn_item_ids"] = withdrawn
    return answer


def similar(artifacts: Artifacts, row: int, k: int) -> dict:
    """The k items nearest to the item at `row` (a row the caller found: service.similar)."""
    row = int(row)
    rows = np.array([row], dtype=np.int64)
    vector = np.zeros(artifacts.dim, dtype=np.float32)  # the bias column (if any) stays 0: pure cosine
    vector[: artifacts.item_dim] = artifacts.tower_vectors(rows)[0]
    query = Query(vector, rows, "history")
    excluded = {row} | artifacts.withdrawn
    if artifacts.score == "cosine":  # unit vectors: the inner-product index ranks by cosine
        found, scores = _retrieve(artifacts, query, k, None, excluded)
    else:
        found, scores = _exact_cosine(artifacts, row, k, excluded)
    return _answer(artifacts, query, found, scores, scores)


def _exact_cosine(artifacts: Artifacts, row: int, k: int, excluded: set) -> tuple[np.ndarray, np.ndarray]:
    """The k items nearest to `row` by cosine, scored exactly (O(N d): ~30 ms for 1M items of 64 d). With dot
    scores the index would rank long vectors (popular items) first, which is not what "similar" means."""
    vectors = artifacts.tower_vectors(np.arange(len(artifacts.item_ids)))
    cosines = _unit(vectors) @ _unit(vectors[row])
    if excluded:
        cosines[np.fromiter(excluded, dtype=np.int64)] = -np.inf
    k = min(k, int(np.isfinite(cosines).sum()))
    top = np.argpartition(-cosines, k - 1)[:k] if k else np.empty(0, dtype=np.int64)
    top = top[np.argsort(-cosines[top], kind="stable")]
    return top, cosines[top].astype(np.float32)


def _answer(artifacts: Artifacts, query: Query, rows: np.ndarray, scores: np.ndarray, retrieval: np.ndarray) -> dict:
    explained, attributes = reasons(artifacts, query, rows), attributes_of(artifacts, rows)
    items = [{"item_id": int(artifacts.item_ids[r]), "title": str(artifacts.titles[r]),
              "score": float(s), "retrieval_score": float(q), "reason": why, "attributes": attrs}
             for r, s, q, why, attrs in zip(rows, scores, retrieval, explained, attributes)]
    return {"strategy": query.strategy, "cold_start": query.strategy != "history", "items": items}
