"""Every config composes, and what it names builds (as lightning-hydra-template's tests/test_configs.py).

The cases come from the files in conf/, so a new config is covered without editing this file:
- each top-level config (conf/*.yaml) composes and resolves, its `???` values given dummy paths;
- each option of each of its groups (conf/<group>/*.yaml) composes alone on top of its defaults;
- each option of train.yaml's groups trains (train(), in this process) for one short epoch with `debug=fast`'s
  tiny encoders: data, model, callbacks, loggers, trainer, then test on the chosen checkpoint. Data configs that
  read files get small generated ones where a generator exists, else skip saying why; trainer options that
  need CUDA or start processes (DDP) are composed and their strategy built, not run;
- the sweep parameters of each hparams_search option name existing settings, and a trial of them trains;
- each conf/index option builds its IndexSpec (and FAISS accepts its factory), each conf/baseline option its
  baseline (fitted for one epoch on a tiny shop);
- logger=tensorboard in a real train.py run writes an events file with the validation metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from multimodal_rec.config import CONF_DIR, ConfigError, require_cuda
from tests.conftest import ML100K_MM, SHARED_DATA, train_tiny

TOP_LEVEL = sorted(path.stem for path in CONF_DIR.glob("*.yaml"))

# The `???` values a user gives on the command line (ckpt_path=..., data.source.folder=...): composing fills
# them with dummy paths. Any other `???` left in a composed config fails its case.
USER_SUPPLIED = {"ckpt_path": "model.ckpt", "out": "out", "artifacts": "artifacts", "embeddings": "embeddings",
                 "users": "users.txt", "data.source.folder": "shop"}

# Options that are bases of the others, not used alone: the `???` keys they leave to the configs built on them.
ABSTRACT = {("data", "default"): {"data.name", "data.source"}}

# conf/ folders that no top-level config lists as a group, and the test of this file that covers each.
OTHER_FOLDERS = {"baseline": "test_baseline_config_builds_and_fits"}

# Short runs: one epoch of two batches, one validation and one test batch, on the tiny encoders.
SHORT_RUN = ["trainer.fast_dev_run=false", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
             "trainer.limit_val_batches=1", "++trainer.limit_test_batches=1", "++trainer.enable_progress_bar=false",
             "++trainer.enable_model_summary=false", "trainer.log_every_n_steps=1"]

SYNTHETIC_READER = "multimodal_rec.data.sources.synthetic.read_synthetic"


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def groups_of(config_name: str) -> list[str]:
    """The config groups a top-level config's defaults list selects (paths, data, ...)."""
    try:
        defaults = OmegaConf.load(CONF_DIR / f"{config_name}.yaml").get("defaults", [])
    except Exception:  # a broken file: its test_top_level_config_composes case says how
        return []
    groups = []
    for entry in defaults:
        if isinstance(entry, DictConfig):
            for key in entry:
                group = str(key).removeprefix("override ").lstrip("/").split("@")[0]
                if (CONF_DIR / group).is_dir():
                    groups.append(group)
    return groups


GROUP_OPTIONS = [(top, group, option) for top in TOP_LEVEL for group in groups_of(top) for option in options(group)]
TRAIN_OPTIONS = [(group, option) for top, group, option in GROUP_OPTIONS if top == "train"]


@pytest.fixture(autouse=True)
def _no_hydra_config_left():
    """Composing sets Hydra's global run config (for `${hydra:runtime.output_dir}`): gone after each test."""
    yield
    HydraConfig.instance().cfg = None


def _missing_keys(cfg, prefix: str = ""):
    """The `???` keys of `cfg` (dotted), without resolving interpolations (OmegaConf.missing_keys does)."""
    keys = range(len(cfg)) if OmegaConf.is_list(cfg) else cfg.keys()
    for key in keys:
        node = cfg._get_node(key)
        if node._is_missing():
            yield f"{prefix}{key}"
        elif OmegaConf.is_config(node) and not node._is_interpolation() and not node._is_none():
            yield from _missing_keys(node, f"{prefix}{key}.")


def compose_job(config_name: str, overrides: list[str], output_dir: Path, missing_allowed: set[str] = frozenset()
                ) -> DictConfig:
    """`config_name` composed with `overrides` as `python <script> <overrides>` would run it from `output_dir`:
    the job's config (without `hydra`), the `???` values of USER_SUPPLIED given dummy paths, every value
    resolved once to check it (unresolved in what is returned, as Hydra hands it to the task)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)  # what Hydra sets for a run (paths.output_dir reads it)
    HydraConfig.instance().set_config(cfg)
    for key in ("hydra.run.dir", "hydra.sweep.dir"):  # the folders of a run and a sweep (with ${now:...})
        assert OmegaConf.select(cfg, key, throw_on_missing=True), key
    job = OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"])
    missing = set(_missing_keys(job))
    for key in sorted(missing & USER_SUPPLIED.keys()):
        OmegaConf.update(job, key, str(output_dir / "given" / USER_SUPPLIED[key]))
    left = missing - USER_SUPPLIED.keys()
    if missing_allowed:
        assert left == missing_allowed, f"expected only {sorted(missing_allowed)} missing, got {sorted(left)}"
        return job
    assert not left, f"mandatory values (???) left after composing {config_name} {overrides}: {sorted(left)}"
    OmegaConf.to_container(job, resolve=True, throw_on_missing=True)  # every interpolation resolves
    if "paths" in job:
        assert OmegaConf.select(job, "paths.output_dir") == str(output_dir)
    return job


# ------------------------------------------------------------------------------------------------ composing


@pytest.mark.parametrize("config_name", TOP_LEVEL)
def test_top_level_config_composes(config_name: str, tmp_path):
    assert compose_job(config_name, [], tmp_path)


@pytest.mark.parametrize(("config_name", "group", "option"), GROUP_OPTIONS,
                         ids=[f"{top}:{group}={option}" for top, group, option in GROUP_OPTIONS])
def test_group_option_composes(config_name: str, group: str, option: str, tmp_path):
    job = compose_job(config_name, [f"{group}={option}"], tmp_path, ABSTRACT.get((group, option), set()))
    global_package = "@package _global_" in (CONF_DIR / group / f"{option}.yaml").read_text()
    if (group, option) not in ABSTRACT and not global_package:  # a _global_ one may set keys anywhere
        assert job.get(group) is not None, f"{group}={option} left {group} empty"


def test_every_config_folder_is_tested():
    groups = {group for top in TOP_LEVEL for group in groups_of(top)}
    folders = {path.name for path in CONF_DIR.iterdir() if path.is_dir() and any(path.glob("*.yaml"))}
    untested = folders - groups - OTHER_FOLDERS.keys()
    assert not untested, f"conf/ folders no test here covers: {sorted(untested)} (a group no top-level config lists)"


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> dict[str, Path]:
    """Data and feature-cache folders shared by this module's runs (each dataset prepared once)."""
    root = tmp_path_factory.mktemp("configs")
    return {"data": root / "data", "cache": root / "cache", "files": root / "files"}


def _example_shop(layout: str) -> Callable[[Path], list[str]]:
    def write(folder: Path) -> list[str]:
        from multimodal_rec.data.sources.example_shop import write_example_shop

        shop = folder / layout
        if not shop.is_dir():
            write_example_shop(shop, layout, n_items=60, n_users=30, seed=3)
        return [f"data.source.folder={shop}"]
    return write


def _shared_ml100k(folder: Path) -> list[str]:
    if not (ML100K_MM / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real data not found at {ML100K_MM} (set MMREC_SHARED_DATA to its parent folder)")
    return [f"paths.shared_data={SHARED_DATA}"]


def _absent(reason: str) -> Callable[[Path], list[str]]:
    def skip(folder: Path) -> list[str]:
        pytest.skip(reason)
    return skip


# How a data config that reads files (any reader but the synthetic generator) gets them here: overrides
# naming generated files, or a skip saying why it cannot.
DATA_FILES: dict[str, Callable[[Path], list[str]]] = {
    "tabular": _example_shop("csv"),
    "amazon2023": _example_shop("amazon2023"),
    "amazon2018": _absent("needs the raw Amazon Review Data 2018 files (<category>.json, meta_<category>.json); "
                          "no generator writes that layout"),
    "ml100k_mm": _shared_ml100k,
    "ml100k": _shared_ml100k,
}
SLOW_DATA = {"ml100k_mm", "ml100k"}  # the real MovieLens-100k: seconds to prepare and encode 1682 posters


def _needs_a_device_or_processes(option: str) -> bool:
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            trainer = compose("train", overrides=[f"trainer={option}"]).trainer
    except Exception:  # does not compose: its cases here fail saying how (collecting must not)
        return False
    return "strategy" in trainer or str(trainer.get("accelerator")) in ("gpu", "cuda")


def _train_cases() -> list:
    cases = []
    for group, option in TRAIN_OPTIONS:
        marks = []
        if (group, option) in ABSTRACT:
            marks.append(pytest.mark.skip(reason=f"conf/{group}/{option}.yaml is a base of the other {group} configs"))
        elif group == "trainer" and _needs_a_device_or_processes(option):
            continue  # test_trainer_option_builds
        elif group == "data" and option in SLOW_DATA:
            marks.append(pytest.mark.slow)
        cases.append(pytest.param(group, option, marks=marks, id=f"{group}={option}"))
    return cases


def _sweep_trial(option: str) -> list[str]:
    """Overrides of one trial of conf/hparams_search/<option>.yaml's sweep: each parameter's last choice, the
    start of its interval or range."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        params = compose("train", overrides=[f"hparams_search={option}"], return_hydra_config=True).hydra.sweeper.get(
            "params") or {}
    trial = []
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        value = override.value()
        if isinstance(value, ChoiceSweep):
            value = value.list[-1]
        elif isinstance(value, IntervalSweep):
            value = value.start
        elif override.is_sweep_override():
            value = next(iter(override.sweep_iterator()))
        else:
            value = override.get_value_element_as_str()
        trial.append(f"{override.get_key_element()}={value}")
    return trial


def _logger_folders(job: DictConfig) -> list[Path]:
    folders = []
    for logger in (job.get("logger") or {}).values():
        settings = OmegaConf.to_container(logger, resolve=True)
        folders.append(Path(settings["save_dir"]) / settings.get("name", ""))
    return folders


@pytest.mark.parametrize(("group", "option"), _train_cases())
def test_train_option_trains_a_short_epoch(group: str, option: str, run_dirs, tmp_path):
    from multimodal_rec.training import train

    overrides = [f"{group}={option}"] if group == "debug" else ["debug=fast", f"{group}={option}"]
    overrides += [f"paths.data_dir={run_dirs['data']}", f"paths.cache_dir={run_dirs['cache']}", *SHORT_RUN]
    if group == "data":
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            reader = compose("train", overrides=[f"data={option}"]).data.source.get("_target_")
        if reader != SYNTHETIC_READER:
            assert option in DATA_FILES, (f"conf/data/{option}.yaml reads files ({reader}): say in DATA_FILES of "
                                          "tests/test_configs.py how this test gets them, or why it skips")
            overrides += DATA_FILES[option](run_dirs["files"])
    if group == "hparams_search":
        overrides += _sweep_trial(option)
    if group == "logger" and any("TensorBoard" in str(c.get("_target_")) for c in _logger_configs(option)):
        _need_tensorboard()
    job = compose_job("train", overrides, tmp_path)

    result = train(job)

    assert (tmp_path / "metrics.json").is_file()
    assert Path(result["best_checkpoint"]).is_file() and Path(result["best_checkpoint"]).is_relative_to(tmp_path)
    assert math.isfinite(result["metrics"][job.optimized_metric])
    if job.get("test"):
        assert any(key.startswith("test/") for key in result["metrics"])
    for folder in _logger_folders(job):  # every configured logger wrote into the run's folder
        assert folder.is_relative_to(tmp_path) and any(p.is_file() for p in folder.rglob("*")), folder


def _logger_configs(option: str) -> list[DictConfig]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return list((compose("train", overrides=[f"logger={option}"]).logger or {}).values())


def _need_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pytest.skip("logger=tensorboard needs the tensorboard package (pip install -e '.[dev]')")


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_option_builds(option: str, tmp_path):
    """Trainers are built with the default callbacks and loggers, as train() does; one that needs CUDA is refused
    on a machine without it as train() refuses it, one with a strategy (DDP) gets its strategy built but no
    Trainer (fitting it would start processes)."""
    import pytorch_lightning as pl

    job = compose_job("train", [f"trainer={option}"], tmp_path)
    accelerator = str(job.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            require_cuda(accelerator, f"trainer={option}", "trainer=cpu")
    if "strategy" in job.trainer:
        assert isinstance(hydra.utils.instantiate(job.trainer.strategy), pl.strategies.Strategy)
        return
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        return
    callbacks = [hydra.utils.instantiate(c) for c in job.callbacks.values()]
    loggers = [hydra.utils.instantiate(c) for c in job.logger.values()]
    trainer = hydra.utils.instantiate(job.trainer, callbacks=callbacks, logger=loggers)
    assert Path(trainer.default_root_dir) == tmp_path
    assert trainer.checkpoint_callback is not None
    assert Path(trainer.checkpoint_callback.dirpath).is_relative_to(tmp_path)
    assert len(trainer.loggers) == len(loggers) and all(Path(lg.save_dir) == tmp_path for lg in trainer.loggers)


# ------------------------------------------------------------------------------------------------ sweeps


@pytest.mark.parametrize("option", options("hparams_search"))
def test_sweep_searches_settings_that_exist(option: str, tmp_path):
    job = compose_job("train", [f"hparams_search={option}"], tmp_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        sweeper = compose("train", overrides=[f"hparams_search={option}"], return_hydra_config=True).hydra.sweeper
    params = OmegaConf.to_container(sweeper.get("params") or {})
    assert params, f"conf/hparams_search/{option}.yaml sweeps nothing"
    absent = [key for key in params if OmegaConf.select(job, key, default="<absent>") == "<absent>"]
    assert not absent, f"swept settings that the composed train config does not have: {absent}"
    if "optuna" in str(sweeper.get("_target_")):
        from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

        searched, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
        assert set(searched) | set(fixed) == set(params)
        hydra.utils.instantiate(sweeper.sampler)  # the Optuna sampler


# ------------------------------------------------------------------------------------------------ index, baselines


@pytest.mark.parametrize("option", options("index"))
def test_index_config_builds_its_spec(option: str, tmp_path):
    from multimodal_rec.indexing.spec import IndexSpec, load_spec

    job = compose_job("index", [f"index={option}"], tmp_path)
    spec = hydra.utils.instantiate(job.index)
    assert isinstance(spec, IndexSpec) and spec == load_spec(option)
    for dim in (64, 65):  # an export's vectors, and with item biases (one more column)
        factory, params = spec.resolve(n=20_000, dim=dim)  # FAISS builds an empty index of the factory
        assert "{" not in factory and params["train_rows"] <= spec.train_size


@pytest.fixture(scope="module")
def tiny_split(tiny_shop_dir):
    from multimodal_rec.data.schema import load_dataset
    from multimodal_rec.data.splits import build_split

    return build_split(load_dataset(tiny_shop_dir), 0.1, 0)


@pytest.mark.parametrize("option", options("baseline"))
def test_baseline_config_builds_and_fits(option: str, tiny_split):
    from multimodal_rec.baselines.base import Recommender

    settings = OmegaConf.load(CONF_DIR / "baseline" / f"{option}.yaml")
    quick = {"epochs": 1, "device": "cpu", "progress": False}
    settings = OmegaConf.merge(settings, {k: v for k, v in quick.items() if k in settings})
    model = hydra.utils.instantiate(settings)
    assert isinstance(model, Recommender) and model.name == option
    item_vectors = torch.randn(tiny_split.n_items, 8, generator=torch.Generator().manual_seed(0))
    metrics = model.fit(tiny_split, item_vectors).evaluate(tiny_split, "test")
    assert metrics["n_users"] > 0 and 0.0 <= metrics["hr@10"] <= 1.0


# ------------------------------------------------------------------------------------------------ TensorBoard


@pytest.mark.slow
def test_train_py_with_logger_tensorboard_writes_the_validation_metrics(tmp_path):
    _need_tensorboard()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_tiny(tmp_path, "logger=tensorboard", "trainer.max_epochs=1")
    run = tmp_path / "run"
    events = sorted((run / "tensorboard").glob("version_*/events.out.tfevents.*"))
    assert len(events) == 1, sorted(p.relative_to(run) for p in run.rglob("*"))
    assert not (run / "csv").exists()  # the logger group's option replaces CSV
    written = EventAccumulator(str(events[0]))
    written.Reload()
    logged = written.Scalars("val/ndcg@10")
    assert len(logged) == 1  # one epoch, validated once
    metrics = OmegaConf.load(run / "metrics.json").metrics
    assert logged[0].value == pytest.approx(metrics["val/ndcg@10"], abs=1e-6)
