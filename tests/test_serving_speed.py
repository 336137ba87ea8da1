"""The fast read path keeps the answers: requests answered together (batching.py) get exactly what they get
alone, and a request's filters and exclusions stay its own (what a request costs: test_read_path_cost.py)."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading

import httpx
import numpy as np
import pytest

from multimodal_rec.serving import derived as derived_py
from multimodal_rec.serving import engine
from multimodal_rec.serving import explain as explain_py
from multimodal_rec.serving import live as live_py
from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.batching import _ARRIVAL, QueryBatcher
from multimodal_rec.serving.service import RecommenderService
from tests.conftest import serving_in_thread

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def service(tiny_artifacts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("speed") / "artifacts"
    shutil.copytree(tiny_artifacts, folder)
    return RecommenderService(folder)


def _same(batched: dict, alone: dict) -> None:
    """The same items in the same order with the same scores (within float noise), reasons and attributes."""
    assert batched.keys() == alone.keys()
    assert [i["item_id"] for i in batched["items"]] == [i["item_id"] for i in alone["items"]]
    for got, want in zip(batched["items"], alone["items"]):
        assert got["score"] == pytest.approx(want["score"], abs=TOLERANCE)
        assert got["retrieval_score"] == pytest.approx(want["retrieval_score"], abs=TOLERANCE)
        assert got["attributes"] == want["attributes"]
        assert got["reason"].get("because_of") == want["reason"].get("because_of")
        assert got["reason"]["kind"] == want["reason"]["kind"]
    assert batched.get("withdrawn_item_ids") == alone.get("withdrawn_item_ids")


def _requests(service: RecommenderService, seed: int = 0) -> list[tuple[str, tuple]]:
    """Every kind of read: stored users, sessions, both, hours, profiles, filters, exclude_seen on and off,
    ranking candidates."""
    artifacts, rng = service.artifacts, random.Random(seed)
    users = [int(u) for u in artifacts.user_ids]
    items = [int(i) for i in artifacts.item_ids]
    categories = sorted(artifacts.catalog["category"].astype(str).unique())
    out = []
    for user in rng.sample(users, 12):
        session = rng.sample(items, rng.randint(1, 8))
        out += [
            ("recommend", (user, None, None, None, 10, None, True)),
            ("recommend", (None, session, None, None, 5, None, True)),
            ("recommend", (user, session[:2], None, 7, 12, {"category": rng.choice(categories)}, False)),
            ("recommend", (None, session, None, 20, 10, {"cold": True}, True)),
            ("recommend", (None, None, {"gender": "f"}, None, 4, None, True)),  # no history: popularity
            ("rank", (user, None, None, None, rng.sample(items, 30))),
            ("rank", (None, session, None, 3, rng.sample(items, 15))),
        ]
    rng.shuffle(out)
    return out


def _ask(service: RecommenderService, kind: str, args: tuple):
    return service.recommend_ask(*args) if kind == "recommend" else service.rank_ask(*args)


def _alone(service: RecommenderService, kind: str, args: tuple) -> dict:
    return service.recommend(*args) if kind == "recommend" else service.rank(*args)


def test_batched_answers_equal_one_at_a_time_answers(service):
    requests = _requests(service)
    alone = [_alone(service, kind, args) for kind, args in requests]
    for size in (2, 7, len(requests)):
        for start in range(0, len(requests), size):
            part = requests[start:start + size]
            batched = service.answer([_ask(service, kind, args) for kind, args in part])
            for got, want in zip(batched, alone[start:start + size]):
                _same(got, want)


def test_a_requests_filters_and_exclusions_do_not_leak_into_its_batch(service):
    artifacts = service.artifacts
    category = artifacts.catalog.set_index("item_id")["category"].astype(str)
    found = 0
    for user in (int(u) for u in artifacts.user_ids):
        seen = {int(i) for i in artifacts.user_history(user)}
        free = service.recommend(user, None, None, None, 10, None, False)  # seen items allowed, no filter
        ids = [i["item_id"] for i in free["items"]]
        if not seen & set(ids) or len({category[i] for i in ids}) < 2:
            continue
        wanted = category[ids[-1]]  # a category some, not all, of the free answer's items are in
        strict = (user, None, None, None, 10, {"category": wanted}, True)
        loose = (user, None, None, None, 10, None, False)
        batch = service.answer([service.recommend_ask(*strict), service.recommend_ask(*loose),
                                service.recommend_ask(*strict)])
        strict_ids = [i["item_id"] for i in batch[0]["items"]]
        assert strict_ids and all(category[i] == wanted for i in strict_ids)
        assert not seen & set(strict_ids)
        _same(batch[0], service.recommend(*strict))
        _same(batch[2], service.recommend(*strict))
        _same(batch[1], free)  # its seen items and other categories are still there
        assert seen & {i["item_id"] for i in batch[1]["items"]}
        assert any(category[i["item_id"]] != wanted for i in batch[1]["items"])
        found += 1
        if found == 5:
            break
    assert found, "no user whose free answer holds a seen item and several categories"


def test_every_users_top_10_is_the_same_with_batching_on_and_off(service):
    artifacts = service.artifacts
    users = [int(u) for u in artifacts.user_ids if int(u) in artifacts.user_row]
    alone = {user: service.recommend(user, None, None, None, 10, None, True) for user in users}
    for start in range(0, len(users), 16):
        part = users[start:start + 16]
        batched = service.answer([service.recommend_ask(u, None, None, None, 10, None, True) for u in part])
        for user, got in zip(part, batched):
            _same(got, alone[user])


def test_withdrawn_items_leave_batched_answers_at_once(tiny_artifacts, tmp_path):
    folder = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, folder)
    service = RecommenderService(folder)
    user = int(service.artifacts.user_ids[0])
    top = [i["item_id"] for i in service.recommend(user, None, None, None, 10, None, True)["items"]]
    service.withdraw_item(top[0])
    again = service.answer([service.recommend_ask(user, None, None, None, 10, None, True),
                            service.rank_ask(user, None, None, None, top)])
    assert top[0] not in [i["item_id"] for i in again[0]["items"]]
    assert again[1]["withdrawn_item_ids"] == [top[0]]
    assert top[0] not in [i["item_id"] for i in again[1]["items"]]
    # withdrawn while a request waits in a batch: left out all the same
    waiting = [service.recommend_ask(user, None, None, None, 10, None, True),
               service.rank_ask(user, None, None, None, top)]
    service.withdraw_item(top[1])
    late = service.answer(waiting)
    assert not {top[0], top[1]} & {i["item_id"] for i in late[0]["items"]}
    assert late[1]["withdrawn_item_ids"] == [top[0], top[1]]
    assert not {top[0], top[1]} & {i["item_id"] for i in late[1]["items"]}


def test_attributes_are_those_the_catalogue_gives_also_when_the_kept_ones_are_dropped(service, monkeypatch):
    from multimodal_rec.serving.catalog_api import attributes_of

    artifacts = service.artifacts
    rows = np.arange(len(artifacts.item_ids))
    assert engine.attributes(artifacts, rows) == attributes_of(artifacts, rows)  # every item, as before
    monkeypatch.setattr(explain_py, "RECORDS", 8)  # few kept: a request's rows outgrow them
    for start in range(0, 40, 3):
        part = rows[start:start + 6]
        assert engine.attributes(artifacts, part) == attributes_of(artifacts, part)


def test_the_live_signals_read_only_the_rows_with_events_and_give_what_every_row_gives(tiny_artifacts):
    from multimodal_rec.serving.live import LiveSettings, LiveState

    service = RecommenderService(tiny_artifacts)
    artifacts, rng = service.artifacts, np.random.default_rng(0)
    n, cold = len(artifacts.item_ids), artifacts.catalog["cold"].to_numpy(bool)
    state = LiveState(LiveSettings(trending_weight=0.1, new_arrival_weight=1.5))
    for event in range(300):
        row = int(rng.integers(n))
        state.record(f"u{rng.integers(20)}", int(artifacts.item_ids[row]), row, float(rng.integers(1, 4)),
                     1000.0 + 60 * event)
    service.live, now = state, 1000.0 + 60 * 300 + 3600
    service.withdraw_item(int(artifacts.item_ids[int(np.argmax(state.decayed_counts(n, now)))]))
    category = str(artifacts.catalog["category"].iat[7])
    for filters in (None, {"category": category}):
        allowed = derived_py.allowed_rows(artifacts, filters)
        seen = rng.choice(n, 15, replace=False)
        excluded = derived_py.Excluded.of(artifacts, seen)
        want = _trending_over_every_row(state, n, now, 20, allowed, set(seen.tolist()) | artifacts.withdrawn)
        assert live_py.trending_rows(state, n, now, 20, allowed, excluded).tolist() == want.tolist()
        # the popularity fallback: exported popularity + (1 + w) log(1 + count), as computed over every row
        popularity = np.log1p(artifacts.catalog["popularity"].to_numpy(np.float64))
        popularity = popularity + 1.1 * np.log1p(state.decayed_counts(n, now))
        candidates = np.flatnonzero(allowed) if allowed is not None else np.arange(n)
        candidates = candidates[~np.isin(candidates, list(artifacts.withdrawn))]
        order = candidates[np.argsort(-popularity[candidates], kind="stable")][:10]
        answer = service.recommend(None, None, None, None, 10, filters, True, at=now)
        assert answer["strategy"] == "popularity"
        assert [i["item_id"] for i in answer["items"]] == artifacts.item_ids[order].tolist()
        assert [i["score"] for i in answer["items"]] == popularity[order].tolist()
    rows, scores = rng.choice(n, 50, replace=False), rng.normal(size=50)
    np.testing.assert_array_equal(live_py.blended(state, cold, rows, scores, now),
                                  _blended_over_every_row(state, cold, rows, scores, now))


def _trending_over_every_row(live, n: int, time: float, want: int, allowed, excluded: set) -> np.ndarray:
    """The definition, over every row: what the per-request version must give."""
    counts = live.decayed_counts(n, time)
    if allowed is not None:
        counts = np.where(allowed, counts, 0.0)
    if excluded:
        counts[np.fromiter(excluded, dtype=np.int64)] = 0.0
    top = np.argsort(-counts, kind="stable")[:want]
    return top[counts[top] > 0]


def _blended_over_every_row(live, cold, rows, scores, time: float) -> np.ndarray:
    spread = scores.std()
    standard = (scores - scores.mean()) / (spread if spread > 0 else 1.0)
    signal = np.log1p(live.decayed_counts(int(rows.max(initial=-1)) + 1, time)[rows])
    settings = live.settings
    return standard + signal * (settings.trending_weight + settings.new_arrival_weight * cold[rows])


# ---- the batcher --------------------------------------------------------------------------------------------
def test_the_batcher_answers_requests_arriving_together_at_once_and_keeps_failures_apart():
    sizes = []

    def answer(batch):
        sizes.append(len(batch))
        return [ValueError(f"bad {r}") if r == 3 else r * 10 for r in batch]

    async def main():
        batcher = QueryBatcher(answer, wait_ms=20, max_batch=4)
        results = await asyncio.gather(*(batcher.submit(r) for r in range(6)), return_exceptions=True)
        return batcher, results

    batcher, results = asyncio.run(main())
    assert sizes == [4, 2]  # a full batch at once, the rest after the wait
    assert results[:3] == [0, 10, 20] and results[4:] == [40, 50]
    assert isinstance(results[3], ValueError)
    assert (batcher.batches, batcher.requests) == (2, 6)
    with pytest.raises(ValueError):
        QueryBatcher(answer, wait_ms=0)


def test_a_lone_request_does_not_wait_and_a_batch_waits_for_requests_on_their_way():
    sizes = []

    def answer(batch):
        sizes.append(len(batch))
        return batch

    async def main():
        batcher = QueryBatcher(answer, wait_ms=60_000)

        async def request(value):  # as the app's handlers run: Arrivals marked the request first
            _ARRIVAL.set(batcher.arrived())
            return await batcher.submit(value)

        assert await asyncio.wait_for(request("alone"), 5) == "alone"  # not after the minute's wait
        on_its_way = batcher.arrived()  # a request the server has started on (its body still arriving, say)
        queued = asyncio.ensure_future(request("first"))
        await asyncio.sleep(0.05)
        assert not queued.done()  # waits for it
        batcher.left(on_its_way)  # it failed before it was queued (a 4xx): no reason to wait any more
        assert await asyncio.wait_for(queued, 5) == "first"
        return batcher

    batcher = asyncio.run(main())
    assert sizes == [1, 1] and batcher.expected == 0


def test_a_batch_that_fails_fails_only_the_request_it_concerns(service, monkeypatch):
    requests = _requests(service)[:6]
    alone = [_alone(service, kind, args) for kind, args in requests]
    poisoned = _ask(service, *requests[2])
    real = engine.answer_many

    def fragile(artifacts, asks):
        if poisoned[1] in asks:
            raise RuntimeError("this request's answer failed")
        return real(artifacts, asks)

    monkeypatch.setattr(engine, "answer_many", fragile)
    batch = [_ask(service, kind, args) for kind, args in requests]
    batch[2] = poisoned
    answers = service.answer(batch)
    assert isinstance(answers[2], RuntimeError)
    for position in (0, 1, 3, 4, 5):
        _same(answers[position], alone[position])


def test_concurrent_http_requests_are_batched_and_answered_as_alone(service):
    app = create_app(service, batch_wait_ms=50, batch_max=64)
    users = [int(u) for u in service.artifacts.user_ids[:8]]
    bodies = [{"user_id": u, "history": [int(service.artifacts.item_ids[u % 50])], "k": 5} for u in users]
    bodies.append({"user_id": users[0], "items": [int(i) for i in service.artifacts.item_ids[:20]]})
    with serving_in_thread(app) as url:
        results: dict[int, httpx.Response] = {}

        def ask(position, body):
            path = "/rank" if "items" in body else "/recommend"
            results[position] = httpx.post(f"{url}{path}", json=body, timeout=30)

        threads = [threading.Thread(target=ask, args=(p, b)) for p, b in enumerate(bodies)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        bad = httpx.post(f"{url}/recommend", json={"user_id": 10**12}, timeout=30)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert bad.status_code == 404  # refused before it was queued
    batcher = app.state.batcher
    assert batcher.requests == len(bodies) and batcher.expected == 0  # every request went through it
    for position, body in enumerate(bodies):
        assert results[position].status_code == 200
        if "items" in body:
            want = service.rank(body["user_id"], None, None, None, body["items"])
        else:
            want = service.recommend(body["user_id"], body["history"], None, None, body["k"], None, True)
        _same(results[position].json(), want)
    assert 'mmrec_requests_total{route="/recommend",status="200"}' in metrics
    assert 'mmrec_requests_total{route="/recommend",status="404"}' in metrics
