"""Embeddings folder -> FAISS index folder, with recall@10 against exact search measured and recorded.

    python -m multimodal_rec.index embeddings=artifacts/embeddings index=ivf [out=<dir>] [index.nprobe=32]

The Python API (used by serving) lives in `multimodal_rec.indexing` and is re-exported here.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import faiss
import hydra
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from multimodal_rec.config import CONF_DIR
from multimodal_rec.embeddings import EmbeddingsError
from multimodal_rec.indexing import (
    IndexLoadError,
    IndexSpec,
    ItemIndex,
    build_index,
    index_names,
    load_index,
    load_spec,
)

__all__ = ["IndexLoadError", "IndexSpec", "ItemIndex", "build_index", "load_index", "load_spec", "main"]

log = logging.getLogger(__name__)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="index")
def _app(cfg: DictConfig) -> None:
    try:
        embeddings = Path(cfg.embeddings)
    except MissingMandatoryValue:
        _fail("embeddings=<dir> is required (an export folder with manifest.json)")
    if cfg.threads:
        faiss.omp_set_num_threads(int(cfg.threads))
    out = Path(cfg.out) if cfg.out else embeddings / f"index-{cfg.index.name}"
    try:
        manifest = build_index(embeddings, cfg.index, out, recall_queries=cfg.recall_queries, seed=cfg.seed)
    except EmbeddingsError as error:
        _fail(str(error))
    print(f"indexed {manifest['ntotal']} items -> {out}: {manifest['factory']} {manifest['params']}, "
          f"recall@10 = {manifest['recall@10']:.4f} ({manifest['recall_queries']} queries), "
          f"{manifest['bytes_per_vector']:.1f} bytes/vector, built in {manifest['build_seconds']:.1f}s "
          f"on {manifest['device']}")


def main() -> None:
    # Hydra reports an unknown config-group option with its own exit code; name the choices instead.
    for arg in sys.argv[1:]:
        if arg.startswith("index=") and arg.split("=", 1)[1] not in index_names():
            _fail(f"unknown index {arg.split('=', 1)[1]!r}: choose one of {', '.join(index_names())}")
    _app()


if __name__ == "__main__":
    main()
