"""The parts of a trained model that serving needs, written beside the exported embeddings.

  model.json        settings, the vocabularies that turn a new item into tower inputs, and how to build
                    each module (item tower, history encoder, ranker, frozen encoders) from this package
  model.safetensors their weights, the user profiles and every known user's history (external item ids);
                    no pickles: model_files.py
  catalog.parquet   item_id, title, attributes (for filters and answers), training popularity, cold flag, and
                    `source_id`: the shop's own id, for data prepared from a shop's files (data=tabular)
  users.parquet     user_id, source_id: the shop's own user ids (only for such data)
  modality_parts.npy  (N, M, d) float16: each item's per-modality vectors (and content-neighbour part), for
                    the reasons

Serving then starts from the artifact folder alone, without the training data or code paths.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from multimodal_rec.data.sequences import hour_of_day
from multimodal_rec.embeddings import MANIFEST_FILE, atomic_file, file_record, write_json_atomic
from multimodal_rec.models.content_graph import unit_features
from multimodal_rec.serving.model_files import CONFIG_FILE, WEIGHTS_FILE, save_parts

log = logging.getLogger(__name__)

CATALOG_FILE, MODALITY_PARTS_FILE, USERS_FILE = "catalog.parquet", "modality_parts.npy", "users.parquet"
SERVING_FILES = (CONFIG_FILE, WEIGHTS_FILE, CATALOG_FILE, USERS_FILE, MODALITY_PARTS_FILE)
MAX_PARTS_ITEMS = 2_000_000  # beyond this the per-modality vectors would not fit comfortably; reasons omit them
MAX_GRAPH_VALUES = 400_000_000  # float16 feature values of the warm items kept for new items' content neighbours


def _vocabularies(datamodule) -> dict:
    """What turns a new item's raw attributes into the tower's codes (see data/features.py)."""
    data, features = datamodule.dataset, datamodule.item_features
    users = {column: list(vocab) for column, vocab in zip(
        data.attributes("user_categorical"),
        (sorted(data.users[c].astype("string").dropna().unique()) for c in data.attributes("user_categorical")))}
    numeric = {column: np.sort(data.items[column].dropna().to_numpy(np.float64))
               for column in data.attributes("item_numeric")}
    return {
        "categorical": dict(zip(data.attributes("item_categorical"), features.vocabularies["categorical"])),
        "multi_columns": list(data.attributes("item_multi")),
        "multi": list(features.vocabularies["multi"]),
        "numeric": numeric,
        "user_categorical": users,  # request profiles are coded like users.parquet (0 = missing)
        "user_numeric": {column: np.sort(data.users[column].dropna().to_numpy(np.float64))
                         for column in data.attributes("user_numeric")},
    }


def _histories(datamodule) -> dict:
    """Every user's full history as external item ids (CSR), and the hour of their last event."""
    split, data = datamodule.split, datamodule.dataset
    item_ids = data.items["item_id"].to_numpy(np.int64)
    last = np.maximum(split.offsets[1:] - 1, 0)
    hours = np.where(split.lengths() > 0, hour_of_day(split.timestamps[last]) if len(split.timestamps) else 0, 0)
    return {"user_ids": data.users["user_id"].to_numpy(np.int64), "offsets": split.offsets.astype(np.int64),
            "items": item_ids[split.items], "last_hour": hours.astype(np.int64)}


def _catalog(datamodule, popularity: np.ndarray) -> pd.DataFrame:
    data = datamodule.dataset
    shop_ids = ["source_id"] if "source_id" in data.items else []  # the shop's own ids (data=tabular)
    columns = ["item_id", *shop_ids, "title"] + [c for kind in ("item_categorical", "item_multi", "item_numeric")
                                      for c in data.attributes(kind)]
    catalog = data.items[columns].copy()
    catalog["popularity"] = popularity.astype(np.int64)
    catalog["cold"] = np.isin(np.arange(len(catalog)), datamodule.split.cold_items)
    catalog["has_image"] = datamodule.item_features.has_image[:-1].numpy()
    catalog["has_text"] = datamodule.item_features.has_text[:-1].numpy()
    catalog["image"] = data.items["image"].astype(object).where(catalog["has_image"], None)  # for GET /items/{id}/image
    return catalog


@torch.no_grad()
def modality_parts(model, chunk: int = 4096) -> np.ndarray | None:
    """(N, M, d) per-modality vectors, captured at the input of the item tower's fusion."""
    fusion = getattr(model.item_tower, "fusion", None)
    if fusion is None or model.n_items > MAX_PARTS_ITEMS:
        return None
    captured = []
    hook = fusion.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().cpu().half()))
    try:
        for start in range(0, model.n_items, chunk):
            model.item_vectors(torch.arange(start, min(start + chunk, model.n_items), device=model.device))
    finally:
        hook.remove()
    return torch.cat(captured).numpy()


def content_graph_parts(model) -> dict | None:
    """What a new item's content neighbours are found among: the warm items' unit image/text features (the
    frozen ones the training graph was built from), or None when the model has no content neighbours."""
    items = model.items
    if not items.n_neighbours:
        return None
    kinds, features, present = items.frozen_content()
    pool = torch.nonzero(items.known[:-1]).squeeze(1)
    size = len(pool) * sum(f.shape[1] for f in features)
    if size > MAX_GRAPH_VALUES:
        log.warning("%d feature values are too many to keep for new items' content neighbours; items added "
                    "while serving will have none", size)
        return None
    units = unit_features([f[pool] for f in features], [p[pool] for p in present])
    return {"k": items.n_neighbours, "kinds": kinds, "pool": pool.cpu(), "units": [u.half().cpu() for u in units]}


def write_serving_parts(model, datamodule, out: str | Path, manifest: dict) -> None:
    out = Path(out)
    cfg = model.run_config
    data_cfg = cfg.get("data", {})
    popularity = np.bincount(datamodule.split.train_interactions()["item"], minlength=model.n_items)
    parts = {
        "checkpoint_sha256": manifest["checkpoint_sha256"],
        "data_fingerprint": manifest["data_fingerprint"],
        "dim": int(model.retrieval_dim),  # of the exported vectors (the bias column included)
        "item_dim": int(model.hparams.dim),  # of the towers' vectors
        "score": str(model.hparams.score),  # cosine: unit vectors; dot: raw ones
        # unnormalised item vector -> temperature * bias, the retrieval score's second term; None: plain cosine
        "item_bias": copy.deepcopy(model.bias_head).cpu().eval() if model.bias_head is not None else None,
        # added to the bias of items never trained on: items added while serving get it too
        "cold_offset": float(model.hparams.get("cold_offset", 0.0)),
        "rerank_top": int(model.hparams.rerank_top),
        "max_len": int(datamodule.max_len),
        "n_items": int(model.n_items),
        "modalities": list(model.item_tower.modalities),
        "part_names": list(model.item_tower.part_names),  # the fusion's inputs, named in the reasons
        "content_graph": content_graph_parts(model),
        "item_tower": copy.deepcopy(model.item_tower).cpu().eval(),
        "history_encoder": copy.deepcopy(model.history_encoder).cpu().eval(),
        "ranker": copy.deepcopy(model.ranker).cpu().eval() if model.ranker is not None else None,
        "user_profiles": copy.deepcopy(model.users).cpu(),
        # the exact frozen encoders the catalogue features came from, so new items are encoded alike
        "frozen_encoders": {kind: copy.deepcopy(encoder).cpu().eval()
                            for kind, encoder in getattr(model, "frozen_encoders", {}).items()},
        "text_tokenizer": data_cfg.get("text_tokenizer", "minilm"),
        "max_text_len": int(data_cfg.get("max_text_len", 64)),
        "image_size": int(datamodule.image_size),
        "image_root": str(Path(datamodule.item_features.root).resolve()),  # catalogue image paths are relative to it
        "vocabularies": _vocabularies(datamodule),
        "histories": _histories(datamodule),
    }
    save_parts(parts, out)
    with atomic_file(out / CATALOG_FILE) as tmp:
        _catalog(datamodule, popularity).to_parquet(tmp, index=False)
    users = datamodule.dataset.users
    if "source_id" in users:  # the shop's own user ids, which requests name
        with atomic_file(out / USERS_FILE) as tmp:
            users[["user_id", "source_id"]].to_parquet(tmp, index=False)
    else:
        (out / USERS_FILE).unlink(missing_ok=True)
    vectors = modality_parts(model)
    if vectors is not None:
        with atomic_file(out / MODALITY_PARTS_FILE) as tmp, open(tmp, "wb") as handle:
            np.save(handle, vectors)  # a file object: np.save would append ".npy" to a name
    else:
        (out / MODALITY_PARTS_FILE).unlink(missing_ok=True)  # a previous export's would not fit this model
    log.info("wrote the serving parts to %s", out)


def record_serving_files(out: str | Path, manifest: dict) -> dict:
    """The manifest with the size and sha256 of each serving file in `out` (`files`), written to the folder:
    serving refuses a file that does not match, or is not listed, so call it after the last one is written."""
    out = Path(out)
    files = {name: file_record(out / name) for name in SERVING_FILES if (out / name).is_file()}
    manifest = {**manifest, "files": files}
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return manifest
