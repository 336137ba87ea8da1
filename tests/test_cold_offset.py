"""cold_offset: one constant added to the scores of items never trained on, alike in evaluation, the exported
vectors, the index and items added while serving."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from multimodal_rec import embeddings as emb
from multimodal_rec.export import export, user_batch
from multimodal_rec.index import build_index, load_index
from multimodal_rec.models.loading import restore_model
from multimodal_rec.serving.artifacts import load_artifacts
from multimodal_rec.serving.new_items import NewItemEncoder
from tests.conftest import export_config, twin_item

OFFSET = 0.75


def test_the_offset_lifts_only_items_never_trained_on(tiny_checkpoint):
    model, datamodule, _ = restore_model(tiny_checkpoint)
    untrained = model.untrained_items
    assert untrained.any() and (~untrained).any()  # the tiny shop holds 10% of its items out
    batch = user_batch(datamodule.split, np.arange(datamodule.split.n_users), datamodule.max_len, model.pad)
    with torch.no_grad():
        vectors, biases = model.all_item_embeddings()
        model.hparams.cold_offset = OFFSET
        lifted_vectors, lifted_biases = model.all_item_embeddings()
        assert torch.equal(vectors, lifted_vectors)
        assert torch.allclose(lifted_biases - biases, OFFSET * untrained.float())
        model.hparams.cold_offset = 1e4  # past every score: the untrained items come first for every user
        scores = model.score_batch(batch, *model.all_item_embeddings())["retrieval"]
    first = scores.topk(int(untrained.sum()), dim=1).indices
    assert untrained[first].all()


def test_export_index_and_new_items_carry_the_offset(tiny_checkpoint, tmp_path):
    """The offset is not trained, so the export sets it (`cold_offset=`) for a model trained without one."""
    model, datamodule, _ = restore_model(tiny_checkpoint)
    assert model.hparams.cold_offset == 0.0
    model.hparams.cold_offset = OFFSET
    out = tmp_path / "artifacts"
    export(export_config(tiny_checkpoint, out, cold_offset=OFFSET))
    manifest = emb.load_manifest(out)
    assert manifest["cold_offset"] == OFFSET and manifest["item_bias"]
    with pytest.raises(emb.EmbeddingsError, match="cold_offset"):  # not mistaken for the export already there
        export(export_config(tiny_checkpoint, out, cold_offset=0.0))
    _, exported = emb.read_embeddings(out, "items")
    with torch.no_grad():
        vectors, biases = model.all_item_embeddings()
        users = np.arange(datamodule.split.n_users)
        batch = user_batch(datamodule.split, users, datamodule.max_len, model.pad)
        scores = model.score_batch(batch, vectors, biases)["retrieval"].numpy()
    assert np.allclose(exported[:, -1], biases.numpy(), atol=1e-6)  # the bias column holds the offset

    build_index(out, "flat", tmp_path / "flat")  # the index ranks as the model does, offset included
    _, user_vectors = emb.read_embeddings(out, "users")
    found_scores, _ = load_index(tmp_path / "flat").search(user_vectors, 10)
    assert np.allclose(found_scores, -np.sort(-scores, axis=1)[:, :10], atol=1e-5)

    # an item added while serving is never trained on either: the twin of a cold item gets its vector and offset
    artifacts = load_artifacts(out)
    items = pd.read_parquet(tiny_checkpoint.parents[2] / "data" / "items.parquet").set_index("item_id", drop=False)
    cold_row = int(np.flatnonzero(model.untrained_items.numpy())[0])
    cold_id = int(datamodule.dataset.items["item_id"].iloc[cold_row])
    twin = twin_item(items, cold_id, 990001)
    vector, _ = NewItemEncoder(artifacts.parts).encode(twin["text"], twin["image_base64"], twin["attributes"])
    assert np.isclose(vector[-1], exported[cold_row, -1], atol=1e-3)
    without = NewItemEncoder({**artifacts.parts, "cold_offset": 0.0}).encode(
        twin["text"], twin["image_base64"], twin["attributes"])[0]
    assert np.isclose(vector[-1] - without[-1], OFFSET, atol=1e-6)
