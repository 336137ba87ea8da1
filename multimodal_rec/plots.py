"""Figures for notebooks: training curves, a history/recommendations gallery, a 2-D map of item embeddings.

Needs matplotlib (the `dev` extra). Each function returns the figure; in a notebook it is shown inline.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from multimodal_rec.data.images import ImageLoadError, load_image

OTHER = "other"


def read_metrics_csv(run_dir: str | Path) -> pd.DataFrame:
    """The CSV logger's metrics of a training run (`<run>/csv/version_*/metrics.csv`, the latest version)."""
    found = sorted(Path(run_dir).glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not found:
        raise FileNotFoundError(f"no csv/version_*/metrics.csv under {run_dir} (was logger=csv used?)")
    return pd.read_csv(found[-1])


def plot_training_curves(metrics: pd.DataFrame, loss: str = "train/loss", metric: str = "val/ndcg@10") -> Figure:
    """Left: the training loss per logged step; right: the validation metric per epoch (best epoch marked)."""
    for column in (loss, metric):
        if column not in metrics.columns:
            raise KeyError(f"{column!r} is not in the logged metrics; logged: {sorted(metrics.columns)}")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6))
    steps = metrics[["step", loss]].dropna()
    left.plot(steps["step"], steps[loss], lw=1.2)
    left.set(xlabel="step", ylabel=loss, title="training loss")
    epochs = metrics[["epoch", metric]].dropna().groupby("epoch", as_index=False).last()
    right.plot(epochs["epoch"] + 1, epochs[metric], marker="o")
    best = epochs.loc[epochs[metric].idxmax()]
    right.scatter([best["epoch"] + 1], [best[metric]], s=150, facecolors="none", edgecolors="red", zorder=3,
                  label=f"best: epoch {int(best['epoch']) + 1}, {best[metric]:.4f}")
    right.set(xlabel="epoch", ylabel=metric, title="validation (full ranking)")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.legend(loc="lower right")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _show_item(axis, item: pd.Series | None, image_root: str | Path, size: int, caption: str) -> None:
    """One item's image (a grey tile saying why when it has none or it cannot be read) and its caption."""
    ref = None if item is None else item.get("image")
    note = None
    if ref is None or (isinstance(ref, float) and np.isnan(ref)):
        note = "no image"
    else:
        try:
            axis.imshow(load_image(str(ref), image_root, size))
        except ImageLoadError:
            note = "unreadable image"
    if note:
        axis.imshow(np.full((size, size, 3), 0.85))
        axis.text(size / 2, size / 2, note, ha="center", va="center", fontsize=8, color="0.3")
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_xlabel(caption, fontsize=7.5)


def _wrap(text: str, width: int = 22, lines: int = 4) -> str:
    return "\n".join(textwrap.wrap(text, width)[:lines])


def plot_gallery(items: pd.DataFrame, history: list[int], recommendations: list[dict], image_root: str | Path,
                 size: int = 128, max_history: int = 6, title: str = "") -> Figure:
    """Top row: the last `max_history` items of a history; bottom row: the recommended items, each captioned
    with its title and its reason. `items` is the dataset's items table (item_id, title, image);
    `recommendations` are the `items` of a RecommenderService answer (item_id, title, reason)."""
    table = items.set_index("item_id")
    shown = list(history)[-max_history:]
    columns = max(len(shown), len(recommendations), 1)
    fig, axes = plt.subplots(2, columns, figsize=(1.9 * columns, 5.6), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for position, item_id in enumerate(shown):
        item = table.loc[item_id] if item_id in table.index else None
        name = str(item["title"]) if item is not None else f"item {item_id}"
        axes[0, position].axis("on")
        _show_item(axes[0, position], item, image_root, size, _wrap(name))
    for position, answer in enumerate(recommendations):
        item = table.loc[answer["item_id"]] if answer["item_id"] in table.index else None
        reason = answer.get("reason", {}).get("text", "")
        axes[1, position].axis("on")
        _show_item(axes[1, position], item, image_root, size,
                   _wrap(answer["title"]) + "\n" + _wrap(reason, lines=5))
    axes[0, 0].set_title(f"history (last {len(shown)} of {len(history)})", loc="left", fontsize=10)
    axes[1, 0].set_title("recommended, with the reason", loc="left", fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """(N, d) -> (N, 2): the projection on the two principal axes (centred; SVD, no scikit-learn)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    if vectors.ndim != 2 or len(vectors) < 2 or vectors.shape[1] < 2:
        raise ValueError(f"need at least 2 vectors of dimension >= 2, got shape {vectors.shape}")
    centred = vectors - vectors.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)  # rows of `axes`: principal directions
    return centred @ axes[:2].T


def first_labels(values: pd.Series, missing: str = "none") -> np.ndarray:
    """One label per item: the value itself, or the first of a multi-valued one (a list of genres)."""
    def first(value):
        if isinstance(value, (list, tuple, np.ndarray)):
            return str(value[0]) if len(value) else missing
        return missing if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)

    return np.array([first(v) for v in values], dtype=object)


def plot_embedding_map(vectors: np.ndarray, labels: np.ndarray, max_labels: int = 12,
                       title: str = "item embeddings (PCA)") -> Figure:
    """A scatter of the item vectors on their two principal axes, one colour per label; labels beyond the
    `max_labels` most frequent are drawn in grey as `other`."""
    labels = np.asarray(labels, dtype=object)
    if len(labels) != len(vectors):
        raise ValueError(f"{len(labels)} labels for {len(vectors)} vectors")
    points = pca_2d(vectors)
    names, counts = np.unique(labels, return_counts=True)
    kept = list(names[np.argsort(-counts, kind="stable")][:max_labels])
    fig, axis = plt.subplots(figsize=(8, 6.5))
    palette = plt.get_cmap("tab20")  # even entries: the 10 strong colours, odd: their light twins
    rest = ~np.isin(labels, kept)
    if rest.any():
        axis.scatter(points[rest, 0], points[rest, 1], s=6, c="0.75", label=f"{OTHER} ({rest.sum()})")
    for number, name in enumerate(kept):
        mine = labels == name
        colour = palette((2 * number) % 20 if number < 10 else (2 * number + 1) % 20)
        axis.scatter(points[mine, 0], points[mine, 1], s=8, color=colour,
                     label=f"{name} ({mine.sum()})")
    axis.set(xlabel="principal axis 1", ylabel="principal axis 2", title=title)
    axis.legend(fontsize=8, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return fig
