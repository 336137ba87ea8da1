"""Where the project's configs live, the resolvers they use, and the error for settings that cannot run.
Import before composing configs."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"

# Configs name paths relative to the project root, wherever the command is started from.
os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))


class ConfigError(ValueError):
    """Settings that cannot run together, or not on this machine: refused with one line, before training."""


def require_cuda(device: str, setting: str, instead: str) -> None:
    """Refuses a CUDA device where PyTorch sees none, naming the setting that asked for it and what to use."""
    import torch

    if str(device).split(":")[0] in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting} needs a CUDA GPU and PyTorch sees none (torch.cuda.is_available() is False): "
                          f"use {instead}")
