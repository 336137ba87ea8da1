"""`mmrec <command>`: one way in, each command the module's own entry point with its arguments unchanged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "multimodal_rec.cli"]


def test_without_a_command_it_lists_them_and_fails():
    done = subprocess.run(CLI, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "mmrec train" in done.stdout and "mmrec serve" in done.stdout


def test_an_unknown_command_is_one_line():
    done = subprocess.run([*CLI, "fit"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown command 'fit'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", ["prepare", "train", "export", "index", "serve", "forget"])
def test_every_hydra_command_shows_its_config(command):
    done = subprocess.run([*CLI, command, "--cfg", "job"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()  # its composed config, as `python <module> --cfg job` prints it


def test_evaluate_takes_its_own_options():
    done = subprocess.run([*CLI, "evaluate", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--models" in done.stdout


def test_mmrec_train_trains(tmp_path):
    done = subprocess.run([*CLI, "train", "debug=fast", f"hydra.run.dir={tmp_path / 'run'}",
                           f"data.processed_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "val/ndcg@10" in json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
