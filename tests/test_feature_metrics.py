"""The feature-based reconstruction metrics (two-way identification, correlation distance) and the metric networks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import correlation

from raydecode.errors import ConfigError
from raydecode.evaluate.feature_metrics import (
    DEFAULT_NETS,
    MetricNet,
    correlation_distance,
    feature_metrics,
    two_way_identification,
)


def _reference_two_way(recon: np.ndarray, stim: np.ndarray) -> float:
    """MindEye's loop: for every stimulus j and every other reconstruction i, is corr(own recon, j) > corr(i, j)?"""
    n = len(stim)
    wins = 0
    for j in range(n):
        own = np.corrcoef(recon[j], stim[j])[0, 1]
        wins += sum(np.corrcoef(recon[i], stim[j])[0, 1] < own for i in range(n) if i != j)
    return 100.0 * wins / (n * (n - 1))


def test_two_way_identification_matches_the_protocol_and_its_bounds():
    rng = np.random.default_rng(0)
    stim = rng.standard_normal((12, 40))
    noisy = stim + 1.5 * rng.standard_normal(stim.shape)
    assert two_way_identification(noisy, stim) == pytest.approx(_reference_two_way(noisy, stim), abs=1e-9)
    assert two_way_identification(stim, stim) == 100.0
    # reconstructions unrelated to their stimuli: chance, 50%
    big = rng.standard_normal((300, 64))
    assert two_way_identification(rng.standard_normal((300, 64)), big) == pytest.approx(50, abs=3)
    with pytest.raises(ConfigError, match="at least 2"):
        two_way_identification(stim[:1], stim[:1])


def test_correlation_distance_is_scipys_and_zero_for_identical_features():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 30)), rng.standard_normal((5, 30))
    assert correlation_distance(a, b) == pytest.approx(np.mean([correlation(x, y) for x, y in zip(a, b)]), abs=1e-12)
    assert correlation_distance(a, a) == pytest.approx(0, abs=1e-12)


def _images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields (structure for the networks to see), uint8 (n, 48, 48, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 6, 6, 3))
    return np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2).astype(np.uint8)


SMALL_NETS = [
    MetricNet(metric="alexnet2", arch="alexnet", layer="features.4", size=64),
    MetricNet(metric="inception", arch="inception_v3", layer="avgpool", size=96),
    MetricNet(metric="clip", arch="raydecode-tiny-vit", kind="clip", size=32),
    MetricNet(metric="effnet", arch="efficientnet_b1", layer="avgpool", size=64, score="distance"),
]


def test_metric_networks_score_identical_close_and_unrelated_reconstructions_in_order():
    stim = _images(10)
    same = feature_metrics(stim, stim, SMALL_NETS)
    assert same["alexnet2"] == same["inception"] == same["clip"] == 100.0
    assert same["effnet"] == pytest.approx(0, abs=1e-9)
    rng = np.random.default_rng(3)
    close = np.clip(stim.astype(int) + rng.integers(-20, 21, stim.shape), 0, 255).astype(np.uint8)
    other = _images(10, seed=7)
    near, far = feature_metrics(stim, close, SMALL_NETS), feature_metrics(stim, other, SMALL_NETS)
    for m in ("alexnet2", "inception", "clip"):
        assert near[m] > far[m], (m, near, far)
    assert near["effnet"] < far["effnet"]


def test_paper_protocol_layers_and_bad_networks():
    by_name = {n.metric: n for n in DEFAULT_NETS}
    assert set(by_name) == {"alexnet2", "alexnet5", "inception", "clip", "effnet", "swav"}
    assert (by_name["alexnet2"].layer, by_name["alexnet5"].layer) == ("features.4", "features.11")
    assert by_name["effnet"].score == by_name["swav"].score == "distance"
    with pytest.raises(ConfigError, match="no-such-net"):
        feature_metrics(_images(2), _images(2), [MetricNet(metric="x", arch="no-such-net", layer="avgpool", size=32)])
    with pytest.raises(ConfigError, match="missing.pt"):
        feature_metrics(_images(2), _images(2), [MetricNet(metric="x", arch="alexnet", layer="features.4", size=32,
                                                           weights="/nonexistent/missing.pt")])


def test_weights_load_from_local_files_in_the_real_formats(tmp_path):
    """A torchvision state dict and an open_clip checkpoint written to disk give the same features as the networks
    they were saved from (weights differ from the seed-0 random ones)."""
    import open_clip
    import torch
    import torchvision

    from raydecode.evaluate.feature_metrics import FeatureExtractor
    from raydecode.nn.encoders import _register_openclip_configs

    torch.manual_seed(5)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), tmp_path / "alexnet.pt")
    _register_openclip_configs()
    torch.manual_seed(6)
    torch.save(open_clip.create_model("raydecode-tiny-vit").state_dict(), tmp_path / "clip.pt")
    images = _images(3)
    for net, seed in ((MetricNet(metric="a", arch="alexnet", layer="features.11", size=64), 5),
                      (MetricNet(metric="c", arch="raydecode-tiny-vit", kind="clip", size=32), 6)):
        path = tmp_path / ("alexnet.pt" if net.kind == "torchvision" else "clip.pt")
        loaded = FeatureExtractor(net.model_copy(update={"weights": str(path)}))(images)
        assert torch.allclose(loaded, FeatureExtractor(net.model_copy(update={"seed": seed}))(images), atol=1e-5)
        assert not torch.allclose(loaded, FeatureExtractor(net)(images), atol=1e-3)
