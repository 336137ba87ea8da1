"""A server's event store read by the next `prepare` (interactions.also): the same dataset as the same events in
the shop's own event file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from multimodal_rec.config import CONF_DIR
from multimodal_rec.data.prepare import prepare
from multimodal_rec.data.schema import load_dataset
from multimodal_rec.data.sources.example_shop import write_example_shop
from multimodal_rec.serving.event_store import Event, EventStore

SHOP = ["data.source.interactions.event_weights={view:1,cart:2,purchase:3}"]


def _source(folder: Path, *overrides: str):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("prepare", ["data=tabular", f"data.source.folder={folder}", *SHOP, *overrides]).data.source


def _interactions(folder: Path, out: Path, *overrides: str) -> pd.DataFrame:
    prepare(_source(folder, *overrides), out)
    data = load_dataset(out)
    users = data.users.set_index("user_id")["source_id"] if "source_id" in data.users else None
    items = data.items.set_index("item_id")["source_id"]
    table = data.interactions.assign(user=lambda t: t["user_id"].map(users) if users is not None else t["user_id"],
                                     item=lambda t: t["item_id"].map(items))
    return table[["user", "item", "timestamp", "value", "event"]].sort_values(
        ["user", "timestamp", "item"]).reset_index(drop=True)


def test_the_event_store_as_a_source_gives_the_same_dataset_as_the_same_events_in_a_csv(tmp_path):
    shop = tmp_path / "shop"
    write_example_shop(shop, "csv", n_items=60, n_users=30, seed=3)
    events = pd.read_csv(shop / "events.csv")
    cut = int(len(events) * 0.8)
    later = events.iloc[cut:]
    events.iloc[:cut].to_csv(shop / "events_before.csv", index=False)  # what the shop's file held at export
    seconds = pd.to_datetime(later["time"], utc=True).map(pd.Timestamp.timestamp)
    store = EventStore(tmp_path / "events.sqlite")  # what POST /events took since, in the shop's own ids
    store.add([Event(customer, 0, sku, action, 1.0, float(t), None)
               for customer, sku, action, t in zip(later["customer"], later["sku"], later["action"], seconds)], 0.0)
    store.close()
    from_store = _interactions(shop, tmp_path / "a", "data.source.interactions.path=events_before.csv",
                               f"data.source.interactions.also=[{tmp_path / 'events.sqlite'}]")
    from_csv = _interactions(shop, tmp_path / "b")
    assert len(from_store) > 100 and len(from_store) == len(from_csv)  # repeats of a user-item pair merged
    pd.testing.assert_frame_equal(from_store, from_csv)
