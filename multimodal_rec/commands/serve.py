"""Serve recommendations over HTTP from an artifact folder (export + index).

    python serve.py artifacts=artifacts/synthetic port=8000      # then open http://127.0.0.1:8000/docs
    MMREC_WRITE_TOKEN=$(cat token) python serve.py ...           # enables POST/DELETE /items and /admin/*
    python serve.py ... max_in_flight=0                          # never sheds load (503 + Retry-After)
"""

import gc
import sys
from pathlib import Path

import hydra
import torch
import uvicorn
from omegaconf import DictConfig, OmegaConf

from multimodal_rec.config import CONF_DIR
from multimodal_rec.embeddings import EmbeddingsError
from multimodal_rec.serving import access_log
from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import load_tokens
from multimodal_rec.serving.live import LiveSettings
from multimodal_rec.serving.service import RecommenderService


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="serve")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(cfg.torch_threads)
    try:
        tokens = load_tokens(cfg.auth)
        log_key = access_log.load_key(cfg.log_key_env, cfg.log_key_file)
        root = Path(cfg.artifacts_root or Path(cfg.artifacts).resolve().parent)
        journal = cfg.journal or root / "journal.jsonl"
        events = cfg.events or root / "events.sqlite"
        live = LiveSettings(**OmegaConf.to_container(cfg.live, resolve=True))
        service = RecommenderService(cfg.artifacts, cfg.index_name, artifacts_root=root, journal=journal,
                                     events=events, live=live, event_weights=cfg.event_weights)
    except (EmbeddingsError, OSError, ValueError, TypeError) as error:  # a bad folder, token file or setting
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    writes = "enabled" if tokens.write else "disabled (no write token configured)"
    reads = "need the read token" if tokens.read else "open"
    print(f"serving {service.describe()} on http://{cfg.host}:{cfg.port}: the shopping guide at /, docs at "
          f"/docs; writes {writes}, reads {reads}", flush=True)
    access_log.install(log_key)  # user ids in paths are hashed (keyed) in the access log
    app = create_app(service, cfg.max_body_bytes, tokens, cfg.image_root, max_in_flight=cfg.max_in_flight,
                     batch_wait_ms=cfg.batch_wait_ms, batch_max=cfg.batch_max)
    # What is loaded now (the artifacts, the model, ~500k objects of the libraries) lives as long as the server:
    # out of the garbage collector's full passes, which otherwise stopped every request for 0.1-0.3 s under load
    # (p99 at 32 clients; a reload collects the old artifacts and freezes the new ones: app.py)
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)

if __name__ == "__main__":
    main()
