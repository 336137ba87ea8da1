"""Content neighbours: the kNN graph over frozen image/text features that the item tower smooths IDs with."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from multimodal_rec.export import export
from multimodal_rec.models.components.item_tower import ItemTower
from multimodal_rec.models.content_graph import content_neighbours
from multimodal_rec.models.loading import restore_model
from multimodal_rec.serving.service import RecommenderService
from tests.conftest import export_config, train_tiny, twin_item


def test_neighbours_are_the_most_similar_warm_items_never_the_item_itself():
    # items 0-2 point one way, 3-5 the other; item 5 is cold (no training interaction)
    image = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0], [0.1, 0.9], [0.05, 1.0]])
    text = torch.tensor([[1.0], [1.0], [1.0], [-1.0], [-1.0], [-1.0]])
    present = torch.ones(6, dtype=torch.bool)
    warm = torch.tensor([True, True, True, True, True, False])
    index, weight = content_neighbours([image, text], [present, present], warm, k=2, chunk=4)
    assert index.shape == weight.shape == (6, 2)
    assert set(index[0].tolist()) == {1, 2}
    assert index[3, 0].item() == 4 and weight[3, 0].item() == 1.0  # its runner-up is dissimilar: weight 0
    for row in range(6):
        assert row not in index[row].tolist()
        assert 5 not in index[row].tolist()  # a cold item is nobody's neighbour
    assert set(index[5].tolist()) == {3, 4}  # but it has neighbours of its own
    torch.testing.assert_close(weight.sum(1), torch.ones(6))


def test_missing_modalities_count_as_dissimilar():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    present = torch.tensor([True, True, False, True])  # item 2 has no image: its slot is ignored
    index, weight = content_neighbours([image], [present], torch.ones(4, dtype=torch.bool), k=1)
    assert index[0].item() == 1
    assert weight[2].sum() == 0  # nothing is similar to an item with no content: no neighbour part


def test_tower_adds_the_neighbours_id_embeddings():
    tower = ItemTower(4, n_items=5, text_dim=3, modalities=("id", "text"), fusion="residual", neighbours=2).eval()
    assert tower.part_names == ("id", "text", "neighbours")
    inputs = {"item": torch.tensor([0, 1]), "known": torch.tensor([True, True]), "text": torch.randn(2, 3),
              "has_text": torch.tensor([True, True]), "neighbours": torch.tensor([[2, 3], [2, 3]]),
              "neighbour_weights": torch.tensor([[0.5, 0.5], [1.0, 0.0]])}
    base = tower(inputs)
    with torch.no_grad():
        tower.id_embedding.weight[3] += 1.0  # moves item 0 (weight 0.5 on item 3), not item 1 (weight 0)
    moved = tower(inputs)
    assert not torch.allclose(moved[0], base[0])
    torch.testing.assert_close(moved[1], base[1])
    assert ItemTower(4, n_items=5, modalities=("id",), neighbours=2).part_names == ("id",)  # no content: none


@pytest.mark.slow
def test_a_model_with_content_neighbours_trains_exports_and_serves_new_items(tmp_path):
    """End to end with `model.content_neighbours`: a new item finds its neighbours among the warm items as
    training did, so the twin of a cold catalogue item gets (almost: its title differs) that item's vector."""
    checkpoint = train_tiny(tmp_path, "model.content_neighbours=4")
    export(export_config(checkpoint, tmp_path / "artifacts"))
    service = RecommenderService(tmp_path / "artifacts")
    artifacts = service.artifacts
    assert artifacts.parts["part_names"][-1] == "neighbours" and artifacts.parts["content_graph"]["k"] == 4
    assert artifacts.dim == artifacts.item_dim and artifacts.parts["item_bias"] is None  # default: cosine alone
    items = pd.read_parquet(tmp_path / "data" / "items.parquet").set_index("item_id", drop=False)
    source = int(artifacts.catalog.loc[artifacts.catalog["cold"], "item_id"].iat[0])
    twin = twin_item(items, source, 990001)
    model = restore_model(checkpoint)[0]
    row = artifacts.item_row[source]
    inputs = service._state[1].inputs(twin["text"], twin["image_base64"], twin["attributes"])
    found = set(inputs["neighbours"][0][inputs["neighbour_weights"][0] > 0].tolist())
    trained = set(model.items.neighbours[row][model.items.neighbour_weights[row] > 0].tolist())
    assert len(found & trained) >= 3, (found, trained)  # the same warm neighbours (its image is re-encoded)
    service.add_item(twin.pop("item_id"), **twin)
    original, new = (artifacts.item_vectors[artifacts.item_row[i]] for i in (source, 990001))
    assert float(original @ new) / float(np.linalg.norm(original) * np.linalg.norm(new)) > 0.95
    assert artifacts.modality_parts.shape[1] == len(artifacts.parts["part_names"])
    answer = service.recommend(None, [source], None, None, 5, None, True)
    assert answer["items"] and all(item["reason"]["modality"] in artifacts.parts["part_names"]
                                   for item in answer["items"])
