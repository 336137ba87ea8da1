"""An export takes in the serving journal (`journal=<file>`): items added through the API are encoded by the
new model's item tower and join the exported items (one more items shard, and their catalogue rows), and
items withdrawn through the API are marked `withdrawn` in the catalogue. The index built next holds them;
a server started on the export finds them there (replaying the journal again adds nothing twice).

The intake is recorded in the manifest and undone before each export run writes its parts again, so running
the export twice, with or without a journal, always leaves a consistent folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from multimodal_rec import embeddings as emb

log = logging.getLogger(__name__)


def drop_intake(out: Path, manifest: dict) -> dict:
    """The manifest without a previous journal intake (its extra items shard is deleted)."""
    intake = manifest.get("journal")
    if not intake:
        return manifest
    manifest = {**manifest, "counts": dict(manifest["counts"]), "shards": dict(manifest["shards"])}
    manifest["shards"]["items"] = [s for s in manifest["shards"]["items"] if s["file"] != intake["shard"]]
    manifest["counts"]["items"] = int(intake["exported_items"])
    del manifest["journal"]
    emb.write_json_atomic(out / emb.MANIFEST_FILE, manifest)
    (out / intake["shard"]).unlink(missing_ok=True)
    return manifest


def take_in(out: Path, manifest: dict, journal: str | Path) -> dict:
    """Replays `journal` onto the export in `out` (serving parts written) and keeps the result there."""
    from multimodal_rec.serving.parts import CATALOG_FILE, MODALITY_PARTS_FILE
    from multimodal_rec.serving.service import RecommenderService

    journal = Path(journal)
    if not journal.is_file():
        raise FileNotFoundError(f"journal {journal} does not exist")
    service = RecommenderService(out, journal=journal)  # the server's own replay: the same encoding
    artifacts = service.artifacts
    exported = int(manifest["counts"]["items"])
    added = slice(exported, None)
    number = len(manifest["shards"]["items"])
    intake = {"file": str(journal.resolve()), "entries": service.replayed_entries,
              "added_items": len(artifacts.item_ids) - exported, "withdrawn_items": len(artifacts.withdrawn),
              "exported_items": exported, "shard": emb.shard_name("items", number)}
    manifest = {**manifest, "counts": dict(manifest["counts"]), "shards": dict(manifest["shards"])}
    if intake["added_items"]:
        entry = emb.write_shard(out, "items", number, artifacts.item_ids[added], artifacts.item_vectors[added],
                                manifest.get("dtype", "float32"))
        manifest["shards"]["items"] = [*manifest["shards"]["items"], entry]
        manifest["counts"]["items"] = len(artifacts.item_ids)
    catalog = artifacts.catalog.copy()
    catalog["withdrawn"] = np.isin(np.arange(len(catalog)), list(artifacts.withdrawn))
    with emb.atomic_file(out / CATALOG_FILE) as tmp:
        catalog.to_parquet(tmp, index=False)
    if artifacts.modality_parts is not None:
        with emb.atomic_file(out / MODALITY_PARTS_FILE) as tmp, open(tmp, "wb") as handle:
            np.save(handle, artifacts.modality_parts)
    manifest["journal"] = intake
    emb.write_json_atomic(out / emb.MANIFEST_FILE, manifest)  # last: it names the new shard
    log.info("journal %s taken in: %d items added, %d withdrawn", journal, intake["added_items"],
             intake["withdrawn_items"])
    return manifest
