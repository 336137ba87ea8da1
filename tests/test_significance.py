"""evaluation/significance.py: per-user scores as evaluation gives them, and paired differences with their noise."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from multimodal_rec.config import PROJECT_ROOT
from multimodal_rec.evaluation.significance import SignificanceError, compare, setting, user_ndcg


def runs(per_seed: dict[str, dict[str, list[float]]]) -> dict:
    """{seed: {stage: [NDCG@10 of users 0..n-1]}} -> the {seed: {stage: {user: value}}} `setting` returns."""
    return {seed: {stage: dict(enumerate(values)) for stage, values in stages.items()}
            for seed, stages in per_seed.items()}


def test_paired_difference_averages_seeds_per_user_then_users():
    reference = runs({"0": {"val": [0.0, 1.0, 0.5, 0.0], "test": [1.0, 0.0, 0.0, 0.0]},
                      "1": {"val": [0.0, 1.0, 0.5, 0.0], "test": [1.0, 0.0, 0.0, 0.0]}})
    candidate = runs({"0": {"val": [1.0, 1.0, 0.5, 0.0], "test": [1.0, 0.0, 0.0, 0.0]},
                      "1": {"val": [0.0, 1.0, 0.5, 0.0], "test": [0.0, 0.0, 0.0, 0.0]},
                      "7": {"val": [1.0, 1.0, 1.0, 1.0], "test": [1.0, 1.0, 1.0, 1.0]}})  # no partner: unused
    row = compare(reference, candidate)
    assert row["seeds"] == "0 1"
    val_diff = np.array([0.5, 0, 0, 0])  # user 0 gains on one seed of two
    se = val_diff.std(ddof=1) / 2
    assert row["val diff"] == f"{0.125:+.4f} ± {1.96 * se:.4f}"
    assert row["test diff"] == f"{-0.125:+.4f} ± {1.96 * se:.4f}"
    assert row["val vs test z"] == f"{0.25 / math.hypot(se, se):+.2f}"
    assert row["val ndcg@10"] == pytest.approx(2.0 / 4)


def test_without_shared_seeds_or_users_there_is_nothing_to_pair():
    with pytest.raises(SignificanceError, match="no seed"):
        compare(runs({"0": {"val": [0.0], "test": [0.0]}}), runs({"1": {"val": [0.0], "test": [0.0]}}))
    with pytest.raises(SignificanceError, match="different val users"):
        compare(runs({"0": {"val": [0.0], "test": [0.0]}}), runs({"0": {"val": [0.0, 1.0], "test": [0.0]}}))


def test_a_setting_is_a_folder_of_seeds_or_the_runs_named_by_a_prefix(tmp_path):
    for name in ("sasrec_seed0", "sasrec_seed1", "bpr_mf_seed0"):
        (tmp_path / name).mkdir()
        gains = {"val": {"3": 0.5}, "test": {"3": 1.0 if name.startswith("sasrec") else 0.0}}
        (tmp_path / name / "per_user.json").write_text(json.dumps(gains))
    sasrec = setting(f"{tmp_path}:sasrec")
    assert sorted(sasrec) == ["0", "1"] and sasrec["1"]["test"] == {3: 1.0}
    assert setting(f"{tmp_path}:bpr")["0"]["test"] == {3: 0.0}
    with pytest.raises(SignificanceError, match="two runs of one seed"):
        setting(str(tmp_path))
    with pytest.raises(SignificanceError, match="no runs"):
        setting(f"{tmp_path}:dnn")


def test_per_user_scores_average_to_the_runs_own_metrics(tmp_path):
    run = tmp_path / "setting" / "tiny_seed0"
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=fast", f"hydra.run.dir={run}",
               f"data.processed_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}",
               "trainer.fast_dev_run=false", "trainer.max_epochs=2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    scores = user_ndcg(run)
    for stage in ("val", "test"):
        assert len(scores[stage]) == metrics[f"{stage}/n_users"]
        assert np.mean(list(scores[stage].values())) == pytest.approx(metrics[f"{stage}/ndcg@10"], abs=1e-6)


def test_evaluate_writes_each_baseline_runs_users(tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "multimodal_rec.evaluate", "--data", "synthetic_tiny", "--models",
               "popularity", "--out", str(out), "--", f"data.processed_dir={tmp_path / 'data'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((out / "quality.json").read_text())["test"][0]
    users = setting(f"{out}:popularity")["0"]
    assert np.mean(list(users["test"].values())) == pytest.approx(table["ndcg@10"], abs=1e-9)
