"""On the synthetic shop, the model must use what each modality carries (slow: trains small models)."""

from __future__ import annotations

import hydra
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from multimodal_rec.config import CONF_DIR
from multimodal_rec.data.schema import write_dataset
from multimodal_rec.data.sources.synthetic import read_synthetic
from multimodal_rec.evaluation.protocol import evaluate
from tests.conftest import tiny_datamodule

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals") / "shop"
    write_dataset(read_synthetic(n_items=500, n_users=500, seed=3, p_transition=0.85), root)  # strongly sequential
    return root


def fit(datamodule, modalities: list[str], cache, epochs: int = 8):
    pl.seed_everything(0)
    cfg = OmegaConf.load(CONF_DIR / "model" / "multimodal.yaml")
    cfg.modalities, cfg.cache_dir = modalities, str(cache)
    model = hydra.utils.instantiate(cfg)(datamodule=datamodule)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule, verbose=False)
    return model.eval(), model.test_metrics


def shuffled(history: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    out = history.clone()
    for row in out:
        real = (row != pad).nonzero().squeeze(1)
        row[real] = row[real[torch.randperm(len(real), generator=generator)]]
    return out


def test_content_finds_cold_items_and_order_matters(shop, tmp_path):
    datamodule = tiny_datamodule(shop, cold_item_fraction=0.15, batch_size=64)
    full, full_metrics = fit(datamodule, ["id", "image", "text", "attributes"], tmp_path)
    id_only, id_metrics = fit(datamodule, ["id"], tmp_path)
    n_items = datamodule.split.n_items
    random_hr = 10 / n_items
    # cold-start items: only content can place them; ID-only has nothing to go on
    assert id_metrics["test_cold/hr@10"] <= 2 * random_hr
    assert full_metrics["test_cold/hr@10"] >= 3 * random_hr
    assert full_metrics["test_cold/ndcg@10"] > id_metrics["test_cold/ndcg@10"] + 0.02
    # the sequence: the same model with each history shuffled loses accuracy
    vectors, biases = (x.detach() for x in full.all_item_embeddings())
    generator = torch.Generator().manual_seed(0)

    def score(batch, shuffle: bool):
        if shuffle:
            batch = dict(batch, history=shuffled(batch["history"], n_items, generator))
        scores = full.score_batch(batch, vectors, biases)
        return scores.get("ranked", scores["retrieval"])  # what evaluation ranks by (re-ranked with a ranker)

    with torch.no_grad():
        ordered = evaluate(lambda b: score(b, False), datamodule.split, "test", max_len=datamodule.max_len)
        mixed = evaluate(lambda b: score(b, True), datamodule.split, "test", max_len=datamodule.max_len)
    assert ordered["ndcg@10"] == pytest.approx(full_metrics["test/ndcg@10"], abs=1e-6)
    assert ordered["ndcg@10"] > mixed["ndcg@10"] * 1.1, (ordered, mixed)
