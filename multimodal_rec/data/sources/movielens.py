"""Reader of MovieLens-100k (official files), optionally with posters and IMDb details (plot line, rating,
number of ratings, length, age rating, director).

Bad input is counted and reported, never fatal unless a required file is missing: a malformed
line is dropped (file:line recorded), an interaction with an unknown user or item is dropped, a
duplicate (user, item) rating keeps its first occurrence, a corrupt or unreadable poster leaves
the item without an image.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from multimodal_rec.data.image_check import image_problem
from multimodal_rec.data.schema import DataIssues, DatasetError, RawDataset, sha256_file

N_GENRE_FLAGS = 19
YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
LENGTH = re.compile(r"(?:(\d+)h)?\s*(?:(\d+)min)?")
COUNT = re.compile(r"([\d.]+)([KM]?)")
CAST_IN_TEXT = 3  # top-billed actors named in the item text with `detail_text`
# IMDb details that can become item attributes, by the kind of attribute each is
DETAIL_KINDS = {"imdb_rating": "item_numeric", "imdb_votes": "item_numeric", "minutes": "item_numeric",
                "age_rating": "item_categorical", "director": "item_multi"}


def _lines(path: Path, encoding: str):
    with open(path, encoding=encoding, errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _read_genres(path: Path) -> list[str]:
    names = {}
    for _, line in _lines(path, "latin-1"):
        name, _, index = line.partition("|")
        names[int(index)] = name
    return [names[i] for i in sorted(names)]


def _read_items(path: Path, genre_names: list[str], issues: DataIssues) -> pd.DataFrame:
    rows = []
    for number, line in _lines(path, "latin-1"):
        fields = line.split("|")
        flags = fields[5:]
        if len(fields) != 5 + N_GENRE_FLAGS or not fields[0].isdigit() or not all(f in "01" for f in flags):
            issues.add("malformed_line", f"{path.name}:{number}")
            continue
        title = fields[1].strip()
        year_match = YEAR_IN_TITLE.search(title)
        release = fields[2].strip()
        year = float(year_match.group(1)) if year_match else float(release[-4:]) if release[-4:].isdigit() else np.nan
        genres = [genre_names[i] for i, flag in enumerate(flags) if flag == "1"]
        rows.append((int(fields[0]), title, genres, year))
    items = pd.DataFrame(rows, columns=["item_id", "title", "genres", "year"])
    dup = items["item_id"].duplicated()
    for item_id in items.loc[dup, "item_id"]:
        issues.add("duplicate_item", f"{path.name}: item {item_id}")
    return items[~dup].reset_index(drop=True)


def _read_users(path: Path, issues: DataIssues) -> pd.DataFrame:
    rows = []
    for number, line in _lines(path, "latin-1"):
        fields = line.split("|")
        if len(fields) != 5 or not fields[0].isdigit() or not fields[1].isdigit():
            issues.add("malformed_line", f"{path.name}:{number}")
            continue
        rows.append((int(fields[0]), int(fields[1]), fields[2], fields[3]))
    users = pd.DataFrame(rows, columns=["user_id", "age", "gender", "occupation"])
    dup = users["user_id"].duplicated()
    for user_id in users.loc[dup, "user_id"]:
        issues.add("duplicate_user", f"{path.name}: user {user_id}")
    return users[~dup].reset_index(drop=True)


def _read_ratings(path: Path, items: set, users: set, issues: DataIssues) -> pd.DataFrame:
    user_col, item_col, value_col, time_col = [], [], [], []
    seen = set()
    for number, line in tqdm(_lines(path, "latin-1"), desc=f"reading {path.name}", unit=" lines", mininterval=1):
        fields = line.split("\t")
        if len(fields) != 4 or not all(f.strip().lstrip("-").isdigit() for f in fields):
            issues.add("malformed_line", f"{path.name}:{number}: {line[:60]!r}")
            continue
        user, item, rating, stamp = (int(f) for f in fields)
        if user not in users or item not in items:
            issues.add("unknown_id", f"{path.name}:{number}: user {user} item {item}")
            continue
        if (user, item) in seen:
            issues.add("duplicate_interaction", f"{path.name}:{number}: user {user} item {item}")
            continue
        seen.add((user, item))
        user_col.append(user)
        item_col.append(item)
        value_col.append(rating)
        time_col.append(stamp)
    return pd.DataFrame(
        {
            "user_id": np.asarray(user_col, dtype=np.int64),
            "item_id": np.asarray(item_col, dtype=np.int64),
            "timestamp": np.asarray(time_col, dtype=np.int64),
            "value": np.asarray(value_col, dtype=np.float32),
            "event": "rating",
        }
    )


def _read_details(path: Path, issues: DataIssues) -> tuple[dict[int, str], pd.DataFrame]:
    """Plot lines by movie id, and a table (movie_id + DETAIL_KINDS columns; missing values as NaN/None)."""
    try:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read IMDb details from {path}: {error}") from error
    plots, rows = {}, []
    for number, record in enumerate(records):
        movie_id = record.get("movie_id") if isinstance(record, dict) else None
        if not isinstance(movie_id, int):
            issues.add("malformed_record", f"{path.name}: record {number}")
            continue
        text = record.get("description")
        if isinstance(text, str) and text.strip():
            plots[movie_id] = text.strip()
        else:
            issues.add("malformed_record", f"{path.name}: record {number}")
        rating = record.get("rating")
        directors = record.get("director")
        cast = record.get("cast")
        rows.append((movie_id, float(rating) if isinstance(rating, (int, float)) else np.nan,
                     _count(record.get("num_review")), _minutes(record.get("movie_length")),
                     record.get("age_rating") if isinstance(record.get("age_rating"), str) else None,
                     _names(directors), _names(cast)[:CAST_IN_TEXT]))
    details = pd.DataFrame(rows, columns=["movie_id", *DETAIL_KINDS, "cast"]).drop_duplicates("movie_id")
    return plots, details


def _names(values) -> list[str]:
    return [v for v in values if isinstance(v, str) and v.strip()] if isinstance(values, list) else []


def _count(text) -> float:
    """IMDb's "280K" / "1.1M" / "950" -> a number (NaN when absent or unreadable)."""
    match = COUNT.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match:
        return np.nan
    return float(match.group(1)) * {"": 1, "K": 1e3, "M": 1e6}[match.group(2)]


def _minutes(text) -> float:
    """ "1h 46min" -> 106.0; NaN for anything else (some records hold a year or "Unrated" there)."""
    match = LENGTH.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match or not any(match.groups()):
        return np.nan
    return 60.0 * int(match.group(1) or 0) + int(match.group(2) or 0)


def _add_details(items: pd.DataFrame, table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """The chosen detail columns of `table` (a row per item, in the items' order) joined to the items. Directors
    of a single film are dropped: as attributes they would only name that film again."""
    for name in names:
        values = table[name].to_numpy()
        if name == "director":
            films = pd.Series([d for ds in values if isinstance(ds, list) for d in ds]).value_counts()
            shared = set(films.index[films >= 2])
            values = [[d for d in ds if d in shared] if isinstance(ds, list) else [] for ds in values]
        items[name] = values
    return items


def _valid_posters(folder: Path, item_ids, issues: DataIssues) -> tuple[dict, str]:
    """Posters that decode; returns item_id -> path and a checksum over the folder's files."""
    found = {}
    digest = hashlib.sha256()
    for item_id in tqdm(item_ids, desc="checking posters", unit=" items", mininterval=1):
        path = folder / f"{item_id}.jpg"
        if not path.is_file():
            continue
        digest.update(f"{path.name}:{sha256_file(path)}".encode())
        problem = image_problem(path)
        if problem:
            issues.add("corrupt_image", f"{path.name}: {problem}")
            continue
        found[item_id] = path
    return found, digest.hexdigest()


def _item_text(title: str, genres: list[str], plot: str | None, directors=None, cast=None) -> str:
    text = f"{title}. Genres: {', '.join(genres) if genres else 'unknown'}."
    text = f"{text} {plot}" if plot else text
    if isinstance(directors, list) and directors:
        text += f" Directed by {', '.join(directors)}."
    if isinstance(cast, list) and cast:
        text += f" Starring {', '.join(cast)}."
    return text


def read_movielens(
    root: str, posters: str | None = None, details: str | None = None, name: str = "ml100k",
    detail_attributes: tuple | list = (), detail_text: bool = False,
) -> RawDataset:
    """Reads `root` (u.data, u.item, u.user, u.genre) and, when given, posters and IMDb details: the plot line
    joins the text; `detail_attributes` (names in DETAIL_KINDS) become item attributes; `detail_text` adds the
    director(s) and the top-billed actors to the text."""
    unknown = sorted(set(detail_attributes) - set(DETAIL_KINDS))
    if unknown:
        raise DatasetError(f"{name}: unknown detail_attributes {unknown}; known: {sorted(DETAIL_KINDS)}")
    if (detail_attributes or detail_text) and not details:
        raise DatasetError(f"{name}: detail_attributes / detail_text need `details` (the IMDb file)")
    root_path = Path(root)
    required = [root_path / f for f in ("u.data", "u.item", "u.user", "u.genre")]
    if posters:
        required.append(Path(posters))
    if details:
        required.append(Path(details))
    missing = [str(p) for p in required if not p.exists()]
    if missing:
        raise DatasetError(f"{name}: required input not found: {', '.join(missing)}")

    issues = DataIssues()
    genre_names = _read_genres(root_path / "u.genre")
    items = _read_items(root_path / "u.item", genre_names, issues)
    users = _read_users(root_path / "u.user", issues)
    interactions = _read_ratings(root_path / "u.data", set(items["item_id"]), set(users["user_id"]), issues)
    inputs = {f"ml-100k/{p.name}": sha256_file(p) for p in required[:4]}

    plots: dict[int, str] = {}
    directors = cast = [None] * len(items)  # named in the text with `detail_text`
    if details:
        plots, detail_table = _read_details(Path(details), issues)
        inputs[Path(details).name] = sha256_file(details)
        detail_table = detail_table.set_index("movie_id").reindex(items["item_id"])  # a row per item, in order
        items = _add_details(items, detail_table, list(detail_attributes))
        if detail_text:
            directors, cast = detail_table["director"].tolist(), detail_table["cast"].tolist()
    image_files: dict = {}
    if posters:
        image_files, inputs["posters/"] = _valid_posters(Path(posters), items["item_id"].tolist(), issues)

    items["plot"] = items["item_id"].map(plots)
    items["text"] = [_item_text(*row) for row in zip(items["title"], items["genres"], items["plot"], directors, cast)]
    items["image"] = None
    items = items.drop(columns="plot")
    chosen = {kind: [n for n in detail_attributes if DETAIL_KINDS[n] == kind] for kind in set(DETAIL_KINDS.values())}
    attributes = {
        "item_categorical": chosen["item_categorical"],
        "item_multi": ["genres", *chosen["item_multi"]],
        "item_numeric": ["year", *chosen["item_numeric"]],
        "user_categorical": ["gender", "occupation"],
        "user_numeric": ["age"],
    }
    extra = {"items_with_plot": len(set(plots) & set(items["item_id"]))}
    if detail_text:  # the texts change, not the inputs: the fingerprint must tell the two apart
        extra["reader"] = {"detail_text": True}
    return RawDataset(name, items, users, interactions, attributes, inputs, issues, image_files, extra)
