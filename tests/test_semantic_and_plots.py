"""Semantic decoding metrics against scikit-learn, and the comparison figures and Markdown table."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, hamming_loss, roc_auc_score

from raydecode.errors import ConfigError
from raydecode.evaluate.plots import metrics_table_md, retrieval_png, tsne_png
from raydecode.evaluate.retrieval import retrieval_top1
from raydecode.evaluate.semantic import semantic_metrics


def _labels(rng, n=200, c=80, rate=0.1):
    return (rng.random((n, c)) < rate).astype(np.int64)


def test_semantic_metrics_equal_sklearn_and_skip_classes_without_positives():
    rng = np.random.default_rng(0)
    labels = _labels(rng)
    labels[:, [3, 17, 42]] = 0  # no positive: no average precision
    labels[:, 5] = 1  # no negative: in the mAP, not in the AUC
    scores = rng.normal(size=labels.shape) + 1.5 * labels
    out = semantic_metrics(scores, labels)
    pos = labels.sum(0) > 0
    both = pos & (labels.sum(0) < len(labels))
    assert out["classes"] == 77
    assert out["map"] == pytest.approx(np.mean([average_precision_score(labels[:, k], scores[:, k])
                                                for k in np.flatnonzero(pos)]))
    assert out["auc"] == pytest.approx(roc_auc_score(labels[:, both], scores[:, both], average="macro"))
    assert out["hamming"] == pytest.approx(hamming_loss(labels, (scores >= 0).astype(int)))
    # probabilities: the same ranks, thresholded as given
    probs = 1 / (1 + np.exp(-scores))
    assert semantic_metrics(probs, labels, logits=False) == pytest.approx(out)
    assert semantic_metrics(probs, labels, threshold=0.9, logits=False)["hamming"] == pytest.approx(
        hamming_loss(labels, (probs >= 0.9).astype(int)))


def test_perfect_scores_give_map_and_auc_one_and_no_wrong_bits():
    labels = _labels(np.random.default_rng(1))
    out = semantic_metrics(np.where(labels == 1, 4.0, -4.0), labels)
    assert out["map"] == pytest.approx(1.0)
    assert out["auc"] == pytest.approx(1.0)
    assert out["hamming"] == 0.0


def test_random_scores_give_chance_auc_and_map_near_the_positive_rate():
    rng = np.random.default_rng(2)
    labels = _labels(rng, n=2000, c=20, rate=0.2)
    out = semantic_metrics(rng.normal(size=labels.shape), labels)
    assert out["auc"] == pytest.approx(0.5, abs=0.05)
    assert out["map"] == pytest.approx(labels.mean(), abs=0.05)
    assert out["map"] == pytest.approx(out["chance_map"], abs=0.02)  # the chance level it reports
    assert out["hamming"] == pytest.approx(0.5, abs=0.05)


def test_chance_map_is_random_scores_expected_map_on_a_small_test_set():
    """30 images, rare classes: random rankings average the reported chance mAP, far above the mean prevalence."""
    rng = np.random.default_rng(3)
    labels = _labels(rng, n=30, c=40, rate=0.06)
    maps = [semantic_metrics(rng.normal(size=labels.shape), labels)["map"] for _ in range(400)]
    chance = semantic_metrics(rng.normal(size=labels.shape), labels)["chance_map"]
    has = labels.sum(0) > 0
    assert np.mean(maps) == pytest.approx(chance, abs=0.01), (np.mean(maps), chance)
    assert chance > 1.5 * labels[:, has].mean(), (chance, labels[:, has].mean())


def test_semantic_metrics_refuse_mismatched_shapes_and_unscorable_labels():
    with pytest.raises(ConfigError, match=r"\(10, 80\).*\(10, 79\)"):
        semantic_metrics(np.zeros((10, 80)), np.zeros((10, 79)))
    with pytest.raises(ConfigError, match="both positive and negative"):
        semantic_metrics(np.zeros((10, 4)), np.zeros((10, 4)))
    with pytest.raises(ConfigError, match="multi-hot"):
        semantic_metrics(np.zeros((4, 2)), np.array([[0, 2], [1, 0], [0, 1], [1, 0]]))


def _is_png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"
        return im.size


def test_retrieval_png_draws_every_label(tmp_path):
    rng = np.random.default_rng(3)
    image = rng.normal(size=(60, 16))
    results = {"averaged": retrieval_top1(image + 0.3 * rng.normal(size=image.shape), image, candidates=20, draws=5),
               "single trial": retrieval_top1(image + rng.normal(size=image.shape), image, candidates=20, draws=5),
               "no intervals": {"brain_to_image_top1": 0.4, "image_to_brain_top1": 0.35}}
    assert "brain_to_image_top1_ci95" in results["averaged"]
    w, h = _is_png(retrieval_png(results, str(tmp_path / "a" / "retrieval.png")))
    assert w > 300 and h > 200
    _is_png(retrieval_png(results, str(tmp_path / "chance.png"), chance=1 / 300))
    with pytest.raises(ConfigError, match="image_to_brain_top1"):
        retrieval_png({"x": {"brain_to_image_top1": 0.5}}, str(tmp_path / "bad.png"))
    assert not (tmp_path / "bad.png").exists()


def test_tsne_keeps_two_separated_clusters_apart(tmp_path):
    rng = np.random.default_rng(4)
    cluster = np.repeat([0, 1], 30)
    x = rng.normal(size=(60, 32)) + 8.0 * cluster[:, None]
    categories = np.zeros((60, 80), np.int64)
    categories[np.arange(60), rng.integers(0, 15, 60)] = 1
    categories[:5] = 0  # no category: grey
    xy = tsne_png(x, np.where(cluster == 0, 1, 2), categories, str(tmp_path / "tsne.png"), title="shared latent")
    assert xy.shape == (60, 2)
    _is_png(tmp_path / "tsne.png")
    centroids = np.stack([xy[cluster == k].mean(0) for k in (0, 1)])
    spread = max(np.linalg.norm(xy[cluster == k] - centroids[k], axis=1).max() for k in (0, 1))
    assert np.linalg.norm(centroids[0] - centroids[1]) > spread
    # nearest centroid (a linear split) recovers the clusters
    nearest = np.linalg.norm(xy[:, None] - centroids[None], axis=-1).argmin(1)
    assert (nearest == cluster).mean() > 0.95
    # the same seed, the same map; no categories, one panel
    assert np.allclose(tsne_png(x, cluster, None, str(tmp_path / "one.png")), xy)
    with pytest.raises(ConfigError, match="at least 5"):
        tsne_png(x[:4], cluster[:4], None, str(tmp_path / "few.png"))


def test_metrics_table_md_has_a_row_per_model_and_dashes_for_missing_metrics():
    rows = {"mindeye2": {"pixcorr": 0.32151, "ssim": 0.4312, "map": 0.5},
            "duala": {"pixcorr": 0.29, "ssim": float("nan")},
            "ridge": {"pixcorr": 0.123456, "ssim": 0.25, "map": 0.1}}
    md = metrics_table_md(rows, ["pixcorr", "ssim", "map"])
    lines = md.splitlines()
    assert len(lines) == 2 + len(rows)
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["model", "pixcorr", "ssim", "map"]
    assert set(lines[1]) <= set("|-: ")
    assert all(line.startswith("|") and line.endswith("|") and line.count("|") == 5 for line in lines)
    duala = [c.strip() for c in lines[3].strip("|").split("|")]
    assert duala == ["duala", "0.29", "\u2013", "\u2013"]
    assert "0.3215" in lines[2] and "0.1235" in lines[4]
