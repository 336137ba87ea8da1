"""Serve recommendations over HTTP from an artifact folder (export + index).

    python serve.py artifacts=artifacts/synthetic port=8000      # then open http://127.0.0.1:8000/docs
"""

import sys

import hydra
import torch
import uvicorn
from omegaconf import DictConfig

from multimodal_rec.config import CONF_DIR
from multimodal_rec.embeddings import EmbeddingsError
from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.service import RecommenderService


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="serve")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.torch_threads)
    try:
        service = RecommenderService(cfg.artifacts, cfg.index_name)
    except EmbeddingsError as error:  # a missing, incomplete or mismatched folder: one clear line
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"serving {service.describe()} on http://{cfg.host}:{cfg.port} (docs at /docs)", flush=True)
    uvicorn.run(create_app(service, cfg.max_body_bytes), host=cfg.host, port=cfg.port, log_level=cfg.log_level)


if __name__ == "__main__":
    main()
