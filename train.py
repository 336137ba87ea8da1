"""Train the multimodal recommender: the same as `mmrec train` (multimodal_rec/commands/train.py).

    python train.py                          # the synthetic shop, CPU or CUDA
    python train.py experiment=ml100k_mm     # MovieLens-100k with posters and plot lines
    python train.py trainer=gpu              # CUDA, bf16 mixed precision
    python train.py ckpt_path=<run>/checkpoints/last.ckpt   # resume an interrupted run
"""

from multimodal_rec.commands.train import main

if __name__ == "__main__":
    main()
