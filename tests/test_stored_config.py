"""A checkpoint's saved config is data: a crafted one that names any callable but the package's own builders
is refused before anything is built (it would otherwise be called by `export`, `restore_model`, retest)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimodal_rec.config import PROJECT_ROOT
from multimodal_rec.models.loading import CheckpointError, restore_model
from multimodal_rec.stored_config import StoredConfigError, allowed_target, check_stored_config

WRITE_TEXT = "pathlib.Path.write_text"


def _crafted(tiny_checkpoint: Path, tmp_path: Path, craft) -> Path:
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    config = copy.deepcopy(checkpoint["multimodal_rec"]["config"])
    craft(config)
    checkpoint["multimodal_rec"]["config"] = config
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


def _writes_marker(marker: Path) -> dict:
    """A config node that, built by hydra, writes `marker` (as a .pth file would be written to run at start)."""
    return {"_target_": WRITE_TEXT, "self": {"_target_": "pathlib.Path", "_args_": [str(marker)]},
            "data": "import os  # pwned"}


CRAFTS = {
    "model root": lambda marker: lambda c: c.__setitem__("model", _writes_marker(marker)),
    "data source": lambda marker: lambda c: c["data"].__setitem__("source", _writes_marker(marker)),
    "optimizer": lambda marker: lambda c: c["model"]["recommender"].__setitem__(
        "optimizer", {"_target_": "builtins.open", "file": str(marker), "mode": "w"}),
    "nested in a list": lambda marker: lambda c: c["model"].__setitem__("modalities", [_writes_marker(marker)]),
    "interpolation": lambda marker: lambda c: c["data"].__setitem__("processed_dir", "${oc.env:HOME}"),
}


@pytest.mark.parametrize("where", sorted(CRAFTS))
def test_a_crafted_checkpoint_config_builds_nothing(tiny_checkpoint, tmp_path, where):
    marker = tmp_path / "evil.pth"
    crafted = _crafted(tiny_checkpoint, tmp_path, CRAFTS[where](marker))
    with pytest.raises(CheckpointError, match="refused"):
        restore_model(crafted)
    assert not marker.exists()


def test_export_of_a_crafted_checkpoint_stops_with_one_line_and_writes_nothing(tiny_checkpoint, tmp_path):
    marker = tmp_path / "evil.pth"
    crafted = _crafted(tiny_checkpoint, tmp_path, CRAFTS["model root"](marker))
    done = subprocess.run([sys.executable, "-m", "multimodal_rec.export", f"ckpt_path={crafted}",
                           f"out={tmp_path / 'out'}", "device=cpu"],
                          capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "not one of the package's own builders" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


def test_the_checkpoint_as_trained_still_restores(tiny_checkpoint):
    model, datamodule, checkpoint = restore_model(tiny_checkpoint)
    for section in ("data", "model"):  # what training writes passes
        check_stored_config(checkpoint["multimodal_rec"]["config"][section])
    assert model.n_items == datamodule.split.n_items


@pytest.mark.parametrize("target", ["torch.optim.AdamW", "torch.optim.SGD",
                                    "torch.optim.lr_scheduler.CosineAnnealingLR",
                                    "multimodal_rec.models.recommender.MultimodalRecommender"])
def test_the_package_builders_and_torch_optimisers_are_allowed(target):
    assert allowed_target(target)


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "torch.save", "torch.load", "torch.optim.Optimizer",
                                    "torch.optim.__class__", "multimodal_rec.embeddings.write_json_atomic",
                                    "torch.optim.lr_scheduler.torch.save", 5, None])
def test_anything_else_is_refused(target):
    assert not allowed_target(target)
    with pytest.raises(StoredConfigError):
        check_stored_config({"model": {"_target_": target}})


def test_a_config_nested_too_deep_is_refused():
    deep: dict = {}
    node = deep
    for _ in range(200):
        node["inner"] = {}
        node = node["inner"]
    with pytest.raises(StoredConfigError, match="nested"):
        check_stored_config(deep)
