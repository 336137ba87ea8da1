"""Export: embeddings equal the model's own scoring, a killed export resumes, bad folders are refused."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from multimodal_rec import embeddings as emb
from multimodal_rec.config import ConfigError
from multimodal_rec.export import Exporter, export, user_batch
from multimodal_rec.index import build_index
from multimodal_rec.models.loading import CheckpointError, resolve_checkpoint, restore_model
from multimodal_rec.serving.artifacts import ArtifactsError, load_artifacts
from tests.conftest import assert_index_returns_the_top_k, export_config, free_port


def test_manifest_describes_the_export(tiny_artifacts):
    manifest = emb.load_manifest(tiny_artifacts)
    assert manifest["counts"] == {"items": 200, "users": 100}
    # 64-d dot-product vectors (their norms differ) plus the item-bias column (the bias for items, 1 for users)
    assert manifest["dim"] == 65 and manifest["metric"] == "inner_product" and manifest["item_bias"]
    assert manifest["score"] == "dot" and not manifest["normalised"]
    ids, vectors = emb.read_embeddings(tiny_artifacts, "items")
    assert len(ids) == 200 and vectors.dtype == np.float32
    assert np.linalg.norm(vectors[:, :64], axis=1).std() > 0.01
    assert np.abs(vectors[:, 64]).max() > 0  # trained biases, not the zero they start at
    _, users = emb.read_embeddings(tiny_artifacts, "users")
    assert np.allclose(users[:, 64], 1.0) and np.linalg.norm(users[:, :64], axis=1).std() > 0.01
    assert len(manifest["shards"]["items"]) == 4  # 200 items in shards of 64
    assert not (tiny_artifacts / emb.PROGRESS_FILE).exists()


def test_flat_index_returns_the_models_own_top_k(tiny_checkpoint, tiny_artifacts, tmp_path):
    build_index(tiny_artifacts, "flat", tmp_path / "flat")
    model, datamodule, _ = restore_model(tiny_checkpoint)
    users = np.arange(datamodule.split.n_users)
    batch = user_batch(datamodule.split, users, datamodule.max_len, model.pad)
    with torch.no_grad():  # the model's own full-catalogue scoring, through its evaluation path
        vectors, biases = model.all_item_embeddings()
        scores = model.score_batch(batch, vectors, biases)["retrieval"].numpy()
        with pytest.raises(ValueError, match="scores with item biases"):
            model.score_batch(batch, vectors)  # cosine alone would silently rank differently
    user_ids, _ = emb.read_embeddings(tiny_artifacts, "users")
    assert np.array_equal(user_ids, datamodule.dataset.users["user_id"].to_numpy())
    assert_index_returns_the_top_k(tmp_path / "flat", tiny_artifacts, scores, datamodule, atol=1e-5)


def test_killed_export_resumes_and_equals_a_clean_one(tiny_checkpoint, tiny_artifacts, tmp_path, monkeypatch):
    model, datamodule, _ = restore_model(tiny_checkpoint)
    out = tmp_path / "resumed"
    real_write, calls = emb.write_shard, []

    def crash_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        calls.append(args[2])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(emb, "write_shard", crash_after_three)
    exporter = Exporter(model, datamodule, "sha-of-the-checkpoint", out, shard_size=64, batch_size=32)
    with pytest.raises(KeyboardInterrupt):
        exporter.run()
    assert not (out / emb.MANIFEST_FILE).exists() and (out / emb.PROGRESS_FILE).exists()
    with pytest.raises(emb.EmbeddingsError, match="did not finish"):
        emb.load_manifest(out)
    assert not list(out.rglob("*.tmp"))  # nothing half-written is left behind
    monkeypatch.setattr(emb, "write_shard", real_write)
    written = []
    monkeypatch.setattr(emb, "write_shard", lambda *a, **k: written.append(a[1:3]) or real_write(*a, **k))
    manifest = Exporter(model, datamodule, "sha-of-the-checkpoint", out, shard_size=64, batch_size=32).run()
    assert written == [("items", 3), ("users", 0), ("users", 1)]  # only the shards that were missing
    for kind in ("items", "users"):
        ids, vectors = emb.read_embeddings(out, kind)
        clean_ids, clean_vectors = emb.read_embeddings(tiny_artifacts, kind)
        assert np.array_equal(ids, clean_ids) and np.allclose(vectors, clean_vectors, atol=1e-6)
    assert manifest["counts"] == {"items": 200, "users": 100}


def test_other_settings_are_not_mixed_into_a_partial_export(tiny_checkpoint, tmp_path):
    model, datamodule, _ = restore_model(tiny_checkpoint)
    out = tmp_path / "partial"
    emb.write_json_atomic(out / emb.PROGRESS_FILE, {"settings": {"dtype": "float16"}, "shards": []})
    with pytest.raises(emb.EmbeddingsError, match="other settings"):
        Exporter(model, datamodule, "sha", out).run()


def test_float16_export_reads_back_as_float32(tiny_checkpoint, tiny_artifacts, tmp_path):
    export(export_config(tiny_checkpoint, tmp_path / "half", dtype="float16", serving_parts=False))
    ids, vectors = emb.read_embeddings(tmp_path / "half", "items")
    _, full = emb.read_embeddings(tiny_artifacts, "items")
    assert vectors.dtype == np.float32 and np.allclose(vectors, full, atol=2e-3)


def test_corrupt_or_mismatched_artifacts_are_refused(tiny_artifacts, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts, copy)
    shard = copy / emb.shard_name("items", 1)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(emb.EmbeddingsError, match="corrupt"):
        emb.read_embeddings(copy, "items")
    shutil.rmtree(copy)
    shutil.copytree(tiny_artifacts, copy)
    build_index(copy, "flat", copy / "index-flat")
    manifest = emb.load_json(copy / emb.MANIFEST_FILE)
    manifest["data_fingerprint"] = "other-data"
    emb.write_json_atomic(copy / emb.MANIFEST_FILE, manifest)
    with pytest.raises(ArtifactsError, match="data_fingerprint"):
        load_artifacts(copy)


def test_a_run_folder_names_its_best_checkpoint(tiny_checkpoint):
    best = resolve_checkpoint(tiny_checkpoint.parents[1])
    assert best.is_file() and best.name.startswith("epoch_") and best.parent == tiny_checkpoint.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_export_on_cuda_without_a_gpu_is_refused_before_writing(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="device=cuda needs a CUDA GPU"):
        export(export_config(tiny_checkpoint, tmp_path / "out", device="cuda"))
    assert not (tmp_path / "out").exists()


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        restore_model(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        restore_model(tmp_path / "junk.ckpt")


@pytest.mark.slow
def test_two_rank_export_equals_the_single_process_one(tiny_checkpoint, tiny_artifacts, tmp_path):
    """torchrun with 2 gloo ranks: each writes its own shards, rank 0 ties them together in the manifest."""
    out = tmp_path / "sharded"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "multimodal_rec.export", f"ckpt_path={tiny_checkpoint}", f"out={out}",
               "shard_size=64", "batch_size=32", "device=cpu", f"hydra.run.dir={tmp_path / 'logs'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    sharded, single = emb.load_manifest(out), emb.load_manifest(tiny_artifacts)
    assert sharded["world_size"] == 2 and sharded["counts"] == single["counts"]
    assert sharded["shards"] == single["shards"]  # same files, byte for byte (sha256 in each entry)
    assert not list(out.glob("progress*.json"))
