"""What a read request does besides the index search does not grow with the catalogue: no pandas, no array as
long as the catalogue, in any module of the read path, per request or per batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from multimodal_rec.serving import derived as derived_py
from multimodal_rec.serving import engine
from multimodal_rec.serving import explain as explain_py
from multimodal_rec.serving import live as live_py
from multimodal_rec.serving import query as query_py
from multimodal_rec.serving.artifacts import ExactIndex
from multimodal_rec.serving.service import RecommenderService
from tests.test_serving_speed import _alone, _ask, _requests


def _grown(folder, n_items: int) -> RecommenderService:
    """The tiny artifacts with their catalogue repeated (noisy copies of the item vectors, new ids) to n_items,
    searched exactly: the same users and histories over a larger catalogue."""
    service = RecommenderService(folder)
    artifacts = service.artifacts
    base = len(artifacts.item_ids)
    copies = -(-n_items // base)
    rng = np.random.default_rng(0)
    ids = np.concatenate([artifacts.item_ids + copy * 10**7 for copy in range(copies)])[:n_items]
    vectors = np.tile(artifacts.item_vectors, (copies, 1))[:n_items]
    vectors[base:] += rng.normal(0, 1e-3, vectors[base:].shape).astype(np.float32)
    catalog = pd.concat([artifacts.catalog] * copies, ignore_index=True).iloc[:n_items].copy()
    catalog["item_id"] = ids
    artifacts.item_ids, artifacts.item_vectors, artifacts.catalog = ids, np.ascontiguousarray(vectors), catalog
    artifacts.titles = np.tile(artifacts.titles, copies)[:n_items]
    if artifacts.modality_parts is not None:
        artifacts.modality_parts = np.tile(artifacts.modality_parts, (copies, 1, 1))[:n_items]
    artifacts.item_row = {int(i): r for r, i in enumerate(ids)}
    artifacts.index = ExactIndex(ids, artifacts.item_vectors)
    return service


READ_PATH = (engine, derived_py, query_py, explain_py, live_py)  # the modules a read request runs through
SIZED = {"arange", "zeros", "ones", "empty", "full", "fromiter"}  # numpy calls whose ints are sizes


class _SizeGuard:
    """numpy as engine.py sees it, recording the most rows of any array a call is given (or the size it makes);
    binary search (searchsorted) is O(log N) and left out."""

    def __init__(self):
        self.largest, self.calls = 0, 0

    def __getattr__(self, name):
        real = getattr(np, name)
        if not callable(real) or isinstance(real, type) or name == "searchsorted":
            return real

        def checked(*args, **kwargs):
            self.calls += 1
            for value in (*args, *kwargs.values()):
                if isinstance(value, np.ndarray) and value.ndim:  # its rows: items, candidates, history
                    self.largest = max(self.largest, len(value))
                elif name in SIZED and isinstance(value, int) and not isinstance(value, bool):
                    self.largest = max(self.largest, value)
            return real(*args, **kwargs)

        return checked


def _forbid(*_, **__):
    raise AssertionError("a pandas call over the catalogue, per request")


def _guarded_answers(folder, n_items: int, monkeypatch) -> tuple[_SizeGuard, _SizeGuard]:
    """Answers every kind of read over a catalogue of n_items with pandas forbidden and the read path's numpy watched,
    after a first round that derives the arrays (and the filters' masks) once: all of them in one batch, then
    each alone; the guards that watched each."""
    service = _grown(folder, n_items)
    service.withdraw_item(int(service.artifacts.item_ids[5]))
    rng = np.random.default_rng(2)
    for event in range(200):  # live events: trending items join the candidates, the fallback follows them
        row = int(rng.integers(n_items))
        service.live.record(f"u{event % 30}", int(service.artifacts.item_ids[row]), row, 1.0, 1000.0 + event)
    assert service.live.settings.blends
    requests = _requests(service, seed=1)
    for kind, args in requests:
        _alone(service, kind, args)
    batched, alone = _SizeGuard(), _SizeGuard()
    with monkeypatch.context() as patched:
        exact = engine._exact

        def search(*args):  # the exact search behind a filter the index did not satisfy: a search (O(passing))
            guards = [(module, module.np) for module in READ_PATH]
            for module, _ in guards:
                module.np = np
            try:
                return exact(*args)
            finally:
                for module, guard in guards:
                    module.np = guard

        patched.setattr(engine, "_exact", search)
        patched.setattr(derived_py, "filter_mask", _forbid)
        for name in ("__getitem__", "to_dict", "itertuples"):
            patched.setattr(pd.DataFrame, name, _forbid)
        for name in ("to_numpy", "__array__", "__getitem__"):
            patched.setattr(pd.Series, name, _forbid)
        patched.setattr(pd.DataFrame, "iloc", property(_forbid))
        answers = []
        for guard, answer in ((batched, lambda: service.answer([_ask(service, *request) for request in requests])),
                              (alone, lambda: [_alone(service, *request) for request in requests])):
            for module in READ_PATH:
                patched.setattr(module, "np", guard)
            answers += answer()
    assert not any(isinstance(answer, Exception) for answer in answers), answers
    # Arrow columns in one piece: a take from a chunked array (the catalogue grown by concat here, a Parquet file
    # of many row groups in a shop) copies every chunk, per request
    assert not any(isinstance(values, pa.ChunkedArray)
                   for _, _, values in derived_py.derived(service.artifacts).attribute_arrays)
    return batched, alone


def test_per_request_work_does_not_grow_with_the_catalogue(tiny_artifacts, monkeypatch):
    (small_batch, small), (large_batch, large) = (_guarded_answers(tiny_artifacts, n, monkeypatch)
                                                  for n in (2_000, 200_000))
    # the most rows any of a request's numpy calls saw: its history, candidates or fetch, never the catalogue;
    # a batch's: the candidates of all its requests together (~80 requests here)
    assert large.largest < 5_000, f"a per-request numpy call over {large.largest} rows of 200,000 items"
    assert large_batch.largest < 20_000, f"a batch's numpy call over {large_batch.largest} rows of 200,000 items"
    for few, many in ((small, large), (small_batch, large_batch)):  # as many calls at 100x the items
        assert 0 < many.calls <= 1.5 * few.calls + 50, (few.calls, many.calls)
