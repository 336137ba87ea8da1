"""Raw data -> canonical dataset folder.

    python -m multimodal_rec.data.prepare data=ml100k_mm out=data/ml100k_mm
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from multimodal_rec.config import CONF_DIR
from multimodal_rec.data.schema import DatasetError, write_dataset

log = logging.getLogger(__name__)


def prepare(source: DictConfig, out: str | Path) -> dict:
    """Runs the reader named by `source` and writes the dataset to `out` (atomically)."""
    read = hydra.utils.instantiate(source, _partial_=True)  # called here, so its errors reach us unwrapped
    raw = read()
    raw.extra["source_settings"] = source_settings(source)  # a later run with other settings prepares again
    if raw.issues.counts:
        log.warning("%s: %s", raw.source, raw.issues.report())
    manifest = write_dataset(raw, out)
    counts = ", ".join(f"{k}={v}" for k, v in manifest["counts"].items())
    log.info("wrote %s (%s); fingerprint %s", out, counts, manifest["fingerprint"])
    return manifest


def source_settings(source: DictConfig) -> dict:
    """The reader and its arguments, resolved (paths included), as the manifest records them."""
    return OmegaConf.to_container(source, resolve=True)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="prepare")
def main(cfg: DictConfig) -> None:
    try:
        manifest = prepare(cfg.data.source, cfg.out)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"prepared {cfg.data.name} -> {cfg.out}: {manifest['counts']}")
    if manifest["issues"]["counts"]:
        print(f"data issues (dropped or left without the modality): {manifest['issues']['counts']}")


if __name__ == "__main__":
    main()
