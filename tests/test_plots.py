"""multimodal_rec.plots: the PCA against a hand-made case, and each figure drawn from small inputs."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from multimodal_rec.plots import (
    first_labels,
    pca_2d,
    plot_embedding_map,
    plot_gallery,
    plot_training_curves,
    read_metrics_csv,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_pca_finds_the_axes_of_most_variance():
    rng = np.random.default_rng(0)
    # Centred, exactly uncorrelated columns: spread 10 along e3, 2 along e1, nothing elsewhere. The first principal
    # axis is then e3 and the second e1 (signs free).
    a, b = rng.normal(size=(2, 500))
    a, b = a - a.mean(), b - b.mean()
    b -= (a @ b) / (a @ a) * a
    a, b = 10 * a / a.std(), 2 * b / b.std()
    vectors = np.zeros((500, 5))
    vectors[:, 2], vectors[:, 0] = a, b
    points = pca_2d(vectors + 7.0)  # an offset the centring removes
    assert points.shape == (500, 2)
    np.testing.assert_allclose(np.abs(points[:, 0]), np.abs(a), atol=1e-9)
    np.testing.assert_allclose(np.abs(points[:, 1]), np.abs(b), atol=1e-9)
    with pytest.raises(ValueError, match="at least 2 vectors"):
        pca_2d(np.ones((1, 4)))


def test_first_labels_takes_the_first_of_a_list():
    values = pd.Series([["Comedy", "Drama"], [], "shoes", None, np.array(["Action"])], dtype=object)
    assert first_labels(values).tolist() == ["Comedy", "none", "shoes", "none", "Action"]


def test_training_curves_from_a_csv_logger_folder(tmp_path):
    folder = tmp_path / "csv" / "version_1"
    folder.mkdir(parents=True)
    rows = []
    for epoch in range(3):
        rows += [{"epoch": epoch, "step": 2 * epoch + s, "train/loss": 5.0 - epoch - s / 2} for s in range(2)]
        rows.append({"epoch": epoch, "step": 2 * epoch + 1, "val/ndcg@10": [0.1, 0.3, 0.2][epoch]})
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    (tmp_path / "csv" / "version_0").mkdir()  # an older, empty version is not picked
    metrics = read_metrics_csv(tmp_path)
    fig = plot_training_curves(metrics)
    left, right = fig.axes
    assert len(left.lines[0].get_xdata()) == 6
    np.testing.assert_allclose(right.lines[0].get_ydata(), [0.1, 0.3, 0.2])
    assert "best: epoch 2, 0.3000" in right.get_legend().get_texts()[0].get_text()
    with pytest.raises(KeyError, match="val/recall"):
        plot_training_curves(metrics, metric="val/recall")
    with pytest.raises(FileNotFoundError):
        read_metrics_csv(tmp_path / "nowhere")


def test_gallery_shows_images_placeholders_and_reasons(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 30), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    items = pd.DataFrame({"item_id": [1, 2, 3, 4], "title": ["red", "shape", "none", "broken"],
                          "image": ["a.png", "synthetic:v1;shape=1;layout=0;color=00ff00;pattern=0;seed=1", None,
                                    "broken.jpg"]})
    answer = [{"item_id": 3, "title": "none", "reason": {"text": "similar to 'red' (mostly by image)"}},
              {"item_id": 4, "title": "broken", "reason": {"text": "popular in the catalogue"}},
              {"item_id": 1, "title": "red", "reason": {"text": "popular in the catalogue"}}]
    fig = plot_gallery(items, [1, 2, 99], answer, tmp_path, size=32, max_history=2)
    top, bottom = fig.axes[:3], fig.axes[3:]  # 3 columns: the longer of the two rows
    assert [a.get_xlabel() for a in top] == ["shape", "item 99", ""]  # the last 2 of the history, one empty slot
    assert bottom[0].get_xlabel() == "none\nsimilar to 'red'\n(mostly by image)"
    assert [t.get_text() for t in bottom[0].texts] == ["no image"]
    assert [t.get_text() for t in bottom[1].texts] == ["unreadable image"]
    assert top[0].images[0].get_array().shape == (32, 32, 3)


def test_embedding_map_colours_the_frequent_labels_and_greys_the_rest():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(60, 8)).astype(np.float32)
    labels = np.array(["a"] * 30 + ["b"] * 20 + ["c"] * 6 + ["d"] * 4, dtype=object)
    fig = plot_embedding_map(vectors, labels, max_labels=2)
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["other (10)", "a (30)", "b (20)"]
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 60
    with pytest.raises(ValueError, match="labels for"):
        plot_embedding_map(vectors, labels[:5])
