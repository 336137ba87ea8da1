"""What a finished or stopped train.py leaves behind: metrics.json reports the chosen checkpoint's validation
figures (not the last epoch's), and a run stopped by SIGTERM fails with the command that resumes it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from multimodal_rec.config import PROJECT_ROOT


def _command(root: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=fast", f"hydra.run.dir={root / 'run'}",
            f"data.processed_dir={root / 'data'}", f"paths.cache_dir={root / 'cache'}", "trainer.fast_dev_run=false",
            "test=false", "trainer.limit_train_batches=2", *overrides]


def _validation_log(run: Path) -> pd.DataFrame:
    (path,) = run.glob("csv/version_*/metrics.csv")
    logged = pd.read_csv(path)
    return logged.dropna(subset=["val/ndcg@10"]).set_index("epoch")


def test_metrics_json_reports_the_chosen_epoch_of_an_early_stopped_run(tmp_path):
    # patience 1: the run stops after an epoch that did not improve, so its last epoch is not the chosen one
    done = subprocess.run(_command(tmp_path, "trainer.max_epochs=20", "callbacks.early_stopping.patience=1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    result = json.loads((run / "metrics.json").read_text())
    assert result["epochs"] < 20  # stopped early
    chosen = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)["epoch"]
    logged = _validation_log(run)
    assert logged.index[-1] > chosen and logged.loc[logged.index[-1], "val/ndcg@10"] < logged.loc[chosen, "val/ndcg@10"]
    assert result["metrics"]["val/ndcg@10"] == pytest.approx(logged["val/ndcg@10"].max(), rel=1e-6)
    for key, value in result["metrics"].items():  # every val figure is the chosen epoch's
        assert value == pytest.approx(logged.loc[chosen, key], rel=1e-6), key


def test_a_run_stopped_by_sigterm_fails_and_says_how_to_resume(tmp_path):
    process = subprocess.Popen(_command(tmp_path, "trainer.max_epochs=1000", "~callbacks.early_stopping"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 300
        while not last.is_file() and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert last.is_file(), "training did not start"
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    assert process.returncode == 143, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("error: training was interrupted (SIGTERM)") and f"ckpt_path={last}" in message
    assert "Traceback" not in stderr and not (tmp_path / "run" / "metrics.json").exists()
