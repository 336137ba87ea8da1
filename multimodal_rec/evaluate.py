"""Evaluation: every baseline and the multimodal model on one dataset, in one run, one protocol.

Each model runs in its own child process, so training time and peak memory are its own. Prints one
table for the warm test users and one for the cold-start items, and writes both as JSON.

    mmrec evaluate                                            # ml100k_mm (needs MMREC_SHARED_DATA)
    mmrec evaluate --models popularity item_knn sasrec multimodal
    mmrec evaluate --models sasrec multimodal --seeds 0 1 2 3 4   # mean (and sd of NDCG@10) of seeds
    mmrec evaluate --models sasrec -- baseline.sasrec.dim=128      # a baseline's own settings
    mmrec evaluate --models sasrec --refit -- data.cold_item_fraction=0   # as experiment=ml100k_mm_serve

(`python -m multimodal_rec.evaluate` and `python bench/quality.py` are the same command.)

`--refit` reports every model trained again with the validation targets after its selection on validation
(train.py's `refit=true`): a model trained by epochs for its best epoch, the others on the larger data.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from multimodal_rec.data.splits import build_split
from multimodal_rec.evaluation.report import add_rows, data_overrides, print_tables, train_config
from multimodal_rec.evaluation.significance import user_gains
from multimodal_rec.training import train, write_json_atomic

MODELS = ("popularity", "user_knn", "item_knn", "bpr_mf", "content", "dnn", "sasrec", "multimodal")
STAGES = ("test", "test_cold")


def run_baseline(name: str, base: list[str], out: Path, seed: int, extra: list[str], refit: bool = False) -> dict:
    import hydra
    from omegaconf import OmegaConf

    from multimodal_rec.config import CONF_DIR
    from multimodal_rec.models.encoders_setup import build_bundle

    cfg = train_config(out, [*base, *(o for o in extra if o.startswith("data."))])  # the same data as the model
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup()
    item_vectors = None
    if name == "content":  # the frozen (cached) text and image features of the multimodal model
        from multimodal_rec.baselines.content import item_vectors_from_features

        encoders = {k: hydra.utils.instantiate(cfg.model[k]) for k in ("image_encoder", "text_encoder")}
        items = build_bundle(datamodule, ("image", "text"), cache_dir=cfg.model.cache_dir, **encoders).item_inputs
        import torch
        import torch.nn.functional as F

        item_vectors = torch.cat([  # text, image and attributes, each L2-normalised (missing image: zeros)
            F.normalize(items.text[:-1].float(), dim=1),
            F.normalize(items.image[:-1].float(), dim=1) * items.has_image[:-1, None],
            F.normalize(item_vectors_from_features(datamodule.item_features), dim=1),
        ], dim=1)
    settings = OmegaConf.load(CONF_DIR / "baseline" / f"{name}.yaml")  # the package's own config, as composed ones
    if not str(settings.get("_target_", "")).startswith("multimodal_rec.baselines."):
        raise ValueError(f"conf/baseline/{name}.yaml names {settings.get('_target_')!r}: a baseline config builds "
                         "one of multimodal_rec.baselines' classes only")
    if "seed" in settings:
        settings.seed = seed
    if settings.get("window_stride", "absent") is None:  # the sequence baseline trains on the model's windows
        settings.window_stride = cfg.data.window_stride
    prefix = f"baseline.{name}."  # e.g. baseline.sasrec.dim=128
    own = [o[len(prefix):] for o in extra if o.startswith(prefix)]
    settings = OmegaConf.merge(settings, OmegaConf.from_dotlist(own))
    baseline = hydra.utils.instantiate(settings)
    started = time.time()
    baseline.fit(datamodule.split, item_vectors)
    split, metrics = datamodule.split, {}
    if refit:  # the selected model's test metrics too, as train.py keeps them
        metrics.update(evaluated(baseline, datamodule, split, ("test",), prefix="before_refit/"))
        split = build_split(datamodule.dataset, datamodule.cold_item_fraction, datamodule.seed,
                            train_on_validation=True)
        if getattr(baseline, "best_epoch", -1) > 0:  # chosen on validation: now as many epochs, none checked
            settings = OmegaConf.merge(settings, {"epochs": baseline.best_epoch, "eval_every": 0})
        baseline = hydra.utils.instantiate(settings)
        baseline.fit(split, item_vectors)
    seconds = time.time() - started
    metrics.update(evaluated(baseline, datamodule, split, STAGES))
    # per user, for bench/significance.py (evaluation/significance.py)
    write_json_atomic(out / "per_user.json", user_gains(baseline.score, split, datamodule.max_len))
    return {"metrics": metrics, "seconds": round(seconds, 1)}


def evaluated(baseline, datamodule, split, stages: tuple, prefix: str = "") -> dict:
    """`<prefix><stage>/<metric>` of a fitted baseline on the stages the data has users for."""
    metrics = {}
    for stage in stages:
        if len(datamodule.eval_sets[stage]):
            values = baseline.evaluate(split, stage, max_len=datamodule.max_len)
            metrics.update({f"{prefix}{stage}/{k}": v for k, v in values.items()})
    return metrics


def run_multimodal(base: list[str], out: Path, extra: list[str], seed: int, refit: bool = False) -> dict:
    extra = [o for o in extra if not o.startswith("baseline.")]  # the baselines' own settings
    result = train(train_config(out, [*base, f"seed={seed}", f"refit={refit}", *extra]))
    before = result.get("refit", {}).get("test_before_refit", {})
    metrics = {**result["metrics"], **{f"before_refit/{k}": v for k, v in before.items()}}
    return {"metrics": metrics, "seconds": result["fit_seconds"], "epochs": result["epochs"]}  # as a baseline's fit


def child(name: str, base: list[str], out: Path, extra: list[str], seed: int, refit: bool) -> None:
    result = (run_multimodal(base, out, extra, seed, refit) if name == "multimodal"
              else run_baseline(name, base, out, seed, extra, refit))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_child(args, name: str, seed: int) -> dict | None:
    """One model and seed in its own process (its own training time and peak memory)."""
    command = [sys.executable, "-m", "multimodal_rec.evaluate", "--data", args.data, "--out", str(args.out),
               "--child", name, "--seed", str(seed), *(["--refit"] if args.refit else []), *args.overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"{name} (seed {seed}): failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="ml100k_mm", help="experiment ml100k_mm, or a data config name")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", default=Path("logs/bench/quality"), type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="a run per seed; the table averages them")
    parser.add_argument("--refit", action="store_true",
                        help="train each model again with the validation targets for the epochs it chose")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*",
                        help="extra Hydra overrides for the multimodal model; data.* ones for every model, "
                             "baseline.<name>.* ones for that baseline (its conf/baseline/<name>.yaml)")
    args = parser.parse_args()
    base = data_overrides(args.data)
    if args.child:
        child(args.child, base, args.out / f"{args.child}_seed{args.seed}", args.overrides, args.seed, args.refit)
        return
    rows = {stage: [] for stage in STAGES}
    for name in args.models:
        results = [run_child(args, name, seed) for seed in args.seeds]
        results = [r for r in results if r is not None]
        if not results:
            continue
        metrics = {key: statistics.fmean(r["metrics"].get(key, float("nan")) for r in results)
                   for key in results[0]["metrics"]}
        ndcg = [r["metrics"].get("test/ndcg@10", float("nan")) for r in results]
        add_rows(rows, name, metrics, **{
            "ndcg@10 sd": statistics.stdev(ndcg) if len(ndcg) > 1 else float("nan"), "seeds": len(results),
            "train s": round(statistics.fmean(r["seconds"] for r in results), 1),
            "peak MiB": round(max(r["peak_rss_mib"] for r in results))})
        print(f"{name}: test ndcg@10 {rows['test'][-1]['ndcg@10']:.4f} (per seed {[round(x, 4) for x in ndcg]}, "
              f"{rows['test'][-1]['train s']} s)", flush=True)
        if args.refit:
            print(f"{name}: before the refit, test ndcg@10 {metrics.get('before_refit/test/ndcg@10', float('nan')):.4f}"
                  f" hr@10 {metrics.get('before_refit/test/hr@10', float('nan')):.4f}", flush=True)
    refit = ", each model refit with the validation targets" if args.refit else ""
    title = f"Quality on {args.data}{refit}: test split, full ranking, all users, mean of seeds {args.seeds}"
    print_tables(rows, title, ("ndcg@10 sd", "seeds", "train s", "peak MiB"))
    write_json_atomic(args.out / "quality.json", rows)


if __name__ == "__main__":
    main()
