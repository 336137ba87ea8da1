"""data=tabular settings a shop writes are what is read: event_weights replace the default (no default events),
users are optional, picture paths are found whether or not they name their folder, a symlinked image folder is
read, and a mapped image column of which no picture can be read stops prepare."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from multimodal_rec.config import CONF_DIR
from multimodal_rec.data.prepare import prepare
from multimodal_rec.data.schema import DatasetError, load_dataset
from multimodal_rec.data.sources.example_shop import write_example_shop
from multimodal_rec.data.sources.tabular import read_tabular

MYSHOP = """\
defaults:
  - tabular
  - _self_

name: myshop
source:
  interactions:
    event_weights: {purchase: 1}
"""


@pytest.fixture(scope="module")
def example_shop(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shop") / "shop"
    write_example_shop(folder, "csv", n_items=40, n_users=20, seed=4)
    (folder / "customers.csv").unlink()  # a shop with two files
    return folder


@pytest.fixture()
def shop(example_shop, tmp_path) -> Path:
    """A copy of the example shop to change."""
    return Path(shutil.copytree(example_shop, tmp_path / "shop", symlinks=True))


def source_config(*overrides: str, search: Path | None = None):
    extra = [f"hydra.searchpath=[file://{search}]"] if search else []
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("prepare", [*extra, *overrides]).data.source


def _prepared(source, out: Path):
    prepare(source, out)
    return load_dataset(out)


def _images_named_with_their_folder(shop: Path, folder: str) -> None:
    products = pd.read_csv(shop / "products.csv")
    products["image_file"] = products["image_file"].map(lambda name: f"{folder}/{name}", na_action="ignore")
    products.to_csv(shop / "products.csv", index=False)


def test_event_weights_a_shop_writes_replace_the_default(shop, tmp_path):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "myshop.yaml").write_text(MYSHOP)
    source = source_config("data=myshop", f"data.source.folder={shop}", search=tmp_path / "conf")
    assert dict(source.interactions.event_weights) == {"purchase": 1}  # not merged into views and carts
    data = _prepared(source, tmp_path / "d")
    assert set(data.interactions["event"]) == {"purchase"}
    assert data.manifest["reader"]["interactions"]["event_weights"] == {"purchase": 1}
    # a command-line mapping replaces the default too; the default reads every event, weight 1
    given = source_config("data=tabular", f"data.source.folder={shop}",
                          "data.source.interactions.event_weights={cart:2}")
    assert dict(given.interactions.event_weights) == {"cart": 2}
    every = _prepared(source_config("data=tabular", f"data.source.folder={shop}"), tmp_path / "e")
    pairs = pd.read_csv(shop / "events.csv").drop_duplicates(["customer", "sku"])
    assert len(every.interactions) == len(pairs) and set(every.interactions["value"]) == {1}


def test_an_event_name_the_file_lacks_is_a_warning_naming_the_events_found(shop, caplog):
    source = source_config("data=tabular", f"data.source.folder={shop}",
                           "data.source.interactions.event_weights={purchase:1,buy:2}",
                           "data.source.interactions.positive_events=[purchase,bought]")
    with caplog.at_level(logging.WARNING, logger="multimodal_rec.data.sources.tabular"):
        raw = read_tabular(**{k: v for k, v in source.items() if k != "_target_"})
    warned = [r.getMessage() for r in caplog.records]
    assert any("event_weights names ['buy']" in m and "['cart', 'purchase', 'view']" in m for m in warned), warned
    assert any("positive_events names ['bought']" in m for m in warned), warned
    assert set(raw.interactions["event"]) == {"purchase"}


def test_users_are_optional(shop, tmp_path):
    data = _prepared(source_config("data=tabular", f"data.source.folder={shop}"), tmp_path / "d")
    assert list(data.users.columns) == ["user_id", "source_id"] and len(data.users) == 20  # from the events


def test_image_paths_that_already_name_their_folder_are_found(shop, tmp_path):
    _images_named_with_their_folder(shop, "images")  # img/x.jpg in the column, image_root left at `images`
    data = _prepared(source_config("data=tabular", f"data.source.folder={shop}"), tmp_path / "d")
    assert data.manifest["counts"]["items_with_image"] == 40 and data.manifest["issues"]["counts"] == {}


@pytest.mark.parametrize("named", [False, True])
def test_a_symlinked_image_folder_is_read(shop, tmp_path, named):
    elsewhere = tmp_path / "pictures"
    (shop / "images").rename(elsewhere)
    os.symlink(elsewhere, shop / "images")
    overrides = ["data.source.image_root=."] if named else []
    if named:  # images/x.jpg, read from the data folder
        _images_named_with_their_folder(shop, "images")
    raw = read_tabular(**{k: v for k, v in source_config("data=tabular", f"data.source.folder={shop}",
                                                          *overrides).items() if k != "_target_"})
    assert len(raw.image_files) == 40 and not raw.issues.counts


def test_a_path_in_the_data_still_cannot_lead_out_of_the_folders(shop, tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "outside.png")
    products = pd.read_csv(shop / "products.csv")
    products.loc[0, "image_file"] = "../../outside.png"
    products.loc[1, "image_file"] = str(tmp_path / "outside.png")
    products.to_csv(shop / "products.csv", index=False)
    raw = read_tabular(**{k: v for k, v in source_config("data=tabular", f"data.source.folder={shop}").items()
                          if k != "_target_"})
    assert raw.issues.counts["bad_image_path"] == 2 and len(raw.image_files) == 38
    assert all(path.is_relative_to((shop / "images").resolve()) for path in raw.image_files.values())


def test_a_mapped_image_column_without_a_readable_picture_stops_prepare(shop, tmp_path):
    (shop / "images").rename(shop / "photos")  # image_root still says `images`
    source = source_config("data=tabular", f"data.source.folder={shop}")
    with pytest.raises(DatasetError, match=r"products.csv: none of the 40 pictures of column 'image_file' could be "
                                           r"read under .*shop: e.g. 'SKU-000001.jpg' -> .*SKU-000001.jpg: file not "
                                           r"found\. Set data.source.image_root"):
        prepare(source, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    products = pd.read_csv(shop / "products.csv").assign(image_file=None)
    products.to_csv(shop / "products.csv", index=False)
    with pytest.raises(DatasetError, match="'image_file' is empty in every row"):
        prepare(source, tmp_path / "d")
