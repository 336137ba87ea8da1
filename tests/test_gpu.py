"""The CUDA paths: bf16 training through train.py, export on the GPU, the GPU model's own scores, the loss in bf16.

Marked `gpu` and skipped without CUDA (CI has none); `bash bench/gpu_checks.sh` runs them on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimodal_rec import embeddings as emb
from multimodal_rec.export import export, user_batch
from multimodal_rec.index import build_index
from multimodal_rec.models.loading import restore_model
from tests.conftest import assert_index_returns_the_top_k, export_config, train_tiny

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory):
    """Two epochs in bf16 mixed precision on the GPU (trainer=gpu's precision), item biases on."""
    return train_tiny(tmp_path_factory.mktemp("gpu_run"), "trainer.accelerator=gpu", "trainer.devices=1",
                      "trainer.precision=bf16-mixed", "model.recommender.item_bias=true")


def test_bf16_training_learns_and_its_checkpoint_loads_on_the_cpu(gpu_checkpoint):
    model, datamodule, checkpoint = restore_model(gpu_checkpoint, device="cpu")
    assert checkpoint["epoch"] == 1  # two epochs ran
    assert all(torch.isfinite(p).all() for p in model.parameters())
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        vectors, biases = model.all_item_embeddings()
        scores = model.score_batch(batch, vectors, biases)["retrieval"]
    targets = batch["target"]
    hits = ((scores > scores.gather(1, targets[:, None])).sum(1) < 10).float().mean()
    assert hits > 2 * 10 / scores.shape[1]  # HR@10 well above a random ranking of the catalogue


def test_export_on_the_gpu_equals_the_cpu_export_and_the_index_returns_the_models_top_k(gpu_checkpoint, tmp_path):
    export(export_config(gpu_checkpoint, tmp_path / "cuda", device="cuda"))
    export(export_config(gpu_checkpoint, tmp_path / "cpu", device="cpu"))
    for kind in ("items", "users"):
        ids_gpu, gpu = emb.read_embeddings(tmp_path / "cuda", kind)
        ids_cpu, cpu = emb.read_embeddings(tmp_path / "cpu", kind)
        assert np.array_equal(ids_gpu, ids_cpu)
        assert np.allclose(gpu, cpu, atol=1e-4), (kind, np.abs(gpu - cpu).max())

    build_index(tmp_path / "cuda", "flat", tmp_path / "flat")
    model, datamodule, _ = restore_model(gpu_checkpoint, device="cuda")
    users = np.arange(datamodule.split.n_users)
    batch = user_batch(datamodule.split, users, datamodule.max_len, model.pad)
    with torch.no_grad():  # the model's own scoring, on the GPU
        vectors, biases = model.all_item_embeddings()
        scores = model.score_batch({k: v.cuda() for k, v in batch.items()}, vectors, biases)["retrieval"].cpu().numpy()
    assert_index_returns_the_top_k(tmp_path / "flat", tmp_path / "cuda", scores, datamodule, atol=1e-4)


def test_the_training_loss_in_bf16_on_the_gpu_is_the_cpu_loss(gpu_checkpoint):
    model, datamodule, _ = restore_model(gpu_checkpoint, device="cpu")
    model.log = lambda *args, **kwargs: None  # no Trainer: a bare training step
    model.eval()  # dropout off: the same function on both devices
    batch = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        on_cpu = float(model.training_step(batch, 0))
        model.cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            on_gpu = float(model.training_step({k: v.cuda() for k, v in batch.items()}, 0))
    assert on_gpu == pytest.approx(on_cpu, rel=0.02)  # bf16 keeps ~3 significant digits
