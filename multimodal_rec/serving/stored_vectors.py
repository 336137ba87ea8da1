"""What an item added through the API was encoded to, kept in its journal entry: a start or a reload of the
same model takes the vector from there instead of running the frozen encoders again (~0.1 s an item).

The vector is tied to the model that computed it (the checkpoint's sha256 and the export's cold offset): a
reload of another model encodes the item again. A stored vector of the wrong shape or dtype, or not finite,
is ignored (encoded again), never trusted.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from multimodal_rec.serving.artifacts import Artifacts


def encoding_key(artifacts: Artifacts) -> str:
    """Names the model that encodes additions: equal keys give equal vectors."""
    manifest = artifacts.manifest
    return f"{manifest['checkpoint_sha256']}:{float(manifest.get('cold_offset', 0.0) or 0.0)}"


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def encoding_entry(artifacts: Artifacts, vector: np.ndarray, parts: np.ndarray | None) -> dict:
    """The journal's record of an encoding: the model's key, the float32 vector, the float16 parts (or None)."""
    return {"model": encoding_key(artifacts), "vector": _pack(vector.astype(np.float32)),
            "parts": None if parts is None else _pack(parts.astype(np.float16))}


def _unpack(text, dtype, shape: tuple) -> np.ndarray | None:
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        return None
    array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    return array if np.isfinite(array).all() else None


def stored_encoding(entry, model: str, artifacts: Artifacts) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(vector, parts) from a journal entry when they were computed by `model` and fit the artifacts; else None."""
    if not isinstance(entry, dict) or entry.get("model") != model:
        return None
    vector = _unpack(entry.get("vector"), np.float32, (artifacts.item_vectors.shape[1],))
    if vector is None:
        return None
    if artifacts.modality_parts is None:
        return vector, None
    parts = entry.get("parts")
    if parts is None:
        return vector, None
    parts = _unpack(parts, np.float16, artifacts.modality_parts.shape[1:])
    return (vector, parts) if parts is not None else None
