"""Frozen encoders are cheap: each item's features are computed once and kept in a content-addressed store.

Features are keyed by what they are computed from: per item, a digest of its picture's bytes (a synthetic
reference holds everything its picture depends on, so it is its own content) or of its token ids, in a store
per encoder (class, weights digest, image size / text length). New events, other reader settings, another
dataset name or other item ids reuse every stored feature; only new or changed contents are encoded.

Layout: `<cache_dir>/features/<encoder key>.<shard>.pt`, each shard {"digests": [str], "features": (k, F)
float16, and for images "ok": (k,) bool}, written atomically and read with weights_only=True (no pickles).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from multimodal_rec.data.features import ItemFeatures
from multimodal_rec.data.images import ItemImages
from multimodal_rec.data.synthetic_images import is_synthetic_ref

log = logging.getLogger(__name__)

FORMAT = 2  # bump when decoding/preprocessing changes what a digest's features are
UNREADABLE = "unreadable"  # every picture file that cannot be read: encoded from zeros with ok=False
COMPACT_AT = 64  # more shards than this (one per run that met new items) are merged into one
_DAMAGED = (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError)


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


def encoder_key(kind: str, encoder: nn.Module, **settings) -> str:
    """Names an encoder's store: what, besides an item's content, its features depend on."""
    payload = json.dumps({"format": FORMAT, "kind": kind, "weights": weights_digest(encoder), **settings,
                          "class": f"{type(encoder).__module__}.{type(encoder).__qualname__}"}, sort_keys=True)
    return f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:20]}"


def image_digests(items: ItemFeatures) -> list[str | None]:
    """Per row, a digest of the picture's content (None: no picture, as the padding row)."""
    digests = []
    for ref in items.image_refs:
        if ref is None:
            digests.append(None)
        elif is_synthetic_ref(ref):
            digests.append(hashlib.sha256(b"synthetic\0" + ref.encode()).hexdigest()[:32])
        else:
            try:
                with open(Path(items.root) / ref, "rb") as handle:
                    digests.append(hashlib.file_digest(handle, "sha256").hexdigest()[:32])
            except OSError:  # loading fails the same way: zeros, ok=False (ItemImages)
                digests.append(UNREADABLE)
    return digests


def text_digests(items: ItemFeatures) -> list[str]:
    """Per row (padding row included), a digest of the token ids and attention mask."""
    rows = torch.cat([items.text_ids, items.text_mask], 1).to(torch.int64).numpy()
    return [hashlib.sha256(row.tobytes()).hexdigest()[:32] for row in rows]


def cached_image_features(encoder: nn.Module, items: ItemFeatures, size: int, cache_dir: str | Path | None,
                          device: str | torch.device = "cpu") -> dict:
    """As `image_features` for every row, encoding only the pictures the store lacks."""
    columns = {"features": ((encoder.out_dim,), torch.float16), "ok": ((), torch.bool)}
    return stored_features("image", encoder, image_digests(items), columns, cache_dir, size=size,
                           compute=lambda rows: image_features(encoder, items, size, device=device, rows=rows))


def cached_text_features(encoder: nn.Module, items: ItemFeatures, cache_dir: str | Path | None,
                         device: str | torch.device = "cpu") -> dict:
    """As `text_features` for every row, encoding only the texts the store lacks."""
    columns = {"features": ((encoder.out_dim,), torch.float16)}
    return stored_features("text", encoder, text_digests(items), columns, cache_dir,
                           max_len=items.text_ids.shape[1],
                           compute=lambda rows: text_features(encoder, items, device=device, rows=rows))


def stored_features(kind: str, encoder: nn.Module, digests: list[str | None], columns: dict,
                    cache_dir: str | Path | None, compute: Callable[[list[int]], dict], **settings) -> dict:
    """Tables of `columns` (name -> (row shape, dtype)), one row per digest (zeros where None): from the store,
    and from `compute(rows)` (rows in that order) for one row of each digest it lacks, which are then stored."""
    key = encoder_key(kind, encoder, **settings)
    directory = None if cache_dir is None else Path(cache_dir) / "features"
    index, tables, n_shards = _read_store(directory, key, columns)
    missing: dict[str, int] = {}  # digest -> the first row that has it
    for row, digest in enumerate(digests):
        if digest is not None and digest not in index:
            missing.setdefault(digest, row)
    items = digests[:-1]  # the padding row is not an item
    encoded = sum(digest in missing for digest in items)
    distinct = len({digest for digest in items if digest in missing})  # items may share a picture or text
    shared = f" ({distinct} distinct)" if distinct != encoded else ""
    log.info("%s features: %d of %d items encoded%s, the rest from the cache (%s)", kind, encoded,
             sum(digest is not None for digest in items), shared, key)
    if missing:
        computed = compute(list(missing.values()))
        new = {name: computed[name].to(dtype) for name, (_, dtype) in columns.items()}
        if directory is not None:
            _write_shard(directory / f"{key}.{_shard_name(list(missing))}.pt", list(missing), new)
            n_shards += 1
        held = sum(len(table) for table in tables["features"])
        index.update({digest: held + i for i, digest in enumerate(missing)})
        for name in columns:
            tables[name].append(new[name])
    stacked = {name: torch.cat(tables[name]) if tables[name] else None for name in columns}
    if directory is not None and n_shards > COMPACT_AT:
        _compact(directory, key, index, stacked)
    present = torch.tensor([digest is not None for digest in digests], dtype=torch.bool)
    rows = torch.tensor([index[digest] for digest in digests if digest is not None], dtype=torch.long)
    out = {}
    for name, (shape, dtype) in columns.items():
        out[name] = torch.zeros((len(digests), *shape), dtype=dtype)
        if len(rows):
            out[name][present] = stacked[name][rows]
    return out


def _shard_name(digests: list[str]) -> str:
    """Named by its contents: processes that encode the same items write the same file."""
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


def _read_store(directory: Path | None, key: str, columns: dict) -> tuple[dict[str, int], dict[str, list], int]:
    """(digest -> row of the concatenated shards, name -> shard tensors, number of shards read)."""
    index: dict[str, int] = {}
    tables: dict[str, list] = {name: [] for name in columns}
    paths = sorted(directory.glob(f"{key}.*.pt")) if directory is not None and directory.is_dir() else []
    n_shards = offset = 0
    for path in paths:
        try:
            shard = _check_shard(torch.load(path, map_location="cpu", weights_only=True), columns)
        except FileNotFoundError:  # merged away by another process since the listing: its items are misses
            continue
        except _DAMAGED as error:  # a damaged shard is recomputed, never trusted
            log.warning("feature cache %s unreadable (%s); recomputing its items", path, error)
            path.unlink(missing_ok=True)
            continue
        n_shards += 1
        for i, digest in enumerate(shard["digests"]):  # shards written side by side may overlap
            index.setdefault(digest, offset + i)
        offset += len(shard["digests"])
        for name in columns:
            tables[name].append(shard[name])
    return index, tables, n_shards


def _check_shard(shard, columns: dict) -> dict:
    """The shard if it has the expected digests and tensors; raises ValueError saying what is wrong."""
    if not isinstance(shard, dict) or not isinstance(shard.get("digests"), list):
        raise ValueError("not a feature shard")
    digests = shard["digests"]
    if not all(isinstance(d, str) for d in digests) or len(set(digests)) != len(digests):
        raise ValueError("bad digests")
    for name, (shape, dtype) in columns.items():
        tensor, expected = shard.get(name), (len(digests), *shape)
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != expected:
            raise ValueError(f"bad {name!r} table")
    return shard


def _write_shard(path: Path, digests: list[str], tensors: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(handle)
    try:
        torch.save({"digests": list(digests), **{name: t.contiguous() for name, t in tensors.items()}}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _compact(directory: Path, key: str, index: dict[str, int], stacked: dict) -> None:
    """Merges the encoder's shards into one (written before the others are removed, so nothing is lost)."""
    digests = list(index)
    rows = torch.tensor(list(index.values()), dtype=torch.long)
    merged = directory / f"{key}.{_shard_name(digests)}.pt"
    _write_shard(merged, digests, {name: table[rows] for name, table in stacked.items()})
    for path in directory.glob(f"{key}.*.pt"):
        if path != merged:
            path.unlink(missing_ok=True)
    log.info("feature cache %s: shards merged into %s", key, merged.name)


@torch.no_grad()
def image_features(encoder: nn.Module, items: ItemFeatures, size: int, batch_size: int = 64,
                   num_workers: int = 0, device: str | torch.device = "cpu", rows: list[int] | None = None) -> dict:
    """{"features": (R, F) float16, "ok": (R,) bool} of `rows` (default: all N+1, padding included); items
    without a picture or whose picture fails to load get ok=False."""
    encoder = encoder.to(device).eval()
    refs = items.image_refs if rows is None else [items.image_refs[row] for row in rows]
    features = torch.zeros(len(refs), encoder.out_dim, dtype=torch.float16)
    ok = torch.zeros(len(refs), dtype=torch.bool)
    # its own generator: a cache hit or miss must not change the global random state (random-init encoders
    # built next would differ between runs, or between DDP ranks)
    dataset = ItemImages(refs, items.root, size)
    loader = DataLoader(dataset, batch_size=batch_size, generator=torch.Generator().manual_seed(0),
                        num_workers=num_workers)
    with tqdm(total=len(dataset), desc="encoding images (frozen, cached)", unit="item", mininterval=2) as bar:
        for batch in loader:
            features[batch["index"]] = encoder(batch["pixels"].to(device)).float().cpu().half()
            ok[batch["index"]] = batch["ok"]
            bar.update(len(batch["index"]))
    failed = len(dataset) - int(ok.sum())
    if failed:
        log.warning("%d item images failed to load; those items are treated as having no image", failed)
    return {"features": features, "ok": ok}


@torch.no_grad()
def text_features(encoder: nn.Module, items: ItemFeatures, batch_size: int = 128,
                  device: str | torch.device = "cpu", rows: list[int] | None = None) -> dict:
    """{"features": (R, F) float16} of the texts of `rows` (default: all N+1, padding row included)."""
    encoder = encoder.to(device).eval()
    ids, mask = items.text_ids, items.text_mask
    if rows is not None:
        ids, mask = ids[rows], mask[rows]
    out = torch.zeros(len(ids), encoder.out_dim, dtype=torch.float16)
    with tqdm(total=len(ids), desc="encoding texts (frozen, cached)", unit="item", mininterval=2) as bar:
        for start in range(0, len(ids), batch_size):
            end = start + batch_size
            length = max(int(mask[start:end].sum(1).max()), 1)  # trim padding: MiniLM pads to 128
            out[start:end] = encoder(ids[start:end, :length].to(device),
                                     mask[start:end, :length].to(device)).cpu().half()
            bar.update(len(ids[start:end]))
    return {"features": out}
