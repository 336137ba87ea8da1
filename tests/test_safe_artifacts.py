"""Artifacts and checkpoints are data: nothing a server or an export loads can run code."""

from __future__ import annotations

import json

import pytest
import torch

from multimodal_rec.models.components.history_encoder import HistoryEncoder
from multimodal_rec.models.components.image_encoder import ImageEncoder
from multimodal_rec.models.components.item_tower import ItemTower
from multimodal_rec.models.components.text_encoder import TextEncoder
from multimodal_rec.models.loading import CheckpointError, read_checkpoint
from multimodal_rec.safe_modules import SpecError, build_module, module_spec
from multimodal_rec.serving.artifacts import ArtifactsError, load_artifacts
from multimodal_rec.serving.model_files import CONFIG_FILE, LEGACY_FILE, WEIGHTS_FILE
from tests.conftest import WritesAFile
from tests.conftest import copy_artifacts as _copy


def test_a_pickled_model_pt_is_refused_and_never_unpickled(tiny_artifacts, tmp_path):
    folder = _copy(tiny_artifacts, tmp_path)
    (folder / CONFIG_FILE).unlink()
    (folder / WEIGHTS_FILE).unlink()
    marker = tmp_path / "pwned"
    torch.save({"format": "multimodal_rec.serving/1", "payload": WritesAFile(marker)}, folder / LEGACY_FILE)
    with pytest.raises(ArtifactsError, match="re-export"):
        load_artifacts(folder)
    assert not marker.exists()


def test_a_checkpoint_holding_a_pickle_payload_is_refused(tiny_checkpoint, tmp_path):
    checkpoint = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)  # ours loads as data
    marker = tmp_path / "pwned"
    checkpoint["payload"] = WritesAFile(marker)
    torch.save(checkpoint, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        read_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "multimodal_rec.serving.engine.recommend",
                                    "torch.nn.Linear"])
def test_a_spec_naming_anything_but_a_rebuildable_class_is_refused(target):
    with pytest.raises(SpecError):
        build_module({"_target_": target, "args": {"command": "touch /tmp/pwned"}})


def test_a_model_json_naming_a_foreign_callable_is_refused(tiny_artifacts, tmp_path):
    folder = _copy(tiny_artifacts, tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["modules"]["ranker"] = {"_target_": "os.system", "args": {"command": f"touch {tmp_path}/pwned"}}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ArtifactsError, match="not a class of multimodal_rec"):
        load_artifacts(folder)
    assert not (tmp_path / "pwned").exists()


def test_other_formats_and_altered_weights_are_refused(tiny_artifacts, tmp_path):
    folder = _copy(tiny_artifacts, tmp_path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "format": "multimodal_rec.serving/1"}))
    with pytest.raises(ArtifactsError, match="re-export"):
        load_artifacts(folder)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with open(folder / WEIGHTS_FILE, "r+b") as handle:  # flip one byte of the tensors
        handle.seek(-3, 2)
        byte = handle.read(1)
        handle.seek(-3, 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactsError, match="sha256"):
        load_artifacts(folder)


def test_the_exported_files_hold_no_pickle(tiny_artifacts):
    assert not (tiny_artifacts / LEGACY_FILE).exists()
    header = (tiny_artifacts / WEIGHTS_FILE).read_bytes()[:8]
    assert int.from_bytes(header, "little") > 0  # safetensors: a JSON header length, then raw tensors
    json.loads((tiny_artifacts / CONFIG_FILE).read_text())


@pytest.mark.parametrize("make", [
    lambda: ItemTower(16, 10, image_dim=12, text_dim=8, categorical_sizes=(3, 4), n_multi=5, n_numeric=2,
                      neighbours=2, image_encoder=ImageEncoder("tiny", pretrained=False, trainable=True)),
    lambda: HistoryEncoder(16, hidden=24, rnn="transformer", user_categorical_sizes=(3,), n_user_numeric=1),
    lambda: TextEncoder(pretrained=False, tiny_hidden=16),
])
def test_a_module_rebuilt_from_its_spec_and_state_computes_the_same(make):
    torch.manual_seed(0)
    module = make().eval()
    spec = json.loads(json.dumps(module_spec(module)))  # through JSON, as on disk
    rebuilt = build_module(spec)
    assert type(rebuilt) is type(module)
    rebuilt.load_state_dict(module.state_dict(), strict=True)  # the same architecture, to the last buffer
    rebuilt.eval()
    if isinstance(module, TextEncoder):
        ids, mask = torch.randint(0, 100, (2, 5)), torch.ones(2, 5, dtype=torch.long)
        assert torch.allclose(module(ids, mask), rebuilt(ids, mask))
    elif isinstance(module, HistoryEncoder):
        x, m = torch.randn(2, 4, 16), torch.ones(2, 4, dtype=torch.bool)
        codes = {"categorical": torch.zeros(2, 1, dtype=torch.long), "numeric": torch.zeros(2, 1)}
        hours = torch.tensor([3, 4])
        assert torch.allclose(module(x, m, codes, hours), rebuilt(x, m, codes, hours))
    else:
        assert rebuilt.neighbours == 2 and rebuilt.image_encoder.trainable  # nested encoder rebuilt too
