"""Rebuilds a trained recommender from its self-describing checkpoint (config + data fingerprint)."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from multimodal_rec.embeddings import EmbeddingsError
from multimodal_rec.stored_config import StoredConfigError, check_stored_config, instantiate_stored

log = logging.getLogger(__name__)


class CheckpointError(EmbeddingsError):
    """A checkpoint that cannot be used: missing, unreadable, or not one of ours."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a training run folder: then its best checkpoint (named in metrics.json)."""
    path = Path(path)
    if path.is_dir():
        metrics = path / "metrics.json"
        if metrics.is_file():
            best = json.loads(metrics.read_text()).get("best_checkpoint")
            if best and Path(best).is_file():
                return Path(best)
        candidates = sorted((path / "checkpoints").glob("epoch_*.ckpt"))
        if len(candidates) == 1:
            return candidates[0]
        raise CheckpointError(f"{path} is a folder without one best checkpoint (metrics.json names none and "
                              f"checkpoints/ holds {len(candidates)} epoch_*.ckpt); give the file")
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = resolve_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except pickle.UnpicklingError as error:
        found = re.search(r"(?i)unsupported global:?\s+(?:global\s+)?([\w.]+)", str(error))  # wording varies
        if not found:
            raise CheckpointError(f"checkpoint {path} cannot be read (not a torch file, or truncated)") from error
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data ({found[1]}), "
                              f"which are not loaded: unpickling them could run code") from error
    except Exception as error:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict) or "multimodal_rec" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a multimodal_rec checkpoint (no 'multimodal_rec' metadata)")
    return checkpoint


def config_differences(checkpoint: dict, expect: dict) -> list[str]:
    """The sections of `expect` (e.g. {"seed": 0, "model": {...}}) that the checkpoint was trained with otherwise."""
    saved = checkpoint["multimodal_rec"]["config"]
    return [key for key, value in expect.items() if saved.get(key) != value]


def restore_model(ckpt_path: str | Path, data_overrides: dict | None = None, device: str = "cpu"):
    """(model in eval mode on `device`, its DataModule, the checkpoint dict).

    The data and model are rebuilt from the config saved in the checkpoint; `data_overrides` (e.g. a
    new `processed_dir` on another machine) are merged into its data section. Loading refuses data
    whose fingerprint differs from the one the model was trained on.
    """
    checkpoint = read_checkpoint(ckpt_path)
    meta = checkpoint["multimodal_rec"]
    saved = meta.get("config")
    if not (isinstance(saved, dict) and all(isinstance(saved.get(k), dict) for k in ("data", "model"))):
        raise CheckpointError(f"{ckpt_path} does not record the data and model config it was trained with")
    try:  # the sections built below are data: they may build the package's own classes and nothing else
        for section in ("data", "model"):
            check_stored_config(saved[section], f"the checkpoint's {section} config")
    except StoredConfigError as error:
        raise CheckpointError(f"{ckpt_path} is refused: {error}") from error
    cfg = OmegaConf.create({"seed": saved.get("seed", 0), "data": saved["data"], "model": saved["model"]})
    if data_overrides:
        cfg.data = OmegaConf.merge(cfg.data, data_overrides)
    pl.seed_everything(int(cfg.seed), workers=True)  # as training did: random-init frozen encoders match
    datamodule = instantiate_stored(cfg.data)
    model = instantiate_stored(cfg.model)(datamodule=datamodule)
    model.on_load_checkpoint(checkpoint)  # refuses other data, with the reason
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_path} does not fit the model its config builds: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.run_config = meta["config"]
    log.info("restored %s (data %s, dim %d)", ckpt_path, meta["data_fingerprint"], meta["dim"])
    return model.to(device).eval(), datamodule, checkpoint
