"""train.py end to end (fast_dev_run, resume), self-describing checkpoints, the frozen-feature cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multimodal_rec.config import PROJECT_ROOT
from multimodal_rec.models import feature_cache
from multimodal_rec.models.encoders_setup import build_bundle
from tests.conftest import tiny_datamodule


def run_train(tmp_path: Path, run: str, *overrides: str) -> dict:
    run_dir = tmp_path / run
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=fast", f"hydra.run.dir={run_dir}",
               f"data.processed_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def test_fast_dev_run(tmp_path):
    result = run_train(tmp_path, "fast")
    metrics = result["metrics"]
    for key in ("val/ndcg@10", "test/ndcg@10", "test/hr@20", "test/coverage@10", "test_cold/ndcg@10"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert (tmp_path / "data" / "manifest.json").is_file()  # prepared on first use
    assert 0 < result["fit_seconds"] < result["seconds"]  # training alone, as a baseline's fit is timed


def test_refit_and_validation_gap_are_refused_together_before_training(tmp_path):
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=fast", f"hydra.run.dir={tmp_path / 'run'}",
               f"data.processed_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}", "refit=true",
               "data.validation_gap=1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "use one or the other" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_trainer_gpu_without_a_gpu_is_one_clear_error(tmp_path):
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "trainer=gpu", f"hydra.run.dir={tmp_path / 'run'}",
               f"data.processed_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was built


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tmp_path):
    common = ["trainer.fast_dev_run=false", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "test=false"]
    first = run_train(tmp_path, "first", *common, "trainer.max_epochs=2")
    assert first["epochs"] == 2
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    described = checkpoint["multimodal_rec"]
    assert described["data_fingerprint"] == first["data_fingerprint"] and described["dim"] == 64
    assert described["config"]["data"]["name"] == "synthetic_tiny"
    assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == 4
    second = run_train(tmp_path, "second", *common, "trainer.max_epochs=3", f"ckpt_path={last}")
    assert second["epochs"] == 3
    resumed = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 6  # two more batches, not a restart from zero


def test_resume_refuses_other_data(tmp_path):
    common = ["trainer.fast_dev_run=false", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
              "test=false", "trainer.max_epochs=1"]
    run_train(tmp_path, "first", *common)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "other"
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=fast", f"hydra.run.dir={run_dir}",
               f"data.processed_dir={tmp_path / 'data2'}", "data.source.seed=7", *common,
               "trainer.max_epochs=2", f"ckpt_path={last}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "trained on data" in done.stderr


def _tiny_encoders():
    from multimodal_rec.models.components.image_encoder import ImageEncoder
    from multimodal_rec.models.components.text_encoder import TextEncoder

    torch.manual_seed(0)
    image = ImageEncoder("tiny", pretrained=False)
    text = TextEncoder(pretrained=False, tiny_hidden=32)
    return (lambda: image), (lambda: text)


def test_frozen_features_are_cached_and_invalidated(tiny_shop_dir, tmp_path, monkeypatch):
    calls = []
    real = feature_cache.image_features
    monkeypatch.setattr(feature_cache, "image_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    image, text = _tiny_encoders()
    cache = tmp_path / "cache"
    first = build_bundle(tiny_datamodule(tiny_shop_dir), image_encoder=image, text_encoder=text, cache_dir=cache)
    second = build_bundle(tiny_datamodule(tiny_shop_dir), image_encoder=image, text_encoder=text, cache_dir=cache)
    assert len(calls) == 1  # the second build read the cache
    torch.testing.assert_close(first.item_inputs.image, second.item_inputs.image)
    assert len(list((cache / "features").glob("*.pt"))) == 2  # image + text

    from multimodal_rec.data.schema import write_dataset
    from multimodal_rec.data.sources.synthetic import read_synthetic

    changed = tmp_path / "changed_shop"
    write_dataset(read_synthetic(n_items=300, n_users=150, seed=2), changed)
    build_bundle(tiny_datamodule(changed), image_encoder=image, text_encoder=text, cache_dir=cache)
    assert len(calls) == 2  # other data: recomputed, not reused
    assert len(list((cache / "features").glob("*.pt"))) == 4


def test_missing_real_data_is_one_clear_error(tmp_path):
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "experiment=ml100k_mm", f"paths.shared_data={tmp_path}",
               f"data.processed_dir={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "required input not found" in done.stderr and "Traceback" not in done.stderr


def test_retest_reproduces_the_test_metrics_of_the_run(tmp_path):
    from multimodal_rec.training import retest

    result = run_train(tmp_path, "run", "trainer.fast_dev_run=false", "trainer.max_epochs=2",
                       "trainer.limit_train_batches=3")
    again = retest(tmp_path / "run")
    tested = {k: v for k, v in result["metrics"].items() if k.startswith("test")}
    assert tested and {k: again["metrics"][k] for k in tested} == pytest.approx(tested, abs=1e-9)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["retested"] == again["retested"]


def test_refit_trains_again_on_validation_targets_for_the_chosen_epochs(tmp_path):
    from multimodal_rec.models.loading import read_checkpoint, restore_model

    result = run_train(tmp_path, "run", "trainer.fast_dev_run=false", "trainer.max_epochs=2",
                       "trainer.limit_train_batches=2", "refit=true")
    refit = result["refit"]
    selected = read_checkpoint(refit["selected_checkpoint"])
    final = read_checkpoint(result["best_checkpoint"])
    assert Path(result["best_checkpoint"]).parent == tmp_path / "run" / "refit" / "checkpoints"
    assert final["epoch"] == selected["epoch"] == refit["epochs"] - 1  # as many epochs as validation chose
    assert final["multimodal_rec"]["config"]["data"]["train_on_validation"] is True
    assert result["data_fingerprint"].endswith("-trainval") and "test/ndcg@10" in result["metrics"]
    assert set(refit["test_before_refit"]) == {k for k in result["metrics"] if k.startswith("test")}
    model, datamodule, _ = restore_model(tmp_path / "run")  # export rebuilds the refit's data from its config
    assert datamodule.split.train_on_validation and model.data_fingerprint == result["data_fingerprint"]


def test_the_served_experiment_is_the_benchmarks_model_on_all_items_refit():
    from hydra import compose, initialize_config_dir

    from multimodal_rec.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        bench = compose("train", overrides=["experiment=ml100k_mm"])
        served = compose("train", overrides=["experiment=ml100k_mm_serve"])
    assert served.refit and not bench.refit
    assert served.data.cold_item_fraction == 0 and bench.data.cold_item_fraction == 0.1
    assert served.model.recommender.mask_seen and not bench.model.recommender.mask_seen
    assert served.model.recommender.history_encoder == bench.model.recommender.history_encoder
    assert served.model.recommender.dim == bench.model.recommender.dim


def test_refit_refuses_differential_privacy(tmp_path):
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=fast", "privacy=dp", "refit=true",
               f"hydra.run.dir={tmp_path / 'run'}", f"data.processed_dir={tmp_path / 'data'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "use one or the other" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_optuna_search_tunes_on_validation(tmp_path):
    """The search space file runs under Hydra's Optuna sweeper (here two one-batch trials on the tiny shop, the
    ml100k_mm experiment it names taken out) and writes the best trial's settings."""
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "-m", "hparams_search=ml100k_mm_optuna", "~experiment",
               "debug=fast", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
               f"data.processed_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = (tmp_path / "sweep" / "optimization_results.yaml").read_text()
    assert "best_params" in results and "model.recommender.optimizer.lr" in results
    for trial in ("0", "1"):  # validation only: no trial read the test split
        metrics = json.loads((tmp_path / "sweep" / trial / "metrics.json").read_text())["metrics"]
        assert metrics["val/ndcg@10"] >= 0 and not any(key.startswith("test") for key in metrics)
