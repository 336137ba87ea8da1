"""init_from: a run starts from an earlier model's weights, items matched by id, new ones fresh."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from multimodal_rec.config import PROJECT_ROOT
from multimodal_rec.models.loading import CheckpointError, restore_model
from multimodal_rec.models.warm_start import warm_start
from multimodal_rec.stored_config import instantiate_stored

ID_ROWS = "item_tower.id_embedding.weight"


def _fresh_model(checkpoint):
    model, datamodule, saved = restore_model(checkpoint)
    torch.manual_seed(123)  # another initialisation than the checkpoint's
    fresh = instantiate_stored(saved["multimodal_rec"]["config"]["model"])(datamodule=datamodule)
    return fresh, datamodule, saved


def test_the_same_data_starts_from_every_weight(tiny_checkpoint):
    fresh, datamodule, saved = _fresh_model(tiny_checkpoint)
    assert not torch.equal(fresh.state_dict()[ID_ROWS], saved["state_dict"][ID_ROWS])
    done = warm_start(fresh, tiny_checkpoint, datamodule.dataset.items)
    assert done["fresh"] == [] and done["items_matched"] == len(datamodule.dataset.items)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved["state_dict"][name]), name


def test_items_are_matched_by_id_and_a_new_one_starts_fresh(tiny_checkpoint, tmp_path):
    fresh, datamodule, saved = _fresh_model(tiny_checkpoint)
    keys = list(saved["multimodal_rec"]["item_keys"])
    n = len(keys)
    order = list(reversed(range(n)))  # the earlier catalogue listed the items in another order
    shuffled = dict(saved)
    rows = saved["state_dict"][ID_ROWS]
    shuffled["state_dict"] = {**saved["state_dict"], ID_ROWS: torch.cat([rows[order], rows[n:]])}
    shuffled["multimodal_rec"] = {**saved["multimodal_rec"], "item_keys": [keys[r] for r in order]}
    shuffled["multimodal_rec"]["item_keys"][0] = "an item since removed"  # the last item is new to that model
    torch.save(shuffled, tmp_path / "earlier.ckpt")
    before = fresh.state_dict()[ID_ROWS].clone()
    done = warm_start(fresh, tmp_path / "earlier.ckpt", datamodule.dataset.items)
    assert done["items_matched"] == n - 1
    after = fresh.state_dict()[ID_ROWS]
    assert torch.equal(after[: n - 1], rows[: n - 1]) and torch.equal(after[n:], rows[n:])
    assert torch.equal(after[n - 1], before[n - 1])  # new: its fresh initialisation


def test_a_checkpoint_of_another_model_is_refused(tiny_checkpoint, tmp_path):
    fresh, datamodule, saved = _fresh_model(tiny_checkpoint)
    other = dict(saved)
    other["state_dict"] = {f"other.{k}": v for k, v in saved["state_dict"].items()}
    torch.save(other, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="shares no weights"):
        warm_start(fresh, tmp_path / "other.ckpt", datamodule.dataset.items)


def test_train_py_init_from_fine_tunes(tiny_checkpoint, tmp_path):
    run = tiny_checkpoint.parents[1]
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=fast", f"hydra.run.dir={tmp_path / 'run'}",
               f"data.processed_dir={run.parent / 'data'}", f"paths.cache_dir={run.parent / 'cache'}",
               "model.recommender.item_bias=true", "model.recommender.rerank_top=20", f"init_from={run}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tensors copied" in done.stderr + done.stdout
