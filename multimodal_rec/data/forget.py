"""Forget users: a new prepared dataset without their profile and events, so the next training run never
sees them.

    python -m multimodal_rec.data.forget data=ml100k_mm users=forget.txt          # in place (data.processed_dir)
    python -m multimodal_rec.data.forget data=ml100k_mm users=forget.txt out=data/ml100k_mm_v2

`users` is a file of user ids, one per line (blank lines and `#` comments allowed): whole numbers, or the
shop's own ids for data prepared from a shop's files (`data=tabular`). The dataset is rewritten
atomically; its fingerprint changes (a checkpoint of the old data is refused on the new one) and its manifest
counts the users forgotten since the data was prepared, which the next export reports. The raw source the
data was prepared from is the shop's own: remove the users there too, or a fresh `prepare` brings them back.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import pyarrow.parquet as pq
from omegaconf import DictConfig

from multimodal_rec.config import CONF_DIR
from multimodal_rec.data.schema import USERS_FILE, DataIssues, DatasetError, RawDataset, load_dataset, write_dataset
from multimodal_rec.data.synthetic_images import is_synthetic_ref

log = logging.getLogger(__name__)


def read_user_ids(path: str | Path, shop_ids: bool = False) -> set:
    """The ids in the file: ints, or with `shop_ids` the shop's own ids as strings."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"users file {path} does not exist")
    ids = set()
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if not shop_ids and not text.isdigit():
            raise DatasetError(f"{path} line {number}: {text!r} is not a user id (a whole number)")
        ids.add(text if shop_ids else int(text))
    return ids


def has_shop_ids(processed_dir: str | Path) -> bool:
    """Whether the dataset keeps the shop's own user ids (`source_id`), which a users file then names."""
    path = Path(processed_dir) / USERS_FILE
    return path.is_file() and "source_id" in pq.read_schema(path).names


def forget(processed_dir: str | Path, users: set, out: str | Path | None = None) -> dict:
    """Writes the dataset of `processed_dir` without `users` (int ids, or the shop's own ids where the data keeps
    them) to `out` (default: in place); its manifest."""
    data, asked = load_dataset(processed_dir), len(users)
    if "source_id" in data.users:
        by_shop_id = dict(zip(data.users["source_id"].astype(str), data.users["user_id"].astype(int)))
        users = {by_shop_id.get(str(u), -1) for u in users}  # -1: not in the data, counted below
    known = set(data.users["user_id"].astype(int)) | set(data.interactions["user_id"].astype(int))
    present = users & known
    keep_users = ~data.users["user_id"].isin(present)
    keep_events = ~data.interactions["user_id"].isin(present)
    images = {int(i): data.root / ref for i, ref in zip(data.items["item_id"], data.items["image"])
              if isinstance(ref, str) and not is_synthetic_ref(ref)}
    manifest = data.manifest
    raw = RawDataset(
        source=manifest["source"], items=data.items,  # write_dataset copies the images and re-points them
        users=data.users[keep_users], interactions=data.interactions[keep_events],
        attributes=manifest["attributes"], inputs=manifest["inputs"], issues=DataIssues(),
        image_files=images,
        extra={**{k: v for k, v in manifest.items() if k not in (
            "schema_version", "source", "created", "counts", "attributes", "inputs", "issues", "fingerprint")},
            "forgotten_users": int(manifest.get("forgotten_users", 0)) + len(present),
            "forgotten_from": manifest["fingerprint"]})
    raw.issues.counts.update(manifest["issues"]["counts"])  # what prepare met stays on record
    raw.issues.examples.update(manifest["issues"]["examples"])
    written = write_dataset(raw, out or processed_dir)
    log.info("forgot %d users (%d events); %d of the ids given were not in the data; fingerprint %s -> %s",
             len(present), int((~keep_events).sum()), asked - len(present), manifest["fingerprint"],
             written["fingerprint"])
    return written


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="forget")
def main(cfg: DictConfig) -> None:
    try:
        shop_ids = has_shop_ids(cfg.data.processed_dir)
        manifest = forget(cfg.data.processed_dir, read_user_ids(cfg.users, shop_ids), cfg.out)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{cfg.out or cfg.data.processed_dir}: {manifest['counts']['users']} users left, "
          f"{manifest['forgotten_users']} forgotten since prepared")


if __name__ == "__main__":
    main()
