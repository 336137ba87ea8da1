"""The LightningDataModule: prepares the dataset if needed, splits it, serves sequences and features."""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from multimodal_rec.data.features import ItemFeatures, UserFeatures, build_item_features, build_user_features
from multimodal_rec.data.schema import MANIFEST_FILE, CanonicalDataset, load_dataset
from multimodal_rec.data.sequences import EvalRows, TrainWindows, collate_eval
from multimodal_rec.data.splits import Split, build_split
from multimodal_rec.distributed import EvalShardSampler, file_lock, rank_and_world_size

log = logging.getLogger(__name__)
STALE_SETTINGS = "prepared with other source settings"


def cut_time_of(timestamps: np.ndarray, before_quantile: float | None = None,
                before_time: int | float | None = None) -> int:
    """T of a time cut, epoch seconds: `before_time` as given, or the time by which `before_quantile` of all
    events had happened (the timestamp of the event at position floor(q * n) in time order, so at most q * n
    events come before it; ties at T all fall after the cut)."""
    if (before_quantile is None) == (before_time is None):
        raise ValueError("a time cut takes one of before_quantile and before_time")
    if before_time is not None:
        return int(np.ceil(before_time))  # timestamps are whole seconds: t < ceil(T) exactly when t < T
    if not 0.0 < before_quantile < 1.0:
        raise ValueError(f"before_quantile must be in (0, 1), got {before_quantile}")
    ordered = np.sort(np.asarray(timestamps, dtype=np.int64))
    if not len(ordered):
        raise ValueError("no interactions to cut")
    return int(ordered[int(np.floor(before_quantile * len(ordered)))])


def cut_before(data: CanonicalDataset, before_quantile: float | None = None,
               before_time: int | float | None = None) -> tuple[CanonicalDataset, dict]:
    """The dataset as it was at T (see `cut_time_of`): the interactions at or after T dropped, the users with no
    earlier event dropped from the users table (the model never knows them), every item kept (those with no
    earlier event are the new arrivals, cold for the model); and a record of the cut."""
    timestamps = data.interactions["timestamp"].to_numpy(np.int64)
    cut = cut_time_of(timestamps, before_quantile, before_time)
    keep = timestamps < cut
    if not keep.any():
        raise ValueError(f"no interaction happened before the time cut {cut}")
    interactions = data.interactions[keep].reset_index(drop=True)
    users = data.users[data.users["user_id"].isin(pd.unique(interactions["user_id"]))].reset_index(drop=True)
    record = {
        "time": cut,
        "iso": datetime.fromtimestamp(cut, timezone.utc).isoformat(),
        "before_quantile": before_quantile,
        "before_time": before_time,
        "events_kept": int(keep.sum()),
        "events_dropped": int((~keep).sum()),
        "users_kept": len(users),
        "users_dropped": len(data.users) - len(users),
        "items_without_events": int((~data.items["item_id"].isin(interactions["item_id"])).sum()),
    }
    manifest = {**data.manifest, "time_cut": record}  # the base fingerprint stays; RecDataModule.fingerprint adds T
    return CanonicalDataset(data.root, data.items, users, interactions, manifest), record


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)


class RecDataModule(pl.LightningDataModule):
    """Training windows, validation/test rows (warm and cold-start) and item/user feature tables."""

    def __init__(
        self,
        name: str,
        processed_dir: str,
        source: DictConfig | dict | None = None,
        max_len: int = 50,
        cold_item_fraction: float = 0.0,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        text_tokenizer: str = "minilm",
        max_text_len: int = 64,
        image_size: int = 224,
        window_stride: int | None = None,
        train_on_validation: bool = False,
        validation_gap: int = 0,
        before_quantile: float | None = None,
        before_time: int | float | None = None,
    ):
        super().__init__()
        self.name = name
        self.processed_dir = Path(processed_dir)
        self.source = source
        self.max_len, self.cold_item_fraction, self.seed = max_len, cold_item_fraction, seed
        self.window_stride, self.train_on_validation = window_stride, train_on_validation
        self.validation_gap = validation_gap
        if before_quantile is not None and before_time is not None:
            raise ValueError("set one of data.before_quantile and data.before_time, not both")
        self.before_quantile, self.before_time = before_quantile, before_time
        self.cut_time: dict | None = None  # after setup() with a time cut: T ("time", "iso") and what it dropped
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.user_level_sampling = False  # set by training with privacy=dp
        self.text_tokenizer, self.max_text_len, self.image_size = text_tokenizer, max_text_len, image_size
        self.dataset: CanonicalDataset | None = None
        self.split: Split | None = None
        self.item_features: ItemFeatures | None = None
        self.user_features: UserFeatures | None = None

    def prepare_data(self) -> None:
        """Writes the canonical dataset from `source` when the processed folder is not there yet, or was prepared
        with other source settings (then again, so a changed reader option takes effect). Processes started
        together (torchrun, srun) take turns under a file lock: the first prepares, the rest find it."""
        if self._why_prepare() is None:
            return
        if self.source is None:
            raise FileNotFoundError(f"{self.processed_dir} is not a prepared dataset and no source is configured")
        from multimodal_rec.data.prepare import prepare

        with file_lock(self.processed_dir.parent / f".{self.processed_dir.name}.lock"):
            reason = self._why_prepare()
            if reason is None:
                return
            (log.warning if reason == STALE_SETTINGS else log.info)(
                "preparing %s into %s (%s)", self.name, self.processed_dir, reason)
            prepare(self.source, self.processed_dir)

    def _why_prepare(self) -> str | None:
        """None when the processed folder is there and, with a source configured, was prepared with these
        settings; else why it must be prepared."""
        path = self.processed_dir / MANIFEST_FILE
        if not path.is_file():
            return "not prepared yet"
        if self.source is None:
            return None
        from multimodal_rec.data.prepare import source_settings

        with open(path) as handle:
            prepared_with = json.load(handle).get("source_settings")
        return None if prepared_with == source_settings(self.source) else STALE_SETTINGS

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        self.dataset = load_dataset(self.processed_dir)
        if self.before_quantile is not None or self.before_time is not None:
            self.dataset, self.cut_time = cut_before(self.dataset, self.before_quantile, self.before_time)
            log.info("time cut at %s (%d): %d events before it kept, %d dropped; %d users without an earlier event "
                     "dropped; %d items without one (new arrivals)", self.cut_time["iso"], self.cut_time["time"],
                     self.cut_time["events_kept"], self.cut_time["events_dropped"], self.cut_time["users_dropped"],
                     self.cut_time["items_without_events"])
        self.split = build_split(self.dataset, self.cold_item_fraction, self.seed, self.train_on_validation,
                                 self.validation_gap)
        if self.cut_time:  # the new arrivals (no event before T) are never trained on: cold, for the export too
            arrivals = np.setdiff1d(np.arange(self.split.n_items), self.split.items)
            self.split = dataclasses.replace(self.split, cold_items=np.union1d(self.split.cold_items, arrivals))
        self.item_features = build_item_features(self.dataset, self.text_tokenizer, self.max_text_len)
        self.user_features = build_user_features(self.dataset)
        self.train_set = TrainWindows(self.split, self.max_len, self.window_stride)
        self.eval_sets = {s: EvalRows(self.split, s, self.max_len) for s in ("val", "test", "val_cold", "test_cold")}
        log.info(
            "%s: %d users, %d items (%d cold), %d training windows, %d test users (+%d on cold items)",
            self.name, self.split.n_users, self.split.n_items, len(self.split.cold_items),
            len(self.train_set), len(self.eval_sets["test"]), len(self.eval_sets["test_cold"]),
        )

    @property
    def fingerprint(self) -> str:
        """Data + split: what a checkpoint or a feature cache must match."""
        assert self.dataset is not None, "call setup() first"
        trained = "-trainval" if self.train_on_validation else ""  # a refit trained on other interactions
        trained += f"-gap{self.validation_gap}" if self.validation_gap else ""  # or on fewer
        trained += f"-before{self.cut_time['time']}" if self.cut_time else ""  # the events before T only
        return f"{self.dataset.fingerprint}-cold{self.cold_item_fraction}-seed{self.seed}{trained}"

    def rank_and_world_size(self) -> tuple[int, int]:
        """(rank, number of processes) of the attached Trainer, else of torch.distributed, else (0, 1)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return rank_and_world_size()

    def _loader(self, dataset, batch_size: int, shuffle: bool = False, collate=None,
                sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_seed_worker,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled windows; with several processes each rank gets its own shard (`batch_size` per rank),
        reshuffled every epoch (Lightning calls the sampler's `set_epoch`)."""
        rank, world_size = self.rank_and_world_size()
        if self.user_level_sampling:  # privacy=dp: users Poisson-sampled, one window each
            if world_size > 1:
                raise ValueError("privacy=dp trains in one process: the accountant assumes one sampler")
            from multimodal_rec.data.user_sampling import user_sampled_loader

            return user_sampled_loader(self.train_set, self.batch_size, self.seed)
        if world_size == 1:
            return self._loader(self.train_set, self.batch_size, shuffle=True)
        sampler = DistributedSampler(self.train_set, num_replicas=world_size, rank=rank, shuffle=True,
                                     seed=self.seed)
        return self._loader(self.train_set, self.batch_size, sampler=sampler)

    def eval_dataloader(self, stage: str) -> DataLoader:
        """Users in order; with several processes each rank gets a contiguous, unpadded slice, so that over
        all ranks every user is evaluated exactly once (the model sums the metric states across ranks)."""
        rows = self.eval_sets[stage]
        rank, world_size = self.rank_and_world_size()
        if world_size == 1:
            return self._loader(rows, self.eval_batch_size, collate=collate_eval)
        if stage in ("val", "test") and len(rows) < world_size:
            # a rank without a single batch skips the evaluation loop and never joins the metric sync
            raise ValueError(f"the {stage} set has {len(rows)} users, fewer than the {world_size} processes")
        return self._loader(rows, self.eval_batch_size, collate=collate_eval,
                            sampler=EvalShardSampler(rows, world_size, rank))

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> list[DataLoader]:
        """Warm test users first; the cold-start test set second when there is one."""
        return [self.eval_dataloader(s) for s in self.test_stages()]

    def test_stages(self) -> list[str]:
        return ["test"] + (["test_cold"] if len(self.eval_sets["test_cold"]) else [])

