"""A request's query: checked and gathered (`prepare_query`: the stored history, its live events, the session
sent, the profile), then encoded by the history encoder for many requests at once (`encode_queries`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from multimodal_rec.data.features import standardised_rank
from multimodal_rec.models.components.scoring import retrieval_vectors
from multimodal_rec.serving.artifacts import Artifacts
from multimodal_rec.serving.derived import item_rows
from multimodal_rec.serving.errors import RequestError


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
