"""Answers requests from loaded artifacts: build the query, retrieve with FAISS, re-rank, explain.

Errors a client can fix raise `RequestError` with an HTTP status; the app turns them into 4xx.

A request is answered in three steps, so that requests arriving together share the costly middle (batching.py):
`prepare_query` (query.py) and `recommend_ask` / `rank_ask` check it and gather its inputs (a 4xx there concerns that
request alone); `answer_many` runs one forward of the history encoder for all of them, one index search per
fetch size and one forward of the ranking network; then each answer is finished on its own (its filters,
exclude_seen, reasons and attributes: explain.py). `recommend` and `rank` are the same steps for one request.

Nothing done per request is O(catalogue) beyond the index search: the catalogue's columns as arrays, its
flags, the popularity order, the withdrawn mask and recent filter masks are derived once per version of the
catalogue (derived.py: rebuilt when items are added or the artifacts reloaded, the withdrawn mask when the
withdrawn set is replaced) and reused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from multimodal_rec.models.components.ranker import Ranker
from multimodal_rec.serving.artifacts import Artifacts
from multimodal_rec.serving.derived import Excluded, allowed_rows, derived, item_rows
from multimodal_rec.serving.errors import RequestError
from multimodal_rec.serving.explain import _unit, attributes, reasons
from multimodal_rec.serving.live import LiveState, among, blended, say_picked_up, trending_rows
from multimodal_rec.serving.query import Query, encode_queries

MAX_FETCH = 4096  # FAISS candidates fetched before falling back to scoring the filtered catalogue exactly
MIN_FETCH = 64  # the first search asks for at least this many (rounded up to a power of two: see _first_fetch)
BLEND_POOL = 100  # candidates the online signals re-order (the model's best, + the items picked up most now)


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
                extra = trending_rows(ask.live, n, ask.time, ask.live.settings.candidates, ask.allowed, ask.excluded)
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
        scores = blended(live, derived(artifacts).cold, rows, scores, ask.time)
    order = np.argsort(-scores, kind="stable")[:ask.k]
    answer = _answer(artifacts, ask.query, rows[order], scores[order], ask.retrieval[order])
    if live is not None and live.events:
        say_picked_up(live, derived(artifacts).cold, rows[order], answer["items"])
    return answer


def _popular(artifacts: Artifacts, ask: Ask) -> dict:
    """The popularity fallback: exported popularity, + what is picked up now when there are live events."""
    cache, live, k, allowed = derived(artifacts), ask.live, ask.k, ask.allowed
    withdrawn, count = cache.withdrawn_mask(artifacts.withdrawn)
    n = len(artifacts.item_ids)
    popularity = cache.log_popularity
    picked, boost = np.empty(0, dtype=np.int64), np.empty(0)
    if live is not None and live.events:  # trending: what is picked up now, over what was popular before
        picked = live.picked_rows(n)  # the only rows whose score moves
        boost = (1 + live.settings.trending_weight) * np.log1p(live.counts_at(picked, ask.time))
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
            keep &= ~among(part, picked)
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
        say_picked_up(live, derived(artifacts).cold, order, answer["items"])
    return answer


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
