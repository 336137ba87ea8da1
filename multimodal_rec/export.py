"""Checkpoint -> item and user embeddings (Parquet shards + manifest) and the parts serving needs.

    python -m multimodal_rec.export ckpt_path=<checkpoint or run folder> out=artifacts/ml100k_mm
    torchrun --nproc-per-node 2 -m multimodal_rec.export ckpt_path=... out=...   # ranks split the shards

Items: the whole catalogue, cold-start items included (encoded from content). Users: every user,
from their full history (last `max_len` items), their profile and the hour of their last event.
Shards are streamed (bounded memory), written atomically and recorded in `progress.json`, so a
killed export run again with the same command continues where it stopped. The manifest is
written last; without it the folder is refused by `index` and serving.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from multimodal_rec import embeddings as emb
from multimodal_rec.config import CONF_DIR, ConfigError, require_cuda
from multimodal_rec.data.schema import DatasetError
from multimodal_rec.data.sequences import hour_of_day

log = logging.getLogger(__name__)


def user_batch(split, user_features_rows: np.ndarray, max_len: int, pad: int) -> dict:
    """The query tower's inputs for users' full histories: (B, L) left-padded items, hour of the last event."""
    history = np.full((len(user_features_rows), max_len), pad, dtype=np.int64)
    hours = np.zeros(len(user_features_rows), dtype=np.int64)
    for row, user in enumerate(user_features_rows):
        seq = split.sequence(int(user))[-max_len:]
        if len(seq):
            history[row, max_len - len(seq):] = seq
            hours[row] = hour_of_day(split.timestamps[split.offsets[user + 1] - 1])
    return {"history": torch.from_numpy(history), "user": torch.from_numpy(np.asarray(user_features_rows)),
            "context_hour": torch.from_numpy(hours)}


@torch.no_grad()
def user_vectors(model, split, users: np.ndarray, max_len: int) -> torch.Tensor:
    """(B, d) query vectors (unit for cosine) from full histories; only the items in these histories are
    encoded."""
    batch = user_batch(split, users, max_len, model.pad)
    items, inverse = torch.unique(batch["history"], return_inverse=True)
    real = items[items != model.pad].to(model.device)
    vectors = torch.zeros(len(items), model.hparams.dim, device=model.device)
    vectors[: len(real)] = model.item_vectors(real)  # pad (the largest index) sorts last
    history_vectors = vectors[inverse.to(model.device)]  # (B, L, d)
    history = batch["history"].to(model.device)
    profile = model.users(batch["user"].to(model.device))
    return model.encode_history(history, history_vectors, profile, batch["context_hour"].to(model.device))[:, -1]


class Exporter:
    """Writes the shards a rank owns (shard i belongs to rank i % world_size) and, on rank 0, the manifest."""

    def __init__(self, model, datamodule, checkpoint_sha256: str, out: str | Path, shard_size: int = 50_000,
                 batch_size: int = 1024, dtype: str = "float32", rank: int = 0, world_size: int = 1,
                 checkpoint_path: str = "", privacy: dict | None = None):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {dtype!r}")
        if shard_size < 1 or batch_size < 1:
            raise ValueError("shard_size and batch_size must be positive")
        self.model, self.datamodule, self.out = model, datamodule, Path(out)
        self.privacy = privacy  # what a privacy=dp run spent (the checkpoint's record); None: trained without
        self.split = datamodule.split
        self.shard_size, self.batch_size, self.dtype = shard_size, batch_size, dtype
        self.rank, self.world_size, self.checkpoint_path = rank, world_size, str(checkpoint_path)
        self.settings = {"checkpoint_sha256": checkpoint_sha256, "data_fingerprint": datamodule.fingerprint,
                         "dim": int(model.retrieval_dim), "dtype": dtype, "shard_size": shard_size,
                         "max_len": datamodule.max_len,
                         "cold_offset": float(model.hparams.get("cold_offset", 0.0))}  # in the last column
        self.ids = {"items": datamodule.dataset.items["item_id"].to_numpy(np.int64),
                    "users": datamodule.dataset.users["user_id"].to_numpy(np.int64)}

    def _progress_path(self) -> Path:
        return self.out / (emb.PROGRESS_FILE if self.world_size == 1 else f"progress-rank{self.rank}.json")

    def _done(self) -> dict:
        """Shards already written by any rank under the same settings (a rerun resumes from them)."""
        done = {}
        for path in self.out.glob("progress*.json"):
            state = emb.load_json(path)
            if state.get("settings") != self.settings:
                raise emb.EmbeddingsError(
                    f"{self.out} holds a partial export made with other settings ({path.name}: "
                    f"{state.get('settings')}); delete the folder or choose another `out`")
            for entry in state.get("shards", []):
                path = self.out / entry["file"]
                if path.is_file() and emb.sha256_file(path) == entry["sha256"]:
                    done[entry["file"]] = entry
        return done

    def run(self) -> dict | None:
        self.out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        done = self._done()
        plan = [(kind, number) for kind in ("items", "users")
                for number in range(math.ceil(len(self.ids[kind]) / self.shard_size))]
        owned = [emb.shard_name(k, n) for i, (k, n) in enumerate(plan) if i % self.world_size == self.rank]
        mine = [done[name] for name in owned if name in done]
        todo = [(k, n) for k, n in plan if emb.shard_name(k, n) in owned and emb.shard_name(k, n) not in done]
        if len(todo) < len(plan) and todo:
            log.info("resuming export: %d of %d shards already written", len(plan) - len(todo), len(plan))
        for kind, number in tqdm(todo, desc=f"exporting embeddings (rank {self.rank})", unit="shard",
                                 disable=not todo):
            lo, hi = number * self.shard_size, min((number + 1) * self.shard_size, len(self.ids[kind]))
            vectors = np.concatenate([self._vectors(kind, np.arange(start, min(start + self.batch_size, hi)))
                                      for start in range(lo, hi, self.batch_size)])
            entry = emb.write_shard(self.out, kind, number, self.ids[kind][lo:hi], vectors, self.dtype)
            mine.append(entry)
            emb.write_json_atomic(self._progress_path(), {"settings": self.settings, "shards": mine})
        _barrier(self.world_size)
        if self.rank != 0:
            return None
        done = self._done()
        missing = [emb.shard_name(k, n) for k, n in plan if emb.shard_name(k, n) not in done]
        if missing:
            raise emb.EmbeddingsError(f"export incomplete: {len(missing)} shards missing (e.g. {missing[0]}); "
                                      "run the same command again to finish it")
        manifest = {
            "format": emb.FORMAT, **self.settings, "checkpoint": self.checkpoint_path,
            "metric": "inner_product",
            "normalised": not self.model.has_bias_column and self.model.hparams.score == "cosine",
            "score": self.model.hparams.score,
            # with item biases or a cold offset the last column is the item's bias (x temperature for cosine, +
            # the offset for items never trained on) and 1 for users
            "item_bias": self.model.has_bias_column,
            "data": self.datamodule.name, "counts": {k: int(len(v)) for k, v in self.ids.items()},
            "shards": {k: [done[emb.shard_name(k, n)] for kk, n in plan if kk == k] for k in ("items", "users")},
            "world_size": self.world_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            # users removed from the data (python -m multimodal_rec.data.forget) since it was prepared
            "forgotten_users": int(self.datamodule.dataset.manifest.get("forgotten_users", 0)),
            "privacy": self.privacy,
            "seconds": round(time.time() - started, 2),
        }
        emb.write_json_atomic(self.out / emb.MANIFEST_FILE, manifest)
        for path in self.out.glob("progress*.json"):
            path.unlink()
        return manifest

    @torch.no_grad()
    def _vectors(self, kind: str, rows: np.ndarray) -> np.ndarray:
        if kind == "items":
            embeddings = self.model.item_embeddings(torch.from_numpy(rows).to(self.model.device))
            vectors = self.model.retrieval_items(*embeddings)
        else:
            vectors = self.model.retrieval_queries(user_vectors(self.model, self.split, rows, self.datamodule.max_len))
        return vectors.float().cpu().numpy()


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; joins the process group when there are several."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world_size


def export(cfg: DictConfig) -> dict | None:
    from multimodal_rec.models.loading import resolve_checkpoint, restore_model

    rank, world_size = _distributed()
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    require_cuda(device, f"device={device}", "device=auto or device=cpu")
    if device == "cuda" and world_size > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    overrides = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None
    checkpoint = resolve_checkpoint(cfg.ckpt_path)
    model, datamodule, saved = restore_model(checkpoint, overrides, device)
    if cfg.get("cold_offset") is not None:  # not trained: a setting of the export as much as of the model
        model.hparams.cold_offset = float(cfg.cold_offset)
    manifest_path = Path(cfg.out) / emb.MANIFEST_FILE
    checkpoint_sha = emb.sha256_file(checkpoint)
    if manifest_path.is_file():
        previous = emb.load_json(manifest_path)
        same = (previous.get("checkpoint_sha256") == checkpoint_sha
                and previous.get("cold_offset", 0.0) == float(model.hparams.get("cold_offset", 0.0)))
        if same:
            log.info("%s already holds a complete export of this checkpoint", cfg.out)
            manifest = previous
            # serving parts: cheap, and brings older ones up to date
            return _finish(cfg, model, datamodule, manifest) if rank == 0 else manifest
        if not cfg.overwrite:
            raise emb.EmbeddingsError(f"{cfg.out} holds the export of another checkpoint (or cold_offset); pass "
                                      "overwrite=true to replace it, or choose another `out`")
        _barrier(world_size)
        if rank == 0:
            manifest_path.unlink()  # first, so the folder never looks complete while shards change
    exporter = Exporter(model, datamodule, checkpoint_sha, cfg.out, cfg.shard_size, cfg.batch_size, cfg.dtype,
                        rank, world_size, checkpoint, saved["multimodal_rec"].get("privacy"))
    manifest = exporter.run()
    return _finish(cfg, model, datamodule, manifest) if manifest is not None else None


def _finish(cfg: DictConfig, model, datamodule, manifest: dict) -> dict:
    """Rank 0, after the shards: the serving parts, then the serving journal when one is given. The manifest
    records each serving file's sha256 after they are written (and again after the journal rewrote some):
    serving refuses files it does not list."""
    from multimodal_rec.export_journal import drop_intake, take_in
    from multimodal_rec.serving.parts import record_serving_files, write_serving_parts

    out = Path(cfg.out)
    manifest = drop_intake(out, manifest)  # a previous run's intake is rebuilt from the journal given, if any
    if cfg.get("journal") and not cfg.serving_parts:
        raise emb.EmbeddingsError("journal= needs serving_parts=true: its items are encoded like the server does")
    if not cfg.serving_parts:
        if "files" in manifest:  # no parts written: none are vouched for (older ones may remain)
            manifest = {key: value for key, value in manifest.items() if key != "files"}
            emb.write_json_atomic(out / emb.MANIFEST_FILE, manifest)
        return manifest
    # the time of the data's last event: a server replays only the live events after it (serving/live.py)
    timestamps = datamodule.split.timestamps
    manifest = {**manifest, "events_until": int(timestamps.max()) if len(timestamps) else None}
    write_serving_parts(model, datamodule, out, manifest)
    manifest = record_serving_files(out, manifest)
    if cfg.get("journal"):
        manifest = record_serving_files(out, take_in(out, manifest, cfg.journal))  # it rewrites the catalogue
    return manifest


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        manifest = export(cfg)
    except (DatasetError, ConfigError, emb.EmbeddingsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if manifest is not None:
        print(f"exported {manifest['counts']} vectors of dim {manifest['dim']} -> {cfg.out}")


if __name__ == "__main__":
    main()
