"""`python -m multimodal_rec.data.prepare` as the README gives it."""

from __future__ import annotations

import json
import subprocess
import sys

from multimodal_rec.data.schema import load_dataset


def prepare(*overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "multimodal_rec.data.prepare", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_prepare_synthetic(tmp_path):
    out = tmp_path / "shop"
    done = prepare("data=synthetic", f"out={out}", "data.source.n_items=100", "data.source.n_users=50",
                   f"hydra.run.dir={tmp_path / 'log'}")
    assert done.returncode == 0, done.stderr[-2000:]
    data = load_dataset(out)
    assert len(data.items) == 100 and len(data.users) == 50
    assert json.loads((out / "manifest.json").read_text())["generator"]["n_items"] == 100
    assert not list(tmp_path.glob(".shop.tmp-*"))  # the staging folder is gone


def test_prepare_ml100k_mm(ml100k_mm_raw, tmp_path):
    out = tmp_path / "ml"
    done = prepare("data=ml100k_mm", f"out={out}", f"paths.shared_data={ml100k_mm_raw.parent}",
                   f"hydra.run.dir={tmp_path / 'log'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'items': 1682" in done.stdout and load_dataset(out).manifest["counts"]["items_with_image"] == 1640


def test_missing_input_is_one_clear_error(tmp_path):
    done = prepare("data=ml100k_mm", f"out={tmp_path / 'x'}", f"paths.shared_data={tmp_path}",
                   f"hydra.run.dir={tmp_path / 'log'}")
    assert done.returncode == 2
    assert "required input not found" in done.stderr and "u.data" in done.stderr and "posters" in done.stderr
    assert not (tmp_path / "x").exists()


def test_changed_source_settings_prepare_again(tmp_path, caplog):
    from omegaconf import OmegaConf

    from multimodal_rec.data.datamodule import RecDataModule

    def datamodule(n_items: int) -> RecDataModule:
        source = OmegaConf.create({"_target_": "multimodal_rec.data.sources.synthetic.read_synthetic",
                                   "n_items": n_items, "n_users": 30, "images": False})
        return RecDataModule("shop", str(tmp_path / "shop"), source=source)

    datamodule(60).prepare_data()
    written = (tmp_path / "shop" / "manifest.json").stat().st_ino
    datamodule(60).prepare_data()  # same settings: kept (a new preparation renames a new folder into place)
    assert (tmp_path / "shop" / "manifest.json").stat().st_ino == written
    assert "other source settings" not in caplog.text
    datamodule(80).prepare_data()
    data = load_dataset(tmp_path / "shop")
    assert len(data.items) == 80 and data.manifest["source_settings"]["n_items"] == 80
    assert "prepared with other source settings" in caplog.text
