"""Writes the generated shop as a shop's own files would look: string SKUs and customer ids, a products
table with picture files, an event log of views, carts and purchases. For trying `data=tabular` (README
"Your own data"), for its tests and for the prepare benchmark.

    python -m multimodal_rec.data.sources.example_shop out=myshop            # CSV, ISO dates, JPEG files
    python -m multimodal_rec.data.sources.example_shop out=myshop layout=parquet
    python -m multimodal_rec.data.sources.example_shop out=amz layout=amazon2023 category=All_Beauty

Layouts: `csv` (products.csv, events.csv with ISO times, customers.csv, images/), `parquet` (the same as
Parquet, epoch milliseconds), `amazon2023` (meta_<category>.jsonl.gz and <category>.jsonl.gz in the McAuley
lab's 2023 shape: parent_asin, a category path list, a price that is sometimes missing, ratings, epoch ms;
images/<parent_asin>.jpg).
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from multimodal_rec.data.sources.synthetic import read_synthetic
from multimodal_rec.data.synthetic_images import render_synthetic_image

LAYOUTS = ("csv", "parquet", "amazon2023")
EVENTS = ("view", "cart", "purchase")


def _shop_tables(n_items: int, n_users: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    raw = read_synthetic(n_items=n_items, n_users=n_users, seed=seed)
    rng = np.random.default_rng(seed + 1)
    items = raw.items.assign(sku=[f"SKU-{i:06d}" for i in raw.items["item_id"]])
    items["price"] = items["price"].where(rng.random(len(items)) > 0.1)  # some prices missing
    users = raw.users.assign(customer=[f"c{u:05d}-{(u * 7919) % 10007:04x}" for u in raw.users["user_id"]])
    events = raw.interactions[["user_id", "item_id", "timestamp"]].copy()
    # each purchase of the generator becomes a view, then sometimes a cart, then sometimes the purchase
    stage = rng.choice(3, size=len(events), p=[0.5, 0.2, 0.3])
    rows = [events.assign(event="view")]
    for level, name in ((1, "cart"), (2, "purchase")):
        later = events[stage >= level].assign(event=name)
        later["timestamp"] = later["timestamp"] + 30 * level
        rows.append(later)
    events = pd.concat(rows, ignore_index=True).sort_values(["timestamp", "user_id"], kind="stable")
    events["sku"] = events["item_id"].map(items.set_index("item_id")["sku"])
    events["customer"] = events["user_id"].map(users.set_index("user_id")["customer"])
    return items, users, events.reset_index(drop=True)


def _write_images(items: pd.DataFrame, folder: Path, name_of, size: int = 64) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for item_id, ref, key in tqdm(items[["item_id", "image", "key"]].itertuples(index=False), total=len(items),
                                  desc="writing pictures", disable=None, mininterval=1):
        if isinstance(ref, str):
            names[item_id] = name_of(key)
            render_synthetic_image(ref, size).save(folder / names[item_id], quality=90)
    return names


def write_example_shop(out: str | Path, layout: str = "csv", n_items: int = 300, n_users: int = 150, seed: int = 0,
                       images: bool = True, category: str = "All_Beauty") -> dict:
    """Writes the files of `layout` under `out` -> {role: path} of what was written."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items, users, events = _shop_tables(n_items, n_users, seed)
    if layout == "amazon2023":
        return _write_amazon(out, items, events, images, category)
    items = items.assign(key=items["sku"])
    pictures = _write_images(items, out / "images", lambda key: f"{key}.jpg") if images else {}
    products = pd.DataFrame({"sku": items["sku"], "name": items["title"], "description": items["text"],
                             "image_file": items["item_id"].map(pictures), "category": items["category"],
                             "brand": items["brand"], "price": items["price"]})
    customers = users[["customer", "age", "region"]]
    log = events[["customer", "sku", "timestamp", "event"]].rename(columns={"timestamp": "time", "event": "action"})
    if layout == "csv":
        log["time"] = pd.to_datetime(log["time"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        paths = {"items": out / "products.csv", "interactions": out / "events.csv", "users": out / "customers.csv"}
        products.to_csv(paths["items"], index=False)
        log.to_csv(paths["interactions"], index=False)
        customers.to_csv(paths["users"], index=False)
    else:
        log["time"] = log["time"].astype(np.int64) * 1000
        paths = {"items": out / "products.parquet", "interactions": out / "events.parquet"}
        products.to_parquet(paths["items"], index=False)
        log.to_parquet(paths["interactions"], index=False)
    return {**paths, "images": out / "images"} if images else paths


def _write_amazon(out: Path, items: pd.DataFrame, events: pd.DataFrame, images: bool, category: str) -> dict:
    items = items.assign(key=[f"B0{i:08X}" for i in items["item_id"]])
    asin = items.set_index("item_id")["key"]
    if images:
        _write_images(items, out / "images", lambda key: f"{key}.jpg")
    meta = out / f"meta_{category}.jsonl.gz"
    with gzip.open(meta, "wt", encoding="utf-8") as handle:
        for row in items.itertuples(index=False):
            price = None if pd.isna(row.price) else round(float(row.price), 2)
            record = {"main_category": category.replace("_", " "), "title": row.title, "average_rating": 4.2,
                      "rating_number": int(row.sales), "features": [f"Made by {row.brand}"],
                      "description": [row.text], "price": price, "images": [], "videos": [], "store": row.brand,
                      "categories": [category.replace("_", " "), row.category], "details": {}, "parent_asin": row.key,
                      "bought_together": None}
            handle.write(json.dumps(record) + "\n")
    reviews = out / f"{category}.jsonl.gz"
    purchases = events[events["event"] == "purchase"]
    rng = np.random.default_rng(0)
    with gzip.open(reviews, "wt", encoding="utf-8") as handle:
        for row in purchases.itertuples(index=False):
            record = {"rating": float(rng.choice([2.0, 4.0, 5.0], p=[0.1, 0.4, 0.5])), "title": "ok", "text": "fine",
                      "images": [], "asin": asin[row.item_id], "parent_asin": asin[row.item_id],
                      "user_id": f"AG{row.user_id:010d}", "timestamp": int(row.timestamp) * 1000,
                      "helpful_vote": 0, "verified_purchase": True}
            handle.write(json.dumps(record) + "\n")
    return {"items": meta, "interactions": reviews, **({"images": out / "images"} if images else {})}


def main(argv: list[str]) -> None:
    settings = dict(arg.split("=", 1) for arg in argv)
    unknown = set(settings) - {"out", "layout", "n_items", "n_users", "seed", "images", "category"}
    if unknown or "out" not in settings:
        sys.exit(f"usage: python -m multimodal_rec.data.sources.example_shop out=<dir> [layout={'|'.join(LAYOUTS)}] "
                 "[n_items=300] [n_users=150] [seed=0] [images=true] [category=All_Beauty]; "
                 f"unknown: {sorted(unknown)}")
    typed = {k: int(v) for k, v in settings.items() if k in ("n_items", "n_users", "seed")}
    written = write_example_shop(settings["out"], settings.get("layout", "csv"), images=settings.get(
        "images", "true").lower() != "false", category=settings.get("category", "All_Beauty"), **typed)
    for role, path in written.items():
        print(f"{role}: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
