"""The generic reader (`data=tabular`): a shop's own files -> the canonical dataset, configured in YAML.

Files: items (required), interactions (required), users (optional); each CSV, TSV, Parquet or JSON
Lines, optionally gzipped, read in chunks. A column mapping names the shop's columns, so no file has to
be rewritten. Ids of any type (ASINs, UUIDs, numbers) become canonical int ids 1..N in file order; the
shop's id is kept as `source_id` in items.parquet / users.parquet, and the export and the endpoint speak
it. Bad input is counted with file and line and dropped (a malformed row, an unknown item, a duplicate),
an item whose image is missing or corrupt is kept without it, a missing column is one clear error.

Positives: with `event_weights`, only the listed events are read (weight -> `value`; null: every event,
weight 1) and `positive_events` (default: all read) are what the model learns from and is evaluated on; an
event either names that the file lacks is a warning naming the events it has. With a rating column,
`min_rating` drops lower ratings. Repeats of a (user, item) pair become one interaction at its first
time with its highest weight. `k_core` then keeps users and items with at least k interactions, repeated
until stable.

Pictures: a path is read relative to `image_root`, else relative to `folder` when the file is there. A path in
the data may not lead out of those folders (absolute, or with `..`); symbolic links in them are the shop's own
layout and are followed. A mapped image column of which no picture can be read stops with a DatasetError.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import Counter
from pathlib import Path, PurePath

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from multimodal_rec.data.image_check import image_problem
from multimodal_rec.data.schema import DataIssues, DatasetError, RawDataset, sha256_file
from multimodal_rec.data.sources.interaction_filters import k_core_filter, merge_repeats
from multimodal_rec.data.sources.table_files import LINE, read_chunks, resolve_path
from multimodal_rec.data.sources.table_values import (
    epoch_seconds,
    id_keys,
    joined_text,
    multi_values,
    number,
    text_of,
)

RESERVED = {"item_id", "user_id", "title", "text", "image", "source_id", LINE}
log = logging.getLogger(__name__)


def _plain(settings) -> dict:
    return OmegaConf.to_container(settings, resolve=True) if isinstance(settings, DictConfig) else dict(settings or {})


def _as_list(value) -> list:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _attribute_settings(spec: dict, what: str) -> tuple[list, dict, list]:
    categorical, multi, numeric = _as_list(spec.get("categorical")), dict(spec.get("multi") or {}), _as_list(
        spec.get("numeric"))
    for column in [*categorical, *multi, *numeric]:
        if column in RESERVED:
            raise DatasetError(f"{what}: an attribute may not be named {column!r} (a canonical column)")
    return categorical, multi, numeric


def _required(columns: dict, role: str, what: str) -> str:
    if not columns.get(role):
        raise DatasetError(f"{what}.columns.{role} is not set: name the column that holds it")
    return columns[role]


def _attributes(chunk: pd.DataFrame, out: pd.DataFrame, spec: tuple, name: str, issues: DataIssues) -> None:
    """Copies the declared attribute columns into `out`, parsed (a bad number is reported and left missing)."""
    categorical, multi, numeric = spec
    for column in categorical:
        out[column] = chunk[column].map(lambda v: text_of(v) or None)
    for column, delimiter in multi.items():
        out[column] = chunk[column].map(lambda v, d=delimiter: multi_values(v, d))
    for column in numeric:
        parsed = [number(v) for v in chunk[column]]  # None: not a number; NaN: missing
        bad = chunk.loc[[v is None for v in parsed]]
        issues.add_many("bad_number", len(bad), (f"{name}:{line}: {column}={str(value)[:30]!r}"
                                                 for line, value in zip(bad[LINE], bad[column])))
        out[column] = np.array([np.nan if v is None else v for v in parsed], dtype=float)


def _keyed(chunk: pd.DataFrame, column: str, name: str, what: str, issues: DataIssues) -> pd.DataFrame:
    keys = id_keys(chunk[column])
    lines = chunk.loc[keys.isna(), LINE]
    issues.add_many("malformed_row", len(lines), (f"{name}:{line}: no {what} id in {column!r}" for line in lines))
    return pd.DataFrame({"source_id": keys, LINE: chunk[LINE]}).loc[keys.notna()]


def _first_of_each(table: pd.DataFrame, name: str, kind: str, issues: DataIssues) -> pd.DataFrame:
    duplicate = table["source_id"].duplicated()
    issues.add_many(kind, int(duplicate.sum()), (f"{name}:{line}: {key!r} seen before, first kept" for key, line
                                                 in zip(table.loc[duplicate, "source_id"], table.loc[duplicate, LINE])))
    return table.loc[~duplicate].reset_index(drop=True)


def read_items(spec: dict, attributes: tuple, issues: DataIssues, chunk_rows: int) -> tuple[pd.DataFrame, Path]:
    """attributes: (categorical, multi, numeric) from `_attribute_settings`."""
    path = resolve_path(spec.get("path") or _required({}, "path", "items"))
    columns = dict(spec.get("columns") or {})
    item_col = _required(columns, "item_id", "items")
    title_col, image_col, text_cols = columns.get("title"), columns.get("image"), _as_list(columns.get("text"))
    pattern = spec.get("image_pattern")
    needed = [c for c in [item_col, title_col, image_col, *text_cols, *[c for g in attributes for c in g]] if c]
    frames = []
    for chunk in read_chunks(path, needed, issues, spec.get("format"), chunk_rows, "items"):
        out = _keyed(chunk, item_col, path.name, "item", issues)
        chunk = chunk.loc[out.index]
        titles = chunk[title_col].map(text_of) if title_col else pd.Series("", index=chunk.index)
        out["title"] = titles.where(titles != "", out["source_id"])
        texts = [chunk[c].map(text_of) for c in text_cols]
        out["text"] = [joined_text(list(parts)) for parts in zip(*texts)] if texts else ""
        if image_col:
            out["image"] = chunk[image_col].map(lambda v: text_of(v) or None)
        elif pattern:
            out["image"] = out["source_id"].map(lambda key: pattern.format(item_id=key))
        else:
            out["image"] = None
        _attributes(chunk, out, attributes, path.name, issues)
        frames.append(out)
    items = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["source_id", LINE])
    return _first_of_each(items, path.name, "duplicate_item", issues), path


def read_users(spec: dict, attributes: tuple, issues: DataIssues, chunk_rows: int) -> tuple[pd.DataFrame, Path]:
    path = resolve_path(spec.get("path") or _required({}, "path", "users"))
    user_col = _required(dict(spec.get("columns") or {}), "user_id", "users")
    categorical, multi, numeric = attributes
    if multi:
        raise DatasetError("users: multi-valued attributes are not supported; declare them categorical")
    frames = []
    for chunk in read_chunks(path, [user_col, *categorical, *numeric], issues, spec.get("format"), chunk_rows,
                             "users"):
        out = _keyed(chunk, user_col, path.name, "user", issues)
        _attributes(chunk.loc[out.index], out, (categorical, {}, numeric), path.name, issues)
        frames.append(out)
    users = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["source_id", LINE])
    return _first_of_each(users, path.name, "duplicate_user", issues), path


# the columns of a server's event store (serving/event_store.py) in the roles the reader knows
STORE_COLUMNS = {"user_id": "user_id", "item_id": "item_key", "timestamp": "time", "event": "event"}


class _EventReader:
    """Interactions, chunk by chunk, as arrays of item rows, user rows, seconds, weights and events."""

    def __init__(self, spec: dict, item_rows: dict, user_rows: dict, users_given: bool, min_rating, issues):
        self.columns = dict(spec.get("columns") or {})
        for role in ("user_id", "item_id", "timestamp"):
            _required(self.columns, role, "interactions")
        self.unit = spec.get("timestamp_unit", "auto")
        weights = spec.get("event_weights")
        self.weights = {str(k): float(v) for k, v in weights.items()} if weights else None
        positives = spec.get("positive_events")
        self.positives = set(map(str, positives)) if positives else None
        if (self.weights or self.positives) and not self.columns.get("event"):
            raise DatasetError("interactions: event_weights / positive_events need columns.event")
        if min_rating is not None and not self.columns.get("rating"):
            raise DatasetError("min_rating needs interactions.columns.rating")
        self.item_rows, self.user_rows, self.users_given = item_rows, user_rows, users_given
        self.min_rating, self.issues = min_rating, issues
        self.dropped: Counter = Counter()  # not errors: events that are not positives, ratings below the minimum
        self.parts: list[pd.DataFrame] = []
        self.events: dict[str, int] = {}  # event name -> code: a column of small ints, not of strings
        self.seen: Counter = Counter()  # every event of the file, read or not: to check the names configured

    def read(self, spec: dict, chunk_rows: int) -> tuple[pd.DataFrame, Path]:
        """The events of the file, then of each event store in `also` (a server's events.sqlite: the events
        posted to POST /events since, in the shop's own ids)."""
        path = resolve_path(spec.get("path") or _required({}, "path", "interactions"))
        self._read_file(path, self.columns, spec.get("format"), self.unit, chunk_rows)
        self.stores = [resolve_path(store) for store in spec.get("also") or []]
        store_columns = {r: c for r, c in STORE_COLUMNS.items() if r != "event" or self.columns.get("event")}
        for store in self.stores:
            self._read_file(store, store_columns, "sqlite", "s", chunk_rows)
        self._check_names(path.name)
        empty = pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                              [("user", "int32"), ("item", "int32"), ("timestamp", "int64"), ("value", "float32"),
                               ("event", "int16"), (LINE, "int32")]})
        return (pd.concat(self.parts, ignore_index=True) if self.parts else empty), path

    def _read_file(self, path: Path, columns: dict, fmt: str | None, unit: str, chunk_rows: int) -> None:
        roles = [r for r in ("user_id", "item_id", "timestamp", "event", "rating") if columns.get(r)]
        for chunk in read_chunks(path, [columns[r] for r in roles], self.issues, fmt, chunk_rows, "interactions"):
            self.parts.append(self._chunk(chunk.rename(columns={columns[r]: r for r in roles}), path.name, unit))

    def _check_names(self, name: str) -> None:
        """A configured event that the file lacks (a typo, another shop's name) reads nothing: say so."""
        if not self.columns.get("event"):
            return
        found = sorted(self.seen)
        for setting, names in (("event_weights", self.weights or {}), ("positive_events", self.positives or ())):
            missing = sorted(set(names) - set(found))
            if missing:
                log.warning("interactions.%s names %s, which %s has no event of; its events: %s", setting, missing,
                            name, found[:30])

    def _bad(self, frame: pd.DataFrame, mask, kind: str, name: str, detail) -> pd.DataFrame:
        """`frame` without the rows of `mask`, each counted as `kind` (a few kept as examples, file:line)."""
        mask = np.asarray(mask, dtype=bool)
        bad = frame.loc[mask]
        self.issues.add_many(kind, len(bad), (f"{name}:{row[LINE]}: {detail(row)}" for _, row in bad.iterrows()))
        return frame.loc[~mask]

    def _chunk(self, chunk: pd.DataFrame, name: str, unit: str) -> pd.DataFrame:
        chunk = chunk.assign(user_key=id_keys(chunk["user_id"]), item_key=id_keys(chunk["item_id"]),
                             seconds=epoch_seconds(chunk["timestamp"], unit))
        chunk = self._bad(chunk, chunk["user_key"].isna() | chunk["item_key"].isna(), "malformed_row", name,
                          lambda r: "no user or item id")
        chunk = self._bad(chunk, np.isnan(chunk["seconds"].to_numpy(float)), "malformed_row", name,
                          lambda r: f"timestamp {str(r['timestamp'])[:40]!r} is not a time")
        if "rating" in chunk:
            chunk = chunk.assign(rating_value=chunk["rating"].map(number).astype(float))
            chunk = self._bad(chunk, chunk["rating_value"].isna(), "malformed_row", name,
                              lambda r: f"rating {str(r['rating'])[:20]!r} is not a number")
        chunk = chunk.assign(item=chunk["item_key"].map(self.item_rows))
        chunk = self._bad(chunk, chunk["item"].isna(), "unknown_item", name, lambda r: f"item {r['item_key']!r}")
        chunk = self._user_rows(chunk, name)
        event = chunk["event"].map(lambda v: text_of(v) or "") if "event" in chunk else pd.Series(
            "rating" if "rating" in chunk else "interaction", index=chunk.index)
        self.seen.update(event.value_counts().to_dict())
        value = chunk["rating_value"] if "rating" in chunk else pd.Series(1.0, index=chunk.index)
        if self.weights is not None:
            chunk = self._bad(chunk, ~event.isin(list(self.weights)), "unknown_event", name,
                              lambda r: f"event {str(r['event'])[:30]!r} is not in event_weights")
            event, value = event.loc[chunk.index], event.loc[chunk.index].map(self.weights)
        keep = event.isin(list(self.positives)) if self.positives else pd.Series(True, index=chunk.index)
        self.dropped.update({f"not_positive:{e}": n for e, n in event[~keep].value_counts().items()})
        if self.min_rating is not None:
            low = chunk["rating_value"] < float(self.min_rating)
            self.dropped["below_min_rating"] += int((low & keep).sum())
            keep &= ~low
        for event_name in pd.unique(event):
            self.events.setdefault(event_name, len(self.events))
        # 26 bytes an event: what stays in memory while the rest of the file is read
        return pd.DataFrame({"user": chunk["user"].astype(np.int32), "item": chunk["item"].astype(np.int32),
                             "timestamp": np.floor(chunk["seconds"].to_numpy(float)).astype(np.int64),
                             "value": value.astype(np.float32), "event": event.map(self.events).astype(np.int16),
                             LINE: chunk[LINE].astype(np.int32)}).loc[keep.to_numpy(bool)]

    def _user_rows(self, chunk: pd.DataFrame, name: str) -> pd.DataFrame:
        rows = chunk["user_key"].map(self.user_rows)
        if self.users_given:
            return self._bad(chunk.assign(user=rows), rows.isna(), "unknown_user", name,
                             lambda r: f"user {r['user_key']!r}")
        for key in pd.unique(chunk.loc[rows.isna(), "user_key"]):  # users come from the events
            self.user_rows[key] = len(self.user_rows)
        return chunk.assign(user=chunk["user_key"].map(self.user_rows))


def _image_files(items: pd.DataFrame, root: Path | None, base: Path, column: str | None, name: str,
                 issues: DataIssues) -> tuple[dict, str]:
    """item_id -> image path for the items whose image file decodes, and a digest of those files. A path is read
    relative to `root` (image_root), else relative to `base` (the data folder) when the file is there; `column`:
    the mapped image column (None with image_pattern), of which at least one picture must be readable."""
    digest, found = hashlib.sha256(), {}
    refs = items.loc[items["image"].notna(), ["item_id", "image", LINE]]
    if column and not len(refs):
        raise DatasetError(f"{name}: the image column {column!r} is empty in every row; set "
                           "data.source.items.columns.image=null when there are no pictures")
    # the configured folders resolved first: either may be a symbolic link
    folders = [f for f in dict.fromkeys(f.resolve() for f in (root, base) if f is not None) if f.is_dir()]
    if len(refs) and not column and root is not None and not root.is_dir():  # e.g. Amazon metadata, no pictures
        issues.add("no_image_folder", f"{root} does not exist: {len(refs)} items have no picture")
        return found, digest.hexdigest()
    example = None  # (ref, path, problem) of the first picture that could not be read
    for item_id, ref, line in tqdm(refs.itertuples(index=False), total=len(refs), desc="checking images",
                                   unit=" images", mininterval=1, disable=None):
        if PurePath(ref).is_absolute() or ".." in PurePath(ref).parts:  # the data may not lead out of the folders
            issues.add("bad_image_path", f"{name}:{line}: {ref!r} leads out of the image folder")
            example = example or (ref, ref, "leads out of the image folder")
            continue
        path = next((f / ref for f in folders if (f / ref).is_file()), (folders[0] if folders else base) / ref)
        problem = image_problem(path)
        if problem:
            issues.add("missing_image" if problem == "file not found" else "corrupt_image", f"{name}:{line}: {ref}: "
                       f"{problem}")
            example = example or (ref, path, problem)
            continue
        digest.update(f"{ref}:{sha256_file(path)}".encode())
        found[int(item_id)] = path.resolve()
    if column and not found:
        ref, path, problem = example
        searched = " and ".join(map(str, folders)) or f"{root} (missing) and {base}"
        raise DatasetError(f"{name}: none of the {len(refs)} pictures of column {column!r} could be read under "
                           f"{searched}: e.g. {ref!r} -> {path}: {problem}. Set data.source.image_root to the folder "
                           "the paths are relative to, or data.source.items.columns.image=null")
    return found, digest.hexdigest()


def read_tabular(name: str, items, interactions, users=None, folder: str | None = None, image_root: str | None = None,
                 k_core: int = 0, min_rating: float | None = None, chunk_rows: int = 200_000,
                 category: str | None = None) -> RawDataset:
    """Reads a shop's files as the config maps them (conf/data/tabular.yaml documents every setting). Relative
    paths are read from `folder`; `category` (Amazon's) is only recorded in the manifest."""
    items_spec, events_spec, users_spec = _plain(items), _plain(interactions), _plain(users) if users else None
    # what defines the data (in the fingerprint: another mapping is another dataset), paths as configured
    settings = copy.deepcopy({"items": items_spec, "interactions": events_spec, "users": users_spec,
                              "k_core": int(k_core or 0), "min_rating": min_rating, "image_root": image_root})
    base = Path(folder) if folder else Path.cwd()
    for spec in (items_spec, events_spec, users_spec):
        if spec and spec.get("path"):
            try:
                spec["path"] = str(resolve_path(base / spec["path"]))
            except DatasetError as error:
                where = f"data.source.folder={folder}" if folder else "the working directory (data.source.folder unset)"
                raise DatasetError(f"{error} (relative paths are read from {where})") from error
    if events_spec.get("also"):
        events_spec["also"] = [str(resolve_path(base / store)) for store in events_spec["also"]]
    image_root = base / image_root if image_root else None  # null: the paths are relative to folder
    issues = DataIssues()
    item_attrs = _attribute_settings(items_spec, "items")
    user_attrs = _attribute_settings(users_spec, "users") if users_spec else ([], {}, [])
    item_table, items_path = read_items(items_spec, item_attrs, issues, chunk_rows)
    user_table, users_path = read_users(users_spec, user_attrs, issues, chunk_rows) if users_spec else (None, None)
    item_rows = dict(zip(item_table["source_id"], range(len(item_table))))
    user_rows = dict(zip(user_table["source_id"], range(len(user_table)))) if user_table is not None else {}
    reader = _EventReader(events_spec, item_rows, user_rows, user_table is not None, min_rating, issues)
    events, events_path = reader.read(events_spec, chunk_rows)
    events, merged = merge_repeats(events, events_path.name, issues)
    events, removed = k_core_filter(events, int(k_core or 0))
    if events.empty:
        raise DatasetError(f"no interactions left from {events_path} (see the data issues and filters: "
                           f"{issues.report()}; dropped {dict(reader.dropped)}; its events: "
                           f"{sorted(reader.seen)[:30]})")

    # canonical ids 1..N in file order, over what the filters kept
    keep_items = np.unique(events["item"]) if k_core else np.arange(len(item_table))
    item_table = item_table.iloc[keep_items].reset_index(drop=True)
    item_ids = np.full(len(item_rows), -1, dtype=np.int64)
    item_ids[keep_items] = np.arange(1, len(keep_items) + 1)
    user_keys = list(user_rows)  # insertion order: the users file, then first appearance in the events
    keep_users = np.unique(events["user"]) if (k_core or user_table is None) else np.arange(len(user_keys))
    user_ids = np.full(len(user_keys), -1, dtype=np.int64)
    user_ids[keep_users] = np.arange(1, len(keep_users) + 1)
    item_table.insert(0, "item_id", item_ids[keep_items])
    users_out = pd.DataFrame({"user_id": np.arange(1, len(keep_users) + 1, dtype=np.int64),
                              "source_id": [user_keys[u] for u in keep_users]})
    if user_table is not None:
        profiles = user_table.drop(columns=[LINE]).set_index("source_id")
        users_out = users_out.join(profiles, on="source_id")
    event_names = np.asarray(list(reader.events), dtype=object)
    interactions_out = pd.DataFrame({"user_id": user_ids[events["user"].to_numpy()],
                                     "item_id": item_ids[events["item"].to_numpy()],
                                     "timestamp": events["timestamp"].to_numpy(np.int64),
                                     "value": events["value"].to_numpy(np.float32),
                                     "event": event_names[events["event"].to_numpy()]})

    image_column = (items_spec.get("columns") or {}).get("image")
    image_files, image_digest = _image_files(item_table, image_root, base, image_column, items_path.name, issues)
    item_table["image"] = None  # write_dataset fills it for the images that decode
    inputs = {f"items:{items_path.name}": sha256_file(items_path),
              f"interactions:{events_path.name}": sha256_file(events_path)}
    for store in reader.stores:
        inputs[f"interactions:{store.name}"] = sha256_file(store)
    if users_path is not None:
        inputs[f"users:{users_path.name}"] = sha256_file(users_path)
    if image_files:
        inputs["images/"] = image_digest
    attributes = {"item_categorical": item_attrs[0], "item_multi": list(item_attrs[1]), "item_numeric": item_attrs[2],
                  "user_categorical": user_attrs[0], "user_numeric": user_attrs[2]}
    extra = {"ids": "source_id", "reader": settings, **({"category": category} if category else {}),
             "filtered": {**dict(sorted(reader.dropped.items())), "merged_repeats": merged, **removed}}
    return RawDataset(name, item_table.drop(columns=[LINE]), users_out, interactions_out, attributes, inputs, issues,
                      image_files, extra)
