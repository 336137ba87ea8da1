"""Frozen encoders are cheap: their item features are computed once and cached on disk.

The cache key covers the encoder (a digest of its weights and its name), the data's content fingerprint
(not its attribute columns), for texts a digest of the token ids, and the preprocessing (image size, text
length), so a change to any of them recomputes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from multimodal_rec.data.features import ItemFeatures
from multimodal_rec.data.images import ItemImages

log = logging.getLogger(__name__)


def weights_digest(module: nn.Module) -> str:
    """sha256 over the module's parameters and buffers (names, shapes, bytes)."""
    return tensors_digest(module.state_dict())


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(kind: str, encoder: nn.Module, data_fingerprint: str, **settings) -> str:
    payload = json.dumps({"kind": kind, "class": type(encoder).__name__, "weights": weights_digest(encoder),
                          "data": data_fingerprint, **settings}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def cached(cache_dir: str | Path | None, key: str, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """Loads `key` from the cache or computes and stores it atomically. Returns (value, was_cached)."""
    if cache_dir is None:
        return compute(), False
    path = Path(cache_dir) / "features" / f"{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True), True
        except (OSError, RuntimeError, EOFError) as error:  # a damaged file is recomputed, not trusted
            log.warning("feature cache %s unreadable (%s); recomputing", path, error)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(value, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return value, False


@torch.no_grad()
def image_features(encoder: nn.Module, items: ItemFeatures, size: int, batch_size: int = 64,
                   num_workers: int = 0, device: str | torch.device = "cpu") -> dict:
    """{"features": (N+1, F) float16, "ok": (N+1,) bool}; items whose image fails to load get ok=False."""
    encoder = encoder.to(device).eval()
    features = torch.zeros(len(items.image_refs), encoder.out_dim, dtype=torch.float16)
    ok = torch.zeros(len(items.image_refs), dtype=torch.bool)
    # its own generator: a cache hit or miss must not change the global random state (random-init encoders
    # built next would differ between runs, or between DDP ranks)
    loader = DataLoader(ItemImages(items.image_refs, items.root, size), batch_size=batch_size,
                        generator=torch.Generator().manual_seed(0),
                        num_workers=num_workers)
    for batch in tqdm(loader, desc="encoding images (frozen, cached)", unit="batch", mininterval=2):
        features[batch["index"]] = encoder(batch["pixels"].to(device)).float().cpu().half()
        ok[batch["index"]] = batch["ok"]
    failed = int(items.has_image.sum() - ok.sum())
    if failed:
        log.warning("%d item images failed to load; those items are treated as having no image", failed)
    return {"features": features, "ok": ok}


@torch.no_grad()
def text_features(encoder: nn.Module, items: ItemFeatures, batch_size: int = 128,
                  device: str | torch.device = "cpu") -> dict:
    """{"features": (N+1, F) float16} for every item's text (padding row included)."""
    encoder = encoder.to(device).eval()
    ids, mask = items.text_ids, items.text_mask
    out = torch.zeros(len(ids), encoder.out_dim, dtype=torch.float16)
    for start in tqdm(range(0, len(ids), batch_size), desc="encoding texts (frozen, cached)", unit="batch",
                      mininterval=2):
        end = start + batch_size
        length = max(int(mask[start:end].sum(1).max()), 1)  # trim padding: MiniLM pads to 128
        out[start:end] = encoder(ids[start:end, :length].to(device), mask[start:end, :length].to(device)).cpu().half()
    return {"features": out}
