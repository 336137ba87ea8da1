"""Multi-process training (Lightning DDP, gloo on CPU): every user is evaluated exactly once over the ranks,
synced metrics equal single-process ones, and a 2-process `train.py trainer=ddp` run reports the test
metrics that a 1-process evaluation of its checkpoint gives."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multimodal_rec.config import CONF_DIR, PROJECT_ROOT
from multimodal_rec.distributed import EvalShardSampler, broadcast_running_stats, file_lock, shard_bounds
from multimodal_rec.evaluation.metrics import RankingEvaluator, all_reduce_evaluators
from tests.conftest import tiny_datamodule

N_ITEMS, N_USERS, KS = 40, 37, (1, 5, 10)


def _random_eval_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores (U, N) with ties, targets and exclusions of every user (the same in every process)."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 12, (N_USERS, N_ITEMS), generator=generator).float()  # coarse: many ties
    targets = torch.randint(0, N_ITEMS, (N_USERS,), generator=generator)
    rows = torch.randint(0, N_USERS, (60,), generator=generator)
    cols = torch.randint(0, N_ITEMS, (60,), generator=generator)
    keep = cols != targets[rows]  # the target itself is never excluded
    return scores, targets, rows[keep], cols[keep]


def _evaluate(users: range, batch_size: int = 5) -> list[RankingEvaluator]:
    """Evaluators (final, second) over `users` in batches, as one rank would."""
    scores, targets, rows, cols = _random_eval_batch()
    evaluators = [RankingEvaluator(N_ITEMS, KS), RankingEvaluator(N_ITEMS, KS)]
    for start in range(users.start, users.stop, batch_size):
        stop = min(start + batch_size, users.stop)
        mine = (rows >= start) & (rows < stop)
        evaluators[0].update(scores[start:stop], targets[start:stop], rows[mine] - start, cols[mine])
        evaluators[1].update(-scores[start:stop], targets[start:stop], rows[mine] - start, cols[mine])
    return evaluators


def test_eval_shards_cover_every_index_exactly_once():
    for world_size in range(1, 5):
        for n in (0, 1, 2, 3, 5, 7, 10, 37, 101):
            shards = [list(EvalShardSampler(range(n), world_size, rank)) for rank in range(world_size)]
            assert [i for shard in shards for i in shard] == list(range(n)), (n, world_size)
            sizes = [len(EvalShardSampler(range(n), world_size, rank)) for rank in range(world_size)]
            assert sizes == [len(shard) for shard in shards] and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="not in a world"):
        shard_bounds(10, 2, 2)


def test_datamodule_shards_eval_users_once_and_training_windows(tiny_shop_dir):
    datamodule = tiny_datamodule(tiny_shop_dir, eval_batch_size=7, text_tokenizer="hash")
    datamodule.prepare_data()
    datamodule.setup()
    for stage in ("val", "test", "test_cold"):
        expected = sorted(int(user) for user in datamodule.eval_sets[stage].users)
        for world_size in range(1, 5):
            seen = []
            for rank in range(world_size):
                datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
                seen += [u for batch in datamodule.eval_dataloader(stage) for u in batch["user"].tolist()]
            assert sorted(seen) == expected, (stage, world_size)  # each user once: no padding, no loss
    windows = len(datamodule.train_set)
    for world_size in (2, 3):
        shards = []
        for rank in range(world_size):
            datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)
            shards.append(list(datamodule.train_dataloader().sampler))
        assert {len(shard) for shard in shards} == {math.ceil(windows / world_size)}  # equal steps per rank
        assert set().union(*shards) == set(range(windows))
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=200)
    with pytest.raises(ValueError, match="fewer than the 200 processes"):
        datamodule.eval_dataloader("val")


def test_merged_shard_states_equal_one_evaluator():
    single = [e.compute() for e in _evaluate(range(N_USERS))]
    for world_size in (2, 3, 4):
        merged = None
        for rank in range(world_size):
            part = _evaluate(range(*shard_bounds(N_USERS, rank, world_size)))
            merged = part if merged is None else [m.merge(p) for m, p in zip(merged, part)]
        assert [m.compute() for m in merged] == single  # exact: integer states add up
    with pytest.raises(ValueError, match="cannot merge"):
        RankingEvaluator(N_ITEMS, KS).merge(RankingEvaluator(N_ITEMS + 1, KS))


def _gloo_worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        evaluators = _evaluate(range(*shard_bounds(N_USERS, rank, world_size)))
        synced = all_reduce_evaluators(evaluators)
        norm = torch.nn.BatchNorm1d(3)
        norm.running_mean.fill_(float(rank + 1))
        sent = broadcast_running_stats(norm)
        result = {"synced": synced, "metrics": [e.compute() for e in evaluators], "sent": sent,
                  "running_mean": norm.running_mean.tolist()}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_gloo_gives_every_rank_the_global_metrics(tmp_path):
    world_size = 2
    mp.start_processes(_gloo_worker, args=(world_size, str(tmp_path / "rendezvous"), str(tmp_path)),
                       nprocs=world_size, start_method="fork")
    single = [e.compute() for e in _evaluate(range(N_USERS))]
    assert not all_reduce_evaluators(_evaluate(range(N_USERS)))  # no process group here: nothing to do
    for rank in range(world_size):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["synced"] and result["metrics"] == single
        assert result["metrics"][0]["n_users"] == N_USERS  # each user once, on every rank
        assert result["sent"] == 3 and result["running_mean"] == [1.0, 1.0, 1.0]  # rank 0's statistics


def _locked_writer(index: int, lock: str, log: str) -> None:
    with file_lock(lock), open(log, "a") as out:
        out.write(f"{index} in\n")
        out.flush()
        time.sleep(0.05)  # another process entering now would write between the two lines
        out.write(f"{index} out\n")


def test_file_lock_lets_processes_take_turns(tmp_path):
    lock, log = tmp_path / "sub" / ".data.lock", tmp_path / "log.txt"
    mp.start_processes(_locked_writer, args=(str(lock), str(log)), nprocs=3, start_method="fork")
    lines = log.read_text().split()
    pairs = [(lines[i], lines[i + 2], lines[i + 1], lines[i + 3]) for i in range(0, len(lines), 4)]
    assert len(pairs) == 3 and all(a == b and (c, d) == ("in", "out") for a, b, c, d in pairs), lines


# ---------------------------------------------------------------- train.py with two processes

def _logged_metrics(log_file: Path) -> dict:
    """The metrics dict that training.py logs at the end (each rank writes its own log file)."""
    text = log_file.read_text()
    start = text.rindex("metrics: {") + len("metrics: ")
    return json.JSONDecoder().raw_decode(text[start:])[0]


def _evaluate_checkpoint_in_one_process(best: str) -> tuple[dict, object]:
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from multimodal_rec.stored_config import instantiate_stored

    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    cfg = OmegaConf.create(checkpoint["multimodal_rec"]["config"])
    pl.seed_everything(cfg.seed)  # the same start as every rank of the run (see the feature-cache note below)
    datamodule = instantiate_stored(cfg.data)  # a stored config builds the package's own classes only
    model = instantiate_stored(cfg.model)(datamodule=datamodule)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True, verbose=False)
    return model.test_metrics, datamodule


@pytest.mark.slow
def test_two_process_run_reports_the_metrics_of_a_single_process_evaluation(tmp_path):
    import hydra
    import pytorch_lightning as pl

    # 101 users: odd numbers of val/test users, so a padding sampler would count a user twice; eval batches
    # of 15 give the ranks different numbers of validation batches
    overrides = ["debug=fast", f"data.processed_dir={tmp_path / 'data'}", f"paths.cache_dir={tmp_path / 'cache'}",
                 "data.source.n_users=101", "data.batch_size=32", "data.eval_batch_size=15",
                 "trainer.fast_dev_run=false", "trainer.max_epochs=2"]
    # Fill the feature cache first. With the random-init tiny encoders of debug=fast, whether the image
    # features are computed or read changes the global RNG before the text encoder is initialised, hence
    # its weights: rank 0 (cache miss) and rank 1 (started later: hit) would otherwise differ.
    with hydra.initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = hydra.compose("train", overrides=overrides)
    pl.seed_everything(cfg.seed)
    hydra.utils.instantiate(cfg.model)(datamodule=hydra.utils.instantiate(cfg.data))

    run_dir = tmp_path / "run"
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), *overrides, "trainer=ddp", "trainer.devices=2",
               f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((run_dir / "metrics.json").read_text())

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints, checkpoints  # one best + last, no duplicates
    best = result["best_checkpoint"]
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    assert checkpoint["multimodal_rec"]["world_size"] == 2

    single, datamodule = _evaluate_checkpoint_in_one_process(best)
    steps_per_epoch = math.ceil(math.ceil(len(datamodule.train_set) / 2) / datamodule.batch_size)
    assert steps_per_epoch < math.ceil(len(datamodule.train_set) / datamodule.batch_size)
    # each rank trained on its half of the windows per epoch
    assert checkpoint["global_step"] == (checkpoint["epoch"] + 1) * steps_per_epoch
    n_test = len(datamodule.eval_sets["test"])
    assert n_test % 2 == 1 and single["test/n_users"] == n_test
    assert single["test_cold/n_users"] == len(datamodule.eval_sets["test_cold"]) > 0

    reported = {k: v for k, v in result["metrics"].items() if k.startswith("test")}
    assert reported.keys() == single.keys()
    for key, value in single.items():
        assert reported[key] == pytest.approx(value, abs=1e-6), key
    assert result["metrics"]["val/n_users"] == len(datamodule.eval_sets["val"])

    # every rank computed the same global numbers (rank 0 logs to train.log, rank 1 to its own file)
    rank0, rank1 = _logged_metrics(run_dir / "train.log"), _logged_metrics(run_dir / "train_ddp_process_1.log")
    assert rank0 == rank1 and rank0["test/n_users"] == n_test
