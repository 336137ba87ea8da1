"""The generic reader (data=tabular): layouts, ids, times, events, filters and the bad-input contract."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from multimodal_rec.config import CONF_DIR
from multimodal_rec.data.prepare import prepare
from multimodal_rec.data.schema import DataIssues, DatasetError, fingerprint_of, load_dataset
from multimodal_rec.data.sources.example_shop import write_example_shop
from multimodal_rec.data.sources.interaction_filters import k_core_filter
from multimodal_rec.data.sources.table_values import epoch_seconds, multi_values, number
from multimodal_rec.data.sources.tabular import read_tabular


def source_config(data: str, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("prepare", [f"data={data}", *overrides]).data.source


@pytest.fixture(scope="module")
def shops(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shops")
    for layout in ("csv", "parquet", "amazon2023"):
        write_example_shop(root / layout, layout, n_items=60, n_users=30, seed=3)
    return {layout: root / layout for layout in ("csv", "parquet", "amazon2023")}


def _prepared(source, out: Path):
    prepare(source, out)
    return load_dataset(out)


# what the example shop's events and customers.csv hold (the base config names no events and no users file)
EXAMPLE_EVENTS_AND_USERS = ["data.source.interactions.event_weights={view:1,cart:2,purchase:3}",
                            "data.source.users={path:customers.csv,columns:{user_id:customer},categorical:[region],"
                            "numeric:[age]}"]
PARQUET = ["data.source.items.path=products.parquet",
           "data.source.interactions.path=events.parquet", "data.source.users=null"]


def test_csv_with_string_ids_iso_dates_events_and_pictures(shops, tmp_path):
    data = _prepared(source_config("tabular", f"data.source.folder={shops['csv']}", *EXAMPLE_EVENTS_AND_USERS),
                     tmp_path / "d")
    products = pd.read_csv(shops["csv"] / "products.csv")
    events = pd.read_csv(shops["csv"] / "events.csv")
    items = data.items.set_index("source_id")
    assert list(data.items["item_id"]) == list(range(1, len(products) + 1))  # canonical ids in file order
    assert list(data.items["source_id"]) == list(products["sku"])
    assert items.loc["SKU-000002", "text"].startswith(products.loc[1, "name"] + ".")
    missing_price = products["price"].isna()
    assert missing_price.any() and items.loc[products.loc[missing_price, "sku"], "price"].isna().all()
    assert data.manifest["issues"]["counts"] == {}  # a missing price is no error
    assert data.manifest["counts"]["items_with_image"] == products["image_file"].notna().sum()
    assert (data.root / data.items["image"].dropna().iloc[0]).is_file()
    # one interaction per (customer, sku): first time, highest weight (view 1 < cart 2 < purchase 3)
    weights = events["action"].map({"view": 1, "cart": 2, "purchase": 3})
    seconds = (pd.to_datetime(events["time"]) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    expected = events.assign(w=weights, t=seconds).groupby(["customer", "sku"]).agg(t=("t", "min"), w=("w", "max"))
    users = data.users.set_index("user_id")["source_id"]
    got = data.interactions.assign(customer=data.interactions["user_id"].map(users),
                                   sku=data.interactions["item_id"].map(data.items.set_index("item_id")["source_id"]))
    got = got.set_index(["customer", "sku"]).sort_index()
    assert len(got) == len(expected)
    assert (got["timestamp"] == expected.loc[got.index, "t"]).all()
    assert (got["value"] == expected.loc[got.index, "w"]).all()
    assert data.manifest["filtered"]["merged_repeats"] == len(events) - len(expected)
    assert set(data.users.columns) >= {"source_id", "age", "region"}
    assert data.attributes("item_categorical") == ["category", "brand"] and data.attributes("user_numeric") == ["age"]


def test_parquet_layout_reads_like_the_csv_one(shops, tmp_path):
    from_csv = _prepared(source_config("tabular", f"data.source.folder={shops['csv']}", "data.source.users=null"),
                         tmp_path / "csv")
    from_parquet = _prepared(source_config("tabular", f"data.source.folder={shops['parquet']}", *PARQUET),
                             tmp_path / "pq")
    for table in ("items", "interactions", "users"):
        left, right = getattr(from_csv, table), getattr(from_parquet, table)
        pd.testing.assert_frame_equal(left.drop(columns="image", errors="ignore"),
                                      right.drop(columns="image", errors="ignore"), check_dtype=False)


def test_amazon_2023_jsonl_gz_with_a_category_path_missing_prices_and_ratings(shops, tmp_path):
    folder = shops["amazon2023"]
    data = _prepared(source_config("amazon2023", f"data.source.folder={folder}"), tmp_path / "a")
    with gzip.open(folder / "meta_All_Beauty.jsonl.gz", "rt") as handle:
        meta = [json.loads(line) for line in handle]
    first = data.items.iloc[0]
    assert first["source_id"] == meta[0]["parent_asin"] and list(first["categories"]) == meta[0]["categories"]
    assert first["text"].startswith(meta[0]["title"]) and meta[0]["features"][0] in first["text"]
    assert data.items["price"].isna().sum() == sum(m["price"] is None for m in meta)
    assert data.manifest["source"] == "amazon2023_All_Beauty"
    assert set(data.interactions["event"]) == {"rating"} and data.interactions["value"].isin([2, 4, 5]).all()
    # pictures keyed by parent_asin; items without one are reported and kept
    assert data.manifest["counts"]["items_with_image"] + data.manifest["issues"]["counts"]["missing_image"] == 60
    amazon = ["data.source.folder=" + str(folder)]
    liked = _prepared(source_config("amazon2023", *amazon, "data.source.min_rating=4"), tmp_path / "b")
    assert (liked.interactions["value"] >= 4).all() and liked.manifest["filtered"]["below_min_rating"] > 0
    cored = _prepared(source_config("amazon2023", *amazon, "data.source.k_core=3"), tmp_path / "c")
    assert cored.interactions.groupby("user_id").size().min() >= 3
    assert cored.interactions.groupby("item_id").size().min() >= 3
    assert cored.manifest["filtered"]["k_core_removed_interactions"] > 0
    assert len(cored.items) == cored.interactions["item_id"].nunique()


def test_k_core_is_iterated_until_stable():
    # user 4 (one interaction) goes first; then item 9 has one user left, then user 3 has one item left
    events = pd.DataFrame({"user": [1, 1, 2, 2, 3, 3, 4], "item": [5, 8, 5, 8, 8, 9, 9]})
    kept, removed = k_core_filter(events, 2)
    assert sorted(map(tuple, kept[["user", "item"]].to_numpy())) == [(1, 5), (1, 8), (2, 5), (2, 8)]
    assert removed["k_core_rounds"] == 4 and removed["k_core_removed_users"] == 2


def test_times_numbers_and_lists():
    times = pd.Series([1700000000, "1700000000000", "2023-11-14T22:13:20Z", "2023-11-14", "2023-11-14T23:13:20+01:00",
                       "yesterday", None])
    seconds = epoch_seconds(times)
    assert seconds[:3].tolist() == [1700000000] * 3 and seconds[3] == 1699920000 and seconds[4] == 1700000000
    assert np.isnan(seconds[5]) and np.isnan(seconds[6])
    assert number("$1,299.00") == 1299.0 and np.isnan(number("None")) and number("cheap") is None
    assert multi_values("Beauty > Skin Care > Serums", " > ") == ["Beauty", "Skin Care", "Serums"]
    assert multi_values(["a", "b", "a", None], None) == ["a", "b"] and multi_values(None, ",") == []


def test_chunked_reading_and_a_second_preparation_give_the_same_dataset(shops, tmp_path):
    whole = prepare(source_config("tabular", f"data.source.folder={shops['csv']}"), tmp_path / "a")
    again = prepare(source_config("tabular", f"data.source.folder={shops['csv']}"), tmp_path / "b")
    chunked = prepare(source_config("tabular", f"data.source.folder={shops['csv']}", "data.source.chunk_rows=7"),
                      tmp_path / "c")
    assert whole["fingerprint"] == again["fingerprint"] == chunked["fingerprint"]
    for name in ("items.parquet", "interactions.parquet", "users.parquet"):
        assert pd.read_parquet(tmp_path / "a" / name).equals(pd.read_parquet(tmp_path / "c" / name))


def _bad_shop(folder: Path) -> dict:
    """A small shop whose files hold one of each bad input."""
    (folder / "pics").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(folder / "pics" / "a.png")
    (folder / "pics" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "items.csv").write_text(
        "\ufeffid,title,pic,price\n"  # a byte-order mark, as spreadsheets write
        "A-1,Red mug,a.png,9.5\n"
        "B-2,Blue mug,broken.jpg,$12\n"
        "C-3,Green mug,missing.png,\n"
        "A-1,Red mug again,a.png,9.5\n"      # line 5: a duplicate item
        "D-4,Odd,,cheap\n"                    # line 6: a price that is no number
        "E-5,too,many,fields,here\n")         # line 7: malformed
    (folder / "events.tsv").write_text(
        "user\titem\tts\n"
        "u1\tA-1\t2024-01-01T10:00:00Z\n"
        "u1\tB-2\t2024-01-01T10:05:00Z\n"
        "u1\tB-2\t2024-01-01T10:05:00Z\n"    # line 4: a duplicate row
        "u2\tZ-9\t2024-01-02T10:00:00Z\n"    # line 5: an unknown item
        "u2\tC-3\tnot a time\n"              # line 6: a bad timestamp
        "u2\tC-3\n"                          # line 7: malformed
        "u2\tD-4\t1704189600\n"
        "u2\tA-1\t1704189700000\n")
    return {"items": {"path": str(folder / "items.csv"),
                      "columns": {"item_id": "id", "title": "title", "text": ["title"], "image": "pic"},
                      "numeric": ["price"]},
            "interactions": {"path": str(folder / "events.tsv"),
                             "columns": {"user_id": "user", "item_id": "item", "timestamp": "ts"}},
            "image_root": str(folder / "pics")}


def test_bad_input_is_counted_with_file_and_line_and_nothing_else_is_lost(tmp_path):
    raw = read_tabular("bad", **_bad_shop(tmp_path))
    counts, examples = raw.issues.counts, raw.issues.examples
    assert dict(counts) == {"duplicate_item": 1, "bad_number": 1, "malformed_row": 3, "corrupt_image": 1,
                            "missing_image": 1, "duplicate_interaction": 1, "unknown_item": 1}
    assert examples["duplicate_item"] == ["items.csv:5: 'A-1' seen before, first kept"]
    assert examples["bad_number"] == ["items.csv:6: price='cheap'"]
    assert any(e.startswith("items.csv:7:") for e in examples["malformed_row"])
    assert any(e.startswith("events.tsv:6:") and "not a time" in e for e in examples["malformed_row"])
    assert any(e.startswith("events.tsv:7:") for e in examples["malformed_row"])
    assert examples["duplicate_interaction"] == ["events.tsv:4: repeats an earlier row"]
    assert examples["unknown_item"] == ["events.tsv:5: item 'Z-9'"]
    assert examples["corrupt_image"][0].startswith("items.csv:3: broken.jpg")
    assert examples["missing_image"][0].startswith("items.csv:4: missing.png")
    assert list(raw.items["source_id"]) == ["A-1", "B-2", "C-3", "D-4"]  # nothing else lost
    assert list(raw.items["price"].fillna(-1)) == [9.5, 12.0, -1, -1]
    assert raw.image_files == {1: (tmp_path / "pics" / "a.png").resolve()}  # the others keep no picture
    pairs = set(zip(raw.interactions["user_id"], raw.interactions["item_id"]))
    assert pairs == {(1, 1), (1, 2), (2, 4), (2, 1)}
    assert sorted(raw.interactions["timestamp"]) == [1704103200, 1704103500, 1704189600, 1704189700]


def test_a_missing_column_is_one_clear_error_naming_it_and_the_file(tmp_path):
    settings = _bad_shop(tmp_path)
    settings["interactions"]["columns"]["timestamp"] = "time"
    with pytest.raises(DatasetError, match=r"events.tsv has no column 'time'.*its columns: \['user', 'item', 'ts'\]"):
        read_tabular("bad", **settings)
    settings = _bad_shop(tmp_path / "again")
    settings["items"]["columns"]["title"] = "name"
    with pytest.raises(DatasetError, match="items.csv has no column 'name'"):
        read_tabular("bad", **settings)
    settings["items"]["path"] = str(tmp_path / "nowhere.csv")
    with pytest.raises(DatasetError, match="input file not found: .*nowhere.csv"):
        read_tabular("bad", **settings)


def test_the_prepare_command_reports_issues_and_exits_2_on_a_missing_column(tmp_path):
    import subprocess
    import sys

    settings = _bad_shop(tmp_path)
    overrides = [f"data.source.items.path={settings['items']['path']}", "data.source.items.columns.item_id=id",
                 "data.source.items.columns.title=title", "data.source.items.columns.text=[title]",
                 "data.source.items.columns.image=pic", "data.source.items.categorical=[]",
                 "data.source.items.numeric=[price]", f"data.source.interactions.path={tmp_path / 'events.tsv'}",
                 "data.source.interactions.columns.user_id=user", "data.source.interactions.columns.item_id=item",
                 "data.source.interactions.columns.timestamp=ts", "data.source.interactions.columns.event=null",
                 "data.source.interactions.event_weights=null", "data.source.users=null",
                 f"data.source.folder={tmp_path}", f"data.source.image_root={tmp_path / 'pics'}"]
    command = [sys.executable, "-m", "multimodal_rec.data.prepare", "data=tabular", f"out={tmp_path / 'out'}"]
    done = subprocess.run([*command, *overrides], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unknown_item': 1" in done.stdout and load_dataset(tmp_path / "out").manifest["counts"]["items"] == 4
    broken = [o.replace("timestamp=ts", "timestamp=when") for o in overrides]
    done = subprocess.run([*command, *broken], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "events.tsv has no column 'when'" in done.stderr


def test_issues_keep_a_few_examples_and_the_full_count():
    issues = DataIssues(max_examples=2)
    issues.add_many("x", 5, (f"line {i}" for i in range(5)))
    assert issues.counts["x"] == 5 and issues.examples["x"] == ["line 0", "line 1"]


def test_amazon_2018_layout(tmp_path):
    meta = [{"asin": "B001", "title": "Serum", "description": ["Light.", "Daily."], "feature": ["30 ml"],
             "category": ["Beauty", "Skin Care"], "brand": "Acme", "main_cat": "All Beauty", "price": "$12.99"},
            {"asin": "B002", "title": "Cream", "description": [], "category": [], "brand": "", "price": ""}]
    reviews = [{"reviewerID": "A1", "asin": "B001", "overall": 5.0, "unixReviewTime": 1500000000},
               {"reviewerID": "A1", "asin": "B002", "overall": 3.0, "unixReviewTime": 1500000100},
               {"reviewerID": "A2", "asin": "B002", "overall": 4.0, "unixReviewTime": 1500000200}]
    for name, records in (("meta_Beauty.json.gz", meta), ("Beauty.json.gz", reviews)):
        with gzip.open(tmp_path / name, "wt") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
    data = _prepared(source_config("amazon2018", f"data.source.folder={tmp_path}", "data.source.category=Beauty"),
                     tmp_path / "out")
    items = data.items.set_index("source_id")
    assert items.loc["B001", "price"] == 12.99 and np.isnan(items.loc["B002", "price"])
    assert list(items.loc["B001", "category"]) == ["Beauty", "Skin Care"] and items.loc["B001", "brand"] == "Acme"
    assert items.loc["B001", "text"] == "Serum. 30 ml. Light. Daily."
    assert list(data.interactions["value"]) == [5.0, 3.0, 4.0] and data.manifest["source"] == "amazon2018_Beauty"
    assert data.manifest["issues"]["counts"] == {"no_image_folder": 1}  # no pictures at all: said once


def test_forgetting_users_by_the_shops_own_ids(shops, tmp_path):
    from multimodal_rec.data.forget import forget, has_shop_ids, read_user_ids

    data = _prepared(source_config("tabular", f"data.source.folder={shops['csv']}"), tmp_path / "d")
    victim = str(data.users["source_id"].iloc[2])
    (tmp_path / "forget.txt").write_text(f"{victim}\nnobody-at-all\n")
    assert has_shop_ids(data.root)
    manifest = forget(data.root, read_user_ids(tmp_path / "forget.txt", shop_ids=True), tmp_path / "after")
    after = load_dataset(tmp_path / "after")
    assert manifest["forgotten_users"] == 1 and victim not in set(after.users["source_id"])
    assert len(after.interactions) == len(data.interactions) - (data.interactions["user_id"] == 3).sum()


def test_another_column_mapping_is_another_dataset(shops, tmp_path):
    first = prepare(source_config("tabular", f"data.source.folder={shops['csv']}"), tmp_path / "a")
    other = prepare(source_config("tabular", f"data.source.folder={shops['csv']}",
                                  "data.source.items.columns.text=[description,name]"), tmp_path / "b")
    assert first["counts"] == other["counts"] and first["inputs"] == other["inputs"]
    assert first["fingerprint"] != other["fingerprint"]
    assert fingerprint_of(first, attributes=False) != fingerprint_of(other, attributes=False)  # nor cached texts


def test_with_a_users_file_events_of_unknown_users_are_reported(tmp_path):
    settings = _bad_shop(tmp_path)
    (tmp_path / "users.csv").write_text("uid,age\nu1,31\nu1,32\nu3,40\n")  # u1 twice; u2 missing; u3 no events
    settings["users"] = {"path": str(tmp_path / "users.csv"), "columns": {"user_id": "uid"}, "numeric": ["age"]}
    raw = read_tabular("bad", **settings)
    assert raw.issues.counts["unknown_user"] == 2 and raw.issues.counts["duplicate_user"] == 1
    assert raw.issues.examples["duplicate_user"] == ["users.csv:3: 'u1' seen before, first kept"]
    assert list(raw.users["source_id"]) == ["u1", "u3"] and list(raw.users["age"]) == [31.0, 40.0]
    assert set(raw.interactions["user_id"]) == {1}
