"""The shop's own ids at the endpoint. A catalogue prepared from a shop's files (`data=tabular`) keeps each
item's and user's id as given (`source_id`: SKUs, ASINs, UUIDs); requests name items and users by those and
answers give them back, while the index and the tables use the canonical int ids. A catalogue with integer
ids (MovieLens, the generated shop) has no such map: integers pass through and a string id is a 422.

A number sent for a shop id is read as its decimal string (12 finds "12"); answers always give the string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from multimodal_rec.serving.errors import RequestError

ExternalId = int | str
MAX_ID = 2**63 - 1


@dataclass
class ShopIds:
    """source id <-> canonical id, for items and users; `item_source` grows as items are added."""

    item_canonical: dict = field(default_factory=dict)  # str -> int
    item_source: dict = field(default_factory=dict)  # int -> str
    user_canonical: dict = field(default_factory=dict)
    user_source: dict = field(default_factory=dict)

    @classmethod
    def from_tables(cls, catalog: pd.DataFrame, users: pd.DataFrame | None) -> ShopIds:
        ids = cls()
        ids.item_canonical = dict(zip(catalog["source_id"].astype(str), catalog["item_id"].astype(np.int64).tolist()))
        ids.item_source = {v: k for k, v in ids.item_canonical.items()}
        if users is not None:
            ids.user_canonical = dict(zip(users["source_id"].astype(str), users["user_id"].astype(np.int64).tolist()))
            ids.user_source = {v: k for k, v in ids.user_canonical.items()}
        return ids


def id_kind(ids: ShopIds | None) -> str:
    """What clients send as ids: "int" or "string" (the shop's own)."""
    return "int" if ids is None else "string"


def _refuse_string(value, what: str) -> None:
    if isinstance(value, str):
        raise RequestError(422, f"{what} ids of this catalogue are integers, got {value!r}")


def items_in(ids: ShopIds | None, values: list, message: str = "unknown item ids") -> list[int]:
    """The canonical ids of `values` (as sent); unknown shop ids: a 404 naming them as they were sent."""
    if ids is None:
        for value in values:
            _refuse_string(value, "item")
        return list(values)
    found = [ids.item_canonical.get(str(v)) for v in values]
    unknown = [v for v, f in zip(values, found) if f is None]
    if unknown:
        raise RequestError(404, f"{message}: {unknown[:20]}", unknown_item_ids=unknown)
    return found


def item_in(ids: ShopIds | None, value) -> int:
    return items_in(ids, [value], "unknown item id")[0]


def user_in(ids: ShopIds | None, value):
    if value is None:
        return None
    if ids is None:
        _refuse_string(value, "user")
        return value
    found = ids.user_canonical.get(str(value))
    if found is None:
        raise RequestError(404, f"unknown user id {value!r}", unknown_user_id=value)
    return found


def known_item_row(artifacts, item_id) -> int:
    """The row of an item the artifacts hold, named as the client names it (404 naming the id as sent)."""
    row = artifacts.item_row.get(item_in(artifacts.shop_ids, item_id))
    if row is None:
        raise RequestError(404, f"unknown item id {item_id}", unknown_item_ids=[item_id])
    return row


def known_user(artifacts, user_id):
    """The canonical id of a user the artifacts hold (None stays None; 404 naming the id as sent)."""
    canonical = user_in(artifacts.shop_ids, user_id)
    if canonical is not None and canonical not in artifacts.user_row:
        raise RequestError(404, f"unknown user id {user_id}", unknown_user_id=user_id)
    return canonical


def path_id(ids: ShopIds | None, text: str, what: str) -> ExternalId:
    """An id from a URL path: the string itself for shop ids, else a non-negative int64 (422 otherwise)."""
    if ids is not None:
        return text
    if not text.isascii() or not text.isdigit() or int(text) > MAX_ID:
        raise RequestError(422, f"{what} ids of this catalogue are integers (0 to {MAX_ID}), got {text[:40]!r}")
    return int(text)


def item_out(ids: ShopIds | None, canonical) -> ExternalId:
    return int(canonical) if ids is None else ids.item_source.get(int(canonical), int(canonical))


def user_out(ids: ShopIds | None, canonical) -> ExternalId:
    return int(canonical) if ids is None else ids.user_source.get(int(canonical), int(canonical))


def answer_out(ids: ShopIds | None, answer: dict) -> dict:
    """An engine answer with the shop's ids in place of canonical ones (items, reasons, withdrawn items)."""
    if ids is None:
        return answer
    for item in answer.get("items", []):
        item["item_id"] = item_out(ids, item["item_id"])
        reason = item.get("reason")
        if reason and reason.get("because_of") is not None:
            reason["because_of"] = item_out(ids, reason["because_of"])
    if answer.get("withdrawn_item_ids"):
        answer["withdrawn_item_ids"] = [item_out(ids, i) for i in answer["withdrawn_item_ids"]]
    return answer
