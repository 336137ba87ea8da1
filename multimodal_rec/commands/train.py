"""Train the multimodal recommender (`mmrec train`, or `python train.py` in a checkout).

    mmrec train                              # the synthetic shop, CPU or CUDA
    mmrec train experiment=ml100k_mm         # MovieLens-100k with posters and plot lines
    mmrec train trainer=gpu                  # CUDA, bf16 mixed precision
    mmrec train ckpt_path=<run>/checkpoints/last.ckpt   # resume an interrupted run
"""

import sys

import hydra
from omegaconf import DictConfig

from multimodal_rec.config import CONF_DIR, ConfigError
from multimodal_rec.data.schema import DatasetError
from multimodal_rec.training import TrainingInterrupted, train


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        result = train(cfg)
    except (DatasetError, ConfigError) as error:  # unusable data or settings: one clear line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingInterrupted as stopped:  # not a success: `train && export` must not go on
        print(f"error: {stopped}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, as a shell reports a process the signal ended
    return result["metrics"].get(cfg.get("optimized_metric"))  # the chosen checkpoint's figure, for sweeps


if __name__ == "__main__":
    main()
