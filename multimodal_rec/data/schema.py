"""The canonical dataset: the one contract between readers of raw data and everything after.

A dataset is one folder:
  items.parquet         item_id (int64), title, text, image (str or null) + attribute columns
  users.parquet         user_id (int64) + profile columns (may have no other column)
  interactions.parquet  user_id, item_id, timestamp (int64 seconds), value (float32), event (str)
  manifest.json         source, counts, input checksums, attribute schema, data issues met
  images/               image files named in items.image (paths relative to the folder)

`items.image` is a path relative to the dataset folder, or a `synthetic:` reference rendered on
demand (see `multimodal_rec.data.images`), or null when the item has no image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
INTERACTIONS_FILE = "interactions.parquet"
MANIFEST_FILE = "manifest.json"
IMAGES_DIR = "images"
SCHEMA_VERSION = 1

ITEM_REQUIRED = ("item_id", "title", "text", "image")
USER_REQUIRED = ("user_id",)
INTERACTION_REQUIRED = ("user_id", "item_id", "timestamp", "value", "event")
ATTRIBUTE_KINDS = ("item_categorical", "item_multi", "item_numeric", "user_categorical", "user_numeric")


class DatasetError(ValueError):
    """A dataset folder or raw input that cannot be used; the message says what and where."""


@dataclass
class DataIssues:
    """Counts bad input by kind and keeps a few examples (file, line, detail) of each."""

    max_examples: int = 5
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def add(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append(detail)

    def add_many(self, kind: str, count: int, details) -> None:
        """`count` more of `kind` at once; the first few of `details` (an iterable of strings) kept as examples."""
        if count <= 0:
            return
        self.counts[kind] += count
        shown = self.examples.setdefault(kind, [])
        for detail in details:
            if len(shown) >= self.max_examples:
                break
            shown.append(detail)

    def report(self) -> str:
        if not self.counts:
            return "no data issues"
        lines = [f"{kind}: {n} (e.g. {'; '.join(self.examples[kind])})" for kind, n in sorted(self.counts.items())]
        return "data issues:\n  " + "\n  ".join(lines)

    def to_json(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}


@dataclass
class RawDataset:
    """What a reader returns: the three tables, the attribute schema and what it met on the way."""

    source: str
    items: pd.DataFrame
    users: pd.DataFrame
    interactions: pd.DataFrame
    attributes: dict  # ATTRIBUTE_KINDS -> list of column names
    inputs: dict  # input file name -> sha256
    issues: DataIssues
    image_files: dict = field(default_factory=dict)  # item_id -> source path to copy into images/
    extra: dict = field(default_factory=dict)  # source-specific facts for the manifest


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_columns(frame: pd.DataFrame, required: tuple, name: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError(f"{name} lacks required columns {missing}; has {list(frame.columns)}")


def validate(raw: RawDataset) -> None:
    """Checks the contract; a reader that breaks it is a bug, so this raises."""
    _check_columns(raw.items, ITEM_REQUIRED, "items")
    _check_columns(raw.users, USER_REQUIRED, "users")
    _check_columns(raw.interactions, INTERACTION_REQUIRED, "interactions")
    for kind in ATTRIBUTE_KINDS:
        table = raw.items if kind.startswith("item") else raw.users
        for column in raw.attributes.get(kind, []):
            if column not in table.columns:
                raise DatasetError(f"attribute {kind}:{column} is not a column")
    if raw.items["item_id"].duplicated().any() or raw.users["user_id"].duplicated().any():
        raise DatasetError("duplicate item_id or user_id left in the tables")
    unknown_items = ~raw.interactions["item_id"].isin(raw.items["item_id"])
    unknown_users = ~raw.interactions["user_id"].isin(raw.users["user_id"])
    if unknown_items.any() or unknown_users.any():
        raise DatasetError("interactions refer to unknown items or users")


def write_dataset(raw: RawDataset, out_dir: str | os.PathLike) -> dict:
    """Writes the dataset folder atomically: built beside `out_dir`, then renamed into place."""
    validate(raw)
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        items = raw.items.copy()
        if raw.image_files:
            (staging / IMAGES_DIR).mkdir()
            for item_id, source in raw.image_files.items():
                name = f"{IMAGES_DIR}/{item_id}{Path(source).suffix.lower()}"
                shutil.copyfile(source, staging / name)
                items.loc[items["item_id"] == item_id, "image"] = name
        items = items.sort_values("item_id", kind="stable").reset_index(drop=True)
        users = raw.users.sort_values("user_id", kind="stable").reset_index(drop=True)
        interactions = raw.interactions.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
        interactions = interactions.reset_index(drop=True)
        items.to_parquet(staging / ITEMS_FILE, index=False)
        users.to_parquet(staging / USERS_FILE, index=False)
        interactions.to_parquet(staging / INTERACTIONS_FILE, index=False)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": raw.source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "counts": {
                "items": len(items),
                "users": len(users),
                "interactions": len(interactions),
                "items_with_image": int(items["image"].notna().sum()),
                "items_with_text": int((items["text"].fillna("").str.len() > 0).sum()),
            },
            "attributes": {kind: list(raw.attributes.get(kind, [])) for kind in ATTRIBUTE_KINDS},
            "inputs": dict(sorted(raw.inputs.items())),
            "issues": raw.issues.to_json(),
            **raw.extra,
        }
        manifest["fingerprint"] = fingerprint_of(manifest)
        with open(staging / MANIFEST_FILE, "w") as handle:
            json.dump(manifest, handle, indent=2)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def fingerprint_of(manifest: dict, attributes: bool = True) -> str:
    """A short hash of what defines the data: source, inputs, counts and attribute schema (and the settings of
    the generic reader, whose column mapping changes the tables without changing the inputs). Without
    `attributes`: what the item images and texts are made of, so cached image/text features outlive a change
    of the attribute columns."""
    keys = ("source", "inputs", "counts", "generator") + (("attributes",) if attributes else ())
    payload = {k: manifest.get(k) for k in keys}
    if "reader" in manifest:  # only then: other datasets keep the fingerprints they had
        payload["reader"] = manifest["reader"]
    payload = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class CanonicalDataset:
    root: Path
    items: pd.DataFrame
    users: pd.DataFrame
    interactions: pd.DataFrame
    manifest: dict

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def content_fingerprint(self) -> str:
        """The fingerprint without the attribute schema (what frozen image/text features depend on)."""
        return fingerprint_of(self.manifest, attributes=False)

    def attributes(self, kind: str) -> list[str]:
        return list(self.manifest["attributes"].get(kind, []))


def load_dataset(root: str | os.PathLike) -> CanonicalDataset:
    root = Path(root)
    needed = [root / f for f in (ITEMS_FILE, USERS_FILE, INTERACTIONS_FILE, MANIFEST_FILE)]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise DatasetError(
            f"not a prepared dataset, missing: {', '.join(missing)}. "
            "Run `python -m multimodal_rec.data.prepare data=<name> out=<dir>` first."
        )
    with open(root / MANIFEST_FILE) as handle:
        manifest = json.load(handle)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DatasetError(f"{root} has schema version {manifest.get('schema_version')}, expected {SCHEMA_VERSION}")
    return CanonicalDataset(
        root=root,
        items=pd.read_parquet(root / ITEMS_FILE),
        users=pd.read_parquet(root / USERS_FILE),
        interactions=pd.read_parquet(root / INTERACTIONS_FILE),
        manifest=manifest,
    )


def item_keys(items) -> list[str]:
    """Each item row's lasting name: the shop's own id where the data has one, else the item id."""
    column = items["source_id"] if "source_id" in items else items["item_id"]
    return [str(key) for key in column]
