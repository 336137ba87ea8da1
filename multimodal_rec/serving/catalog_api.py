"""What a page needs besides rankings: an item's details and picture, a user's history, the catalogue's
facets (for filters). Pictures come from the dataset the export was made from (`image_root` in model.json,
or serve.yaml's `image_root`), synthetic items are rendered, items added with an image keep their upload;
anything else gets a neutral placeholder, never a broken picture."""

from __future__ import annotations

import base64
import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from multimodal_rec.data.images import ImageLoadError, load_image
from multimodal_rec.data.synthetic_images import is_synthetic_ref
from multimodal_rec.serving.artifacts import Artifacts
from multimodal_rec.serving.filters import RESERVED, is_multi
from multimodal_rec.serving.shop_ids import id_kind, item_out, known_item_row, known_user, user_out
from multimodal_rec.serving.thumbnails import ThumbnailCache

MAX_FACET_VALUES = 50
PLACEHOLDER_SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256" viewBox="0 0 256 256" role="img" '
    b'aria-label="no picture"><rect width="256" height="256" fill="#eceff1"/><path d="M72 176l40-48 32 36 24-28 '
    b'40 40z" fill="#b0bec5"/><circle cx="96" cy="92" r="16" fill="#b0bec5"/></svg>')


def _plain(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return None if value is pd.NA or value is pd.NaT else value


def attribute_columns(catalog: pd.DataFrame) -> list[str]:
    return [c for c in catalog.columns if c not in RESERVED]


def attributes_of(artifacts: Artifacts, rows: np.ndarray) -> list[dict]:
    """Each row's catalogue attributes (JSON values; missing ones left out) and its cold flag."""
    catalog = artifacts.catalog
    columns = attribute_columns(catalog)
    table = catalog.iloc[rows][[*columns, "cold"]].to_dict("records") if len(rows) else []
    return [{k: v for k, v in ((k, _plain(v)) for k, v in record.items()) if v is not None and v != []}
            for record in table]


def item_details(artifacts: Artifacts, item_id) -> dict:
    row = known_item_row(artifacts, item_id)
    return {"item_id": item_id, "title": str(artifacts.titles[row]), "attributes": attributes_of(artifacts, [row])[0],
            "has_image": bool(artifacts.catalog["has_image"].iat[row]), "withdrawn": row in artifacts.withdrawn}


def user_history(artifacts: Artifacts, user_id, limit: int) -> dict:
    rows, _ = artifacts.rows(artifacts.user_history(known_user(artifacts, user_id))[-limit:])
    return {"user_id": user_id, "items": [{"item_id": item_out(artifacts.shop_ids, artifacts.item_ids[r]),
                                           "title": str(artifacts.titles[r])} for r in rows]}


def facets(artifacts: Artifacts) -> dict:
    """Filterable attributes: the most frequent values of each categorical one, the range of each numeric one;
    a few known user ids to start from, and whether ids are ints or the shop's own strings."""
    catalog, out = artifacts.catalog, {"categorical": {}, "numeric": {}, "id_kind": id_kind(artifacts.shop_ids)}
    known = [u for u in artifacts.user_ids[: 2 * MAX_FACET_VALUES] if int(u) in artifacts.user_row]
    out["example_user_ids"] = [user_out(artifacts.shop_ids, u) for u in known[:MAX_FACET_VALUES]]  # the page's picker
    for column in attribute_columns(catalog):
        values = catalog[column]
        if is_multi(values):
            counts = values.dropna().explode().astype(str).value_counts()
        elif pd.api.types.is_numeric_dtype(values):
            finite = values.dropna()
            if len(finite):
                out["numeric"][column] = {"min": _plain(finite.min()), "max": _plain(finite.max())}
            continue
        else:
            counts = values.dropna().astype(str).value_counts()
        out["categorical"][column] = counts.index[:MAX_FACET_VALUES].tolist()
    return out


def image_source(artifacts: Artifacts, item_id, size: int, image_root: Path | None) -> tuple[str, object, str]:
    """(kind, source, etag) of the item's picture, found without decoding it, so that a request that already
    holds the picture (If-None-Match) costs no decoding: kind "upload" (base64, items added without a journal),
    "synthetic" (a ref to render), "file" (a path under `image_root`, or an added item's stored picture) or
    "placeholder".

    Where pictures may come from: `image_root` is serve.yaml's (the operator's, trusted as it is) or else
    model.json's, which load_artifacts keeps only inside the artifact folder or the tree the artifacts root
    sits in (artifacts.image_folder; "/" is dropped). A catalogue ref is confined to `image_root` once `..`
    and symbolic links are resolved: an absolute ref or one leading out gets the placeholder."""
    row = known_item_row(artifacts, item_id)
    uploaded = artifacts.uploaded_images.get(int(artifacts.item_ids[row]))
    ref = artifacts.catalog["image"].iat[row] if "image" in artifacts.catalog else None
    tag = hashlib.sha256(f"{item_id}:{ref}:{size}:{uploaded is not None}".encode()).hexdigest()[:20]
    if isinstance(uploaded, Path):  # an item added through the API: its picture stored beside the journal
        return "file", uploaded, tag
    if uploaded is not None:
        return "upload", uploaded, tag
    if isinstance(ref, str) and is_synthetic_ref(ref):
        return "synthetic", ref, tag
    if isinstance(ref, str) and image_root is not None:
        path = (image_root / ref).resolve()
        if path.is_relative_to(image_root.resolve()) and path.is_file():  # a ref never leads out of the data
            return "file", path, tag
    return "placeholder", None, "placeholder"


THUMBNAILS = ThumbnailCache(max_bytes=64 * 2**20)  # rendered pictures, and the upload strings they pin


def render_image(kind: str, source, size: int) -> tuple[bytes, str]:
    """(bytes, media type): the picture as a JPEG at most `size` wide, or the placeholder when there is none or
    it cannot be decoded (a corrupt file is treated as a missing one). Rendered once per (source, size): the
    same item at the same size again is served from THUMBNAILS without decoding."""
    key = (kind, source, size)
    cached = THUMBNAILS.get(key)
    if cached is not None:
        return cached
    rendered = _render(kind, source, size)
    if rendered[1] == "image/jpeg":  # the placeholder costs nothing; a failed decode is tried again next time
        THUMBNAILS.put(key, rendered, len(rendered[0]) + (len(source) if isinstance(source, str) else 0))
    return rendered


def _render(kind: str, source, size: int) -> tuple[bytes, str]:
    picture = None
    try:
        if kind == "upload":
            with Image.open(io.BytesIO(base64.b64decode(source))) as image:
                image.draft("RGB", (size, size * 2))  # a JPEG decodes at a fraction of its size when it can
                picture = image.convert("RGB")
        elif kind == "synthetic":
            picture = load_image(source, ".", size)
        elif kind == "file":
            with Image.open(source) as image:
                image.draft("RGB", (size, size * 2))
                picture = image.convert("RGB")
    except (OSError, ValueError, ImageLoadError, Image.DecompressionBombError):
        picture = None
    if picture is None:
        return PLACEHOLDER_SVG, "image/svg+xml"
    picture.thumbnail((size, size * 2))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue(), "image/jpeg"
