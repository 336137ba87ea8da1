"""Changes to the artifacts in service, made under the service's write lock: items inserted (added through the
API or replayed from the journal), users forgotten."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from multimodal_rec.serving.artifacts import Artifacts
from multimodal_rec.serving.filters import RESERVED


def forget(artifacts: Artifacts, user_id: int) -> None:
    """The user's row, history, profile codes and exported vector, overwritten and unreachable."""
    with artifacts.lock:
        row = artifacts.user_row.pop(user_id)
        lo, hi = artifacts.history_offsets.pop(user_id)
        artifacts.parts["histories"]["items"][lo:hi] = -1
        profiles = artifacts.parts["user_profiles"]
        profiles.categorical[row] = 0
        profiles.numeric[row] = 0
        artifacts.user_vectors[row] = 0
        artifacts.forgotten = artifacts.forgotten | {user_id}


def insert_many(artifacts: Artifacts, encoded: list[tuple[dict, np.ndarray, np.ndarray | None]],
                 picture_path: Callable[[str], Path | None]) -> int:
    """Makes encoded items searchable, in one copy of each array; the caller holds the service's write lock;
    returns how many. A shop id gets the next canonical id (the journal replays additions in order, so a
    restart gives the same). An item's picture is kept as its file's path (or, without a journal, inline)."""
    if not encoded:
        return 0
    ids = artifacts.shop_ids
    next_id = int(artifacts.item_ids.max(initial=0)) + 1
    rows, item_ids = [], []
    for number, (item, _, _) in enumerate(encoded):
        item_id = int(item["item_id"]) if ids is None else next_id + number
        row = {"item_id": item_id, "title": str(item["title"]), "popularity": 0, "cold": True,
               "has_image": item.get("image_base64") is not None or bool(item.get("image_file")),
               "has_text": bool((item.get("text") or "").strip())}
        if ids is not None:
            row["source_id"] = str(item["item_id"])
        row.update({k: v for k, v in (item.get("attributes") or {}).items()
                    if k in artifacts.catalog.columns and k not in RESERVED})
        rows.append(row)
        item_ids.append(item_id)
    new_ids = np.asarray(item_ids, dtype=np.int64)
    vectors = np.stack([vector for _, vector, _ in encoded]).astype(np.float32)
    with artifacts.lock:
        artifacts.index.add(new_ids, vectors)
        artifacts.item_vectors = np.concatenate([artifacts.item_vectors, vectors])
        if artifacts.modality_parts is not None:
            blank = np.zeros_like(artifacts.modality_parts[0])
            extra = np.stack([parts if parts is not None else blank for _, _, parts in encoded])
            artifacts.modality_parts = np.concatenate([artifacts.modality_parts, extra.astype(blank.dtype)])
        columns = {c for row in rows for c in row}
        addition = pd.DataFrame(rows).astype({c: artifacts.catalog[c].dtype for c in columns
                                              if c in artifacts.catalog and c != "title"}, errors="ignore")
        artifacts.catalog = pd.concat([artifacts.catalog, addition], ignore_index=True)
        artifacts.titles = np.append(artifacts.titles, np.array([r["title"] for r in rows], dtype=object))
        first = len(artifacts.item_ids)
        artifacts.item_ids = np.append(artifacts.item_ids, new_ids)
        for number, (item, _, _) in enumerate(encoded):
            picture = item.get("image_base64") or (picture_path(item["image_file"]) if item.get("image_file") else None)
            if picture is not None:
                artifacts.uploaded_images[item_ids[number]] = picture
            if ids is not None:
                ids.item_source[item_ids[number]] = rows[number]["source_id"]
                ids.item_canonical[rows[number]["source_id"]] = item_ids[number]
            artifacts.item_row[item_ids[number]] = first + number  # readers now see a whole item
    return len(encoded)
