"""A config read back from a file (the one a checkpoint records) is data, never a program.

`hydra.utils.instantiate` calls whatever `_target_` names: a crafted checkpoint naming
`pathlib.Path.write_text` or `builtins.open` would run it at `export` or `restore`. So a stored config may
name only the builders this package's own configs use (the data module, the readers of raw data, the model
and its components) and torch's optimiser and learning-rate scheduler classes; any other target, and any
`${...}` interpolation (stored configs are saved resolved; a resolver such as `oc.env` would read the
environment), is refused before anything is built. A config the user composes from `conf/` is code they
wrote and is not checked here.
"""

from __future__ import annotations

import inspect
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

# every target the package's data/ and model/ configs name; a new one must be added here to be restorable
STORED_TARGETS = frozenset({
    "multimodal_rec.data.datamodule.RecDataModule",
    "multimodal_rec.data.sources.movielens.read_movielens",
    "multimodal_rec.data.sources.synthetic.read_synthetic",
    "multimodal_rec.data.sources.tabular.read_tabular",
    "multimodal_rec.models.build.build_model",
    "multimodal_rec.models.recommender.MultimodalRecommender",
    "multimodal_rec.models.components.image_encoder.ImageEncoder",
    "multimodal_rec.models.components.text_encoder.TextEncoder",
    "multimodal_rec.models.components.item_tower.ItemTower",
    "multimodal_rec.models.components.history_encoder.HistoryEncoder",
    "multimodal_rec.models.components.ranker.Ranker",
})
MAX_DEPTH = 32  # the package's configs nest 4 deep; a deeper one is crafted (and would exhaust the stack)


class StoredConfigError(ValueError):
    """A stored config that names something other than the package's own builders."""


def _torch_class(target: str) -> bool:
    """torch.optim.<Optimizer> or torch.optim.lr_scheduler.<LRScheduler>, looked up, never imported by name."""
    for prefix, namespace, base in (("torch.optim.lr_scheduler.", torch.optim.lr_scheduler,
                                     torch.optim.lr_scheduler.LRScheduler),
                                    ("torch.optim.", torch.optim, torch.optim.Optimizer)):
        if target.startswith(prefix):
            name = target[len(prefix):]
            found = getattr(namespace, name, None) if name.isidentifier() else None
            return inspect.isclass(found) and issubclass(found, base) and found is not base
    return False


def allowed_target(target: Any) -> bool:
    return isinstance(target, str) and (target in STORED_TARGETS or _torch_class(target))


def check_stored_config(node: Any, where: str = "config", depth: int = 0) -> None:
    """Raises StoredConfigError unless every `_target_` in `node` (plain data or an OmegaConf container) is
    allowed and no string interpolates."""
    if depth > MAX_DEPTH:
        raise StoredConfigError(f"{where} is nested more than {MAX_DEPTH} levels deep; not a config this package "
                                "writes")
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        if "_target_" in node and not allowed_target(node["_target_"]):
            raise StoredConfigError(f"{where}._target_ = {str(node['_target_'])[:120]!r} is not one of the "
                                    "package's own builders; a stored config is data and builds nothing else")
        for key, value in node.items():
            check_stored_config(value, f"{where}.{key}", depth + 1)
    elif isinstance(node, list):
        for number, value in enumerate(node):
            check_stored_config(value, f"{where}[{number}]", depth + 1)
    elif isinstance(node, str) and "${" in node:
        raise StoredConfigError(f"{where} = {node[:120]!r} interpolates; stored configs are saved resolved, so "
                                "this one was written by hand")
    elif not (node is None or isinstance(node, (bool, int, float, str))):
        raise StoredConfigError(f"{where} holds a {type(node).__name__}, not plain data")


def instantiate_stored(node: Any, **kwargs) -> Any:
    """`hydra.utils.instantiate` for a config read from a file: checked first (StoredConfigError)."""
    check_stored_config(node)
    return hydra.utils.instantiate(node, **kwargs)
