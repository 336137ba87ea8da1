"""The training run behind train.py: data -> model -> fit -> test on the best checkpoint -> metrics.json.

metrics.json's val/* figures are those of the checkpoint that is tested and exported (the best epoch by
validation; under privacy=dp the last), which each checkpoint carries, not the last epoch's. A run stopped by
SIGTERM raises TrainingInterrupted and writes no metrics.json (train.py then exits 143).

With `refit=true` the run then trains the same model again from scratch on the training and validation
targets, for as many epochs as validation chose, and tests that model (the test target is never trained on).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from multimodal_rec.config import ConfigError, require_cuda
from multimodal_rec.embeddings import write_json_atomic

log = logging.getLogger(__name__)
VAL_FIGURES = "val_metrics"  # the checkpoint's key for the validation figures of its epoch


class TrainingInterrupted(Exception):
    """SIGTERM stopped the run before it finished: nothing was tested and no metrics.json was written."""


class ValidationFigures(pl.Callback):
    """Stores the epoch's val/* figures in every checkpoint, so that metrics.json (and the value a sweep
    optimises) reports the chosen epoch's, not the last epoch's."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[VAL_FIGURES] = _val_metrics(trainer)


def _val_metrics(trainer: pl.Trainer) -> dict:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}


def chosen_val_metrics(trainer: pl.Trainer, checkpoint: str) -> dict:
    """The val/* figures of `checkpoint` (the one tested and exported); the last epoch's when there is none."""
    if not checkpoint:
        return _val_metrics(trainer)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get(VAL_FIGURES)
    if saved is not None:
        return {k: float(v) for k, v in saved.items()}
    chooser = trainer.checkpoint_callback  # a checkpoint from before the figures were stored (a resumed run)
    if chooser and chooser.monitor and chooser.best_model_path == checkpoint and chooser.best_model_score is not None:
        log.warning("%s holds no validation figures: metrics.json reports only its %s", checkpoint, chooser.monitor)
        return {chooser.monitor: float(chooser.best_model_score)}
    return _val_metrics(trainer)


def _interrupted(cfg: DictConfig) -> TrainingInterrupted:
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    resume = (f"run it again with ckpt_path={last} to resume" if last.is_file()
              else "no checkpoint was saved yet: run it again")
    return TrainingInterrupted(f"training was interrupted (SIGTERM) and wrote no metrics.json; {resume}")


def train(cfg: DictConfig) -> dict:
    """Fits the configured model; returns (and writes to `<run dir>/metrics.json`) its metrics. Raises
    TrainingInterrupted when SIGTERM stops it."""
    try:
        return _train(cfg)
    except SIGTERMException as stop:  # Lightning's: a SystemExit without a code, which would exit 0
        raise _interrupted(cfg) from stop


def _check_sigterm(trainer: pl.Trainer) -> None:
    """A SIGTERM that came after Lightning's last look at it (it raises at batch and epoch ends)."""
    if trainer.received_sigterm:
        raise SIGTERMException


def _train(cfg: DictConfig) -> dict:
    started = time.time()
    require_cuda(cfg.trainer.get("accelerator", "auto"), "trainer=gpu",
                 "trainer=default (the GPU when there is one, else the CPU) or trainer=cpu")
    if cfg.get("refit") and cfg.data.get("validation_gap"):
        raise ConfigError("refit=true trains on the validation targets and data.validation_gap holds the steps before "
                          "them out of training, to tune on: use one or the other")
    if cfg.get("refit") and (cfg.get("privacy") or {}).get("enabled"):  # what model.privacy is built from
        raise ConfigError("refit=true chooses its epochs on validation, privacy=dp trains for the planned steps "
                          "without looking at it: use one or the other")
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)(datamodule=datamodule)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.get("init_from"):  # fine-tune an earlier model on the data as it is now (models/warm_start.py)
        if cfg.get("ckpt_path"):
            raise ConfigError("init_from starts a new run from a model's weights, ckpt_path resumes a run: one or "
                              "the other")
        from multimodal_rec.models.loading import resolve_checkpoint
        from multimodal_rec.models.warm_start import warm_start

        datamodule.prepare_data()
        datamodule.setup("fit")
        warm_start(model, resolve_checkpoint(cfg.init_from), datamodule.dataset.items)
    callbacks = [hydra.utils.instantiate(c) for c in cfg.get("callbacks", {}).values()] + [ValidationFigures()]
    private = model.privacy is not None
    if private:  # choosing an epoch by validation would be a selection on user data the guarantee does not cover
        datamodule.user_level_sampling = True
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.EarlyStopping)]
    loggers = [hydra.utils.instantiate(c) for c in cfg.get("logger", {}).values()]
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"gradient_clip_val": None} if private else {})  # DP clips per user
    trainer: pl.Trainer = hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers)
    fit_seconds = timed_fit(trainer, model, datamodule, ckpt_path=cfg.get("ckpt_path"))
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if private:  # the last weights, trained for the planned steps (their figures are the last epoch's)
        best = str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
        best = best if Path(best).is_file() else ""
    metrics = chosen_val_metrics(trainer, best)
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        _check_sigterm(trainer)
        metrics.update(model.test_metrics)
    refit = None
    if cfg.get("refit"):
        if not best:
            raise ValueError("refit=true needs the best checkpoint by validation (callbacks.model_checkpoint)")
        refit = {"selected_checkpoint": best, "test_before_refit": {k: v for k, v in metrics.items()
                                                                     if k.startswith("test")}}
        trainer, model, datamodule, best, refit_seconds = _refit(cfg, best)
        fit_seconds += refit_seconds
        refit["epochs"] = trainer.current_epoch
        if cfg.get("test"):
            trainer.test(model, datamodule=datamodule, ckpt_path=best, weights_only=True)
            _check_sigterm(trainer)
            metrics.update(model.test_metrics)
    result = {
        "metrics": metrics,
        "best_checkpoint": best,
        "epochs": trainer.current_epoch,
        "seconds": round(time.time() - started, 1),  # all of it: setup, training, testing
        "fit_seconds": round(fit_seconds, 1),
        "data": datamodule.name,
        "data_fingerprint": datamodule.fingerprint,
    }
    if refit:
        result["refit"] = refit
    if private:
        result["privacy"] = model.privacy.report()
        log.info("privacy: %s", result["privacy"])
    if trainer.is_global_zero:  # under DDP every rank has the same (synced) metrics: one writes them
        write_json_atomic(Path(cfg.paths.output_dir) / "metrics.json", result)
    log.info("metrics: %s", json.dumps(metrics, indent=1))
    return result


def _refit(cfg: DictConfig, selected: str) -> tuple:
    """Trains the configured model from scratch with the validation targets in the training data, for the
    epochs of the `selected` checkpoint, with the configured callbacks but those that read validation;
    returns (trainer, model, datamodule, path of its last checkpoint)."""
    from multimodal_rec.models.loading import read_checkpoint

    epochs = int(read_checkpoint(selected)["epoch"]) + 1  # its epoch only: the model is built from `cfg`
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.data.train_on_validation = True
    log.info("refit: training again on training + validation targets for %d epochs", epochs)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)(datamodule=datamodule)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)  # export rebuilds the refit's data from it
    out = Path(cfg.paths.output_dir) / "refit"
    callbacks = [c for c in (hydra.utils.instantiate(c) for c in cfg.get("callbacks", {}).values())
                 if not isinstance(c, (pl.callbacks.ModelCheckpoint, pl.callbacks.EarlyStopping))]
    callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", filename="last", monitor=None))
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, max_epochs=epochs, limit_val_batches=0,
                                                  callbacks=callbacks, logger=pl.loggers.CSVLogger(out, name="csv"))
    seconds = timed_fit(trainer, model, datamodule)
    return trainer, model, datamodule, trainer.checkpoint_callback.best_model_path, seconds


def timed_fit(trainer: pl.Trainer, model, datamodule, ckpt_path: str | None = None) -> float:
    """Seconds of `trainer.fit` (training and its validation, as the baselines' fit time counts)."""
    started = time.time()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    _check_sigterm(trainer)
    return time.time() - started


def retest(output_dir: str | Path, expect: dict | None = None) -> dict:
    """Tests a finished run's best checkpoint again and rewrites the test metrics in its metrics.json: a run
    tested by an older evaluation does not need training again. The model is rebuilt as training built it.
    `expect`: config sections (e.g. {"seed": 0, "model": {...}}) the run must have been trained with."""
    from multimodal_rec.models.loading import config_differences, restore_model

    path = Path(output_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{output_dir} has no finished run (metrics.json); train it first")
    result = json.loads(path.read_text())
    model, datamodule, checkpoint = restore_model(result["best_checkpoint"])
    differ = config_differences(checkpoint, expect or {})
    if differ:
        raise ValueError(f"{output_dir} was trained with other {differ} than the settings asked for; train it again")
    trainer = pl.Trainer(devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(model, datamodule=datamodule, verbose=False)
    result["metrics"] = {k: v for k, v in result["metrics"].items() if not k.startswith("test")}
    result["metrics"].update(model.test_metrics)
    result["retested"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json_atomic(path, result)
    return result
