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
    """MindEye2's final evaluation (and Dynadiff's): ``r = corrcoef(reals, preds)[:n, n:]``, ``success = r <
    diag(r)`` (broadcast along the reconstructions), counted per reconstruction over the stimuli."""
    n = len(stim)
    r = np.corrcoef(stim, recon)[:n, n:]
    return 100.0 * np.mean(np.sum(r < np.diag(r), 0)) / (n - 1)


def _by_hand(recon: np.ndarray, stim: np.ndarray) -> tuple[float, float]:
    """Each reconstruction against every other stimulus (the reference), and each stimulus against every other
    reconstruction (the other orientation), one comparison at a time."""
    n = len(stim)
    c = [[np.corrcoef(recon[i], stim[j])[0, 1] for j in range(n)] for i in range(n)]
    per_recon = sum(c[i][i] > c[i][j] for i in range(n) for j in range(n) if j != i)
    per_stim = sum(c[j][j] > c[i][j] for j in range(n) for i in range(n) if i != j)
    return 100.0 * per_recon / (n * (n - 1)), 100.0 * per_stim / (n * (n - 1))


def test_two_way_identification_ranks_stimuli_per_reconstruction_as_the_reference_does():
    # 4 images, 3 features, where the two orientations disagree (9 of 12 comparisons won per reconstruction,
    # 5 of 12 per stimulus)
    stim = np.array([[3.0, 0, 0], [3, 1, 0], [2, 1, 3], [2, 3, 0]])
    recon = np.array([[2.0, 3, 2], [1, 2, 1], [0, 0, 2], [1, 3, 1]])
    per_recon, per_stim = _by_hand(recon, stim)
    assert (per_recon, per_stim) == (pytest.approx(75.0), pytest.approx(500 / 12))
    assert two_way_identification(recon, stim) == pytest.approx(per_recon, abs=1e-9)
    assert two_way_identification(recon, stim) == pytest.approx(_reference_two_way(recon, stim), abs=1e-9)


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


def test_networks_see_images_as_the_reference_preprocessing_gives_them(tmp_path):
    """torchvision's Resize (bilinear, antialiased) + Normalize, and for InceptionV3 the input transform its
    pretrained weights are built with (``transform_input=True``), computed independently with torchvision."""
    import torch
    import torchvision
    import torchvision.transforms.v2.functional as TF
    from torchvision.models.feature_extraction import create_feature_extractor

    from raydecode.evaluate.feature_metrics import IMAGENET_MEAN, IMAGENET_STD, FeatureExtractor

    images = _images(3)  # 48 px: downsampling to 40 aliases without the antialias filter
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    for arch, layer, size in (("alexnet", "features.4", 40), ("inception_v3", "avgpool", 80)):
        torch.manual_seed(3)
        kw = {"aux_logits": False, "init_weights": False, "transform_input": True} if arch == "inception_v3" else {}
        net = getattr(torchvision.models, arch)(weights=None, **kw).eval()
        torch.save(net.state_dict(), tmp_path / f"{arch}.pt")
        ref_in = TF.normalize(TF.resize(x.float() / 255, [size, size], antialias=True), IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            expected = create_feature_extractor(net, {layer: "f"})(ref_in)["f"].flatten(1)
        ours = FeatureExtractor(MetricNet(metric="m", arch=arch, layer=layer, size=size,
                                          weights=str(tmp_path / f"{arch}.pt")))(images)
        assert torch.allclose(ours, expected, atol=1e-4), arch


def test_openai_clip_loads_through_open_clips_own_path_with_quickgelu(tmp_path, monkeypatch):
    """``weights: openai`` is open_clip's pretrained tag, read from its Hugging Face cache (the layout
    ``huggingface-cli download`` leaves, offline): the model has QuickGELU whatever the architecture name says, its
    features are those of the cached weights, and CLIP-12 (``layer``) is the output of that transformer block.
    (ViT-B/32 here, the smallest with OpenAI weights; the metric uses ViT-L/14 through the same path.)"""
    import huggingface_hub.constants
    import open_clip
    import torch
    from open_clip.transformer import QuickGELU
    from safetensors.torch import save_file

    from raydecode.evaluate.feature_metrics import CLIP_MEAN, CLIP_STD, FeatureExtractor

    torch.manual_seed(4)
    src = open_clip.create_model("ViT-B-32-quickgelu").eval()
    repo = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    commit = "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    save_file({k: v.half().contiguous() for k, v in src.state_dict().items()},
              repo / "snapshots" / commit / "open_clip_model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    images = _images(2)
    x = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, size=(224, 224),
                                        mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    src = src.half().float()  # the cached weights are fp16
    for layer in (None, "transformer.resblocks.6"):
        ext = FeatureExtractor(MetricNet(metric="c", arch="ViT-B-32", kind="clip", size=224, weights="openai",
                                         layer=layer))
        assert any(isinstance(m, QuickGELU) for m in ext.modules())
        seen = []
        hook = src.visual.transformer.resblocks[6].register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            pooled = src.visual(x)
        hook.remove()
        expected = (pooled if layer is None else seen[0]).flatten(1)
        assert torch.allclose(ext(images), expected, atol=1e-4), layer

    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ViT-L-14.pt")  # OpenAI's release format
    with pytest.raises(ConfigError, match="TorchScript archive .* weights: openai"):
        FeatureExtractor(MetricNet(metric="c", arch="raydecode-tiny-vit", kind="clip", size=32,
                                   weights=str(tmp_path / "ViT-L-14.pt")))
