"""The feature-based reconstruction metrics of MindEye / MindEye2 / Dynadiff's Table 1.

- two-way identification (percent; chance 50): AlexNet layer 2 (``features.4``) and layer 5 (``features.11``),
  InceptionV3 ``avgpool``, CLIP image embeddings (ViT-L/14);
- mean correlation distance (lower is better): EfficientNet-B1 ``avgpool`` and SwAV ResNet-50 ``avgpool``.

Each network sees both images through its protocol's preprocessing (bilinear resize to the size below, the
network's normalisation). Architectures come from torchvision / open_clip; weights from local files named in
config (``MetricNet.weights``: a torchvision state dict, or an open_clip checkpoint); without weights the networks
are random with a fixed seed (tests and the CPU demo: the numbers then say nothing about images, only that the
protocol runs).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from raydecode.errors import ConfigError
from raydecode.runtime import seeded
from raydecode.weights import local_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class MetricNet(BaseModel):
    """One metric network and how a metric reads it."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="name under recon.*, e.g. alexnet2")
    arch: str = Field(description="torchvision model (alexnet, inception_v3, efficientnet_b1, resnet50) or "
                                  "open_clip model name (kind clip)")
    kind: Literal["torchvision", "clip"] = "torchvision"
    layer: str | None = Field(None, description="torchvision node whose output is the feature (None: clip)")
    size: int = Field(description="images are resized (bilinear) to size x size")
    score: Literal["two_way", "distance"] = "two_way"
    weights: str | None = Field(None, description="local weights; None: random weights from seed")
    seed: int = 0


# MindEye2's evaluation (and Dynadiff's): the layers, sizes and scores of Table 1.
DEFAULT_NETS: tuple[MetricNet, ...] = (
    MetricNet(metric="alexnet2", arch="alexnet", layer="features.4", size=256),
    MetricNet(metric="alexnet5", arch="alexnet", layer="features.11", size=256),
    MetricNet(metric="inception", arch="inception_v3", layer="avgpool", size=342),
    MetricNet(metric="clip", arch="ViT-L-14", kind="clip", size=224),
    MetricNet(metric="effnet", arch="efficientnet_b1", layer="avgpool", size=255, score="distance"),
    MetricNet(metric="swav", arch="resnet50", layer="avgpool", size=224, score="distance"),
)


# The same networks and layers at small input sizes: the CPU demo and the tests (random weights: their numbers only
# show that the protocol runs).
SMALL_NETS: tuple[MetricNet, ...] = (
    MetricNet(metric="alexnet2", arch="alexnet", layer="features.4", size=64),
    MetricNet(metric="alexnet5", arch="alexnet", layer="features.11", size=64),
    MetricNet(metric="inception", arch="inception_v3", layer="avgpool", size=80),
    MetricNet(metric="clip", arch="raydecode-tiny-vit", kind="clip", size=32),
    MetricNet(metric="effnet", arch="efficientnet_b1", layer="avgpool", size=64, score="distance"),
    MetricNet(metric="swav", arch="resnet50", layer="avgpool", size=64, score="distance"),
)


def two_way_identification(recon: torch.Tensor | np.ndarray, stim: torch.Tensor | np.ndarray) -> float:
    """Percent of pairwise comparisons where a stimulus's features correlate more with its own reconstruction than
    with another image's reconstruction (MindEye's protocol: Pearson over flattened features; chance 50)."""
    a = torch.as_tensor(np.asarray(recon), dtype=torch.float64).flatten(1)
    b = torch.as_tensor(np.asarray(stim), dtype=torch.float64).flatten(1)
    n = len(a)
    if n < 2:
        raise ConfigError("two-way identification needs at least 2 test images")
    a = F.normalize(a - a.mean(1, keepdim=True), dim=1)
    b = F.normalize(b - b.mean(1, keepdim=True), dim=1)
    r = a @ b.T  # r[i, j]: reconstruction i vs stimulus j
    own = torch.diagonal(r)
    wins = (r < own[None, :]).sum(0).double()  # per stimulus j: reconstructions that correlate less than its own
    return float(100.0 * wins.mean() / (n - 1))


def correlation_distance(recon: torch.Tensor | np.ndarray, stim: torch.Tensor | np.ndarray) -> float:
    """Mean over pairs of 1 - Pearson correlation of the flattened features (scipy's ``correlation``)."""
    a = torch.as_tensor(np.asarray(recon), dtype=torch.float64).flatten(1)
    b = torch.as_tensor(np.asarray(stim), dtype=torch.float64).flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return float((1 - F.cosine_similarity(a, b, dim=1, eps=1e-300)).mean())


class FeatureExtractor(torch.nn.Module):
    """One metric network: uint8 images (B, H, W, 3) -> flattened features (B, D)."""

    def __init__(self, net: MetricNet):
        super().__init__()
        self.net = net
        with seeded(net.seed):
            if net.kind == "clip":
                self.model, self.mean, self.std = self._clip(net), CLIP_MEAN, CLIP_STD
            else:
                self.model, self.mean, self.std = self._torchvision(net), IMAGENET_MEAN, IMAGENET_STD
        self.model.eval().requires_grad_(False)

    @staticmethod
    def _torchvision(net: MetricNet) -> torch.nn.Module:
        import torchvision
        from torchvision.models.feature_extraction import create_feature_extractor

        if not hasattr(torchvision.models, net.arch):
            raise ConfigError(f"metric {net.metric!r}: unknown torchvision model {net.arch!r}")
        kwargs = {"aux_logits": False, "init_weights": False} if net.arch == "inception_v3" else {}
        model = getattr(torchvision.models, net.arch)(weights=None, **kwargs)
        if net.weights is not None:
            path = local_weights(net.weights, f"metric {net.metric!r}")
            if not path.is_file():
                raise ConfigError(f"metric {net.metric!r}: weights {net.weights!r} are not a file")
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ConfigError(f"metric {net.metric!r}: {net.weights} is not a {net.arch} state dict "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return create_feature_extractor(model, return_nodes={net.layer: "features"})

    @staticmethod
    def _clip(net: MetricNet) -> torch.nn.Module:
        import open_clip

        from raydecode.nn.encoders import _register_openclip_configs, create_openclip

        _register_openclip_configs()
        if net.arch not in open_clip.list_models():
            raise ConfigError(f"metric {net.metric!r}: unknown OpenCLIP model {net.arch!r}")
        weights = str(local_weights(net.weights, f"metric {net.metric!r}")) if net.weights is not None else None
        return create_openclip(net.arch, weights).visual

    @torch.no_grad()
    def forward(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        x = torch.as_tensor(np.array(images)).to(device).permute(0, 3, 1, 2).float() / 255.0  # a copy: Ray gives read-only arrays
        x = F.interpolate(x, size=(self.net.size,) * 2, mode="bilinear", align_corners=False)
        x = (x - x.new_tensor(self.mean).view(1, 3, 1, 1)) / x.new_tensor(self.std).view(1, 3, 1, 1)
        out = self.model(x)
        out = out["features"] if isinstance(out, dict) else out
        return out.float().flatten(1).cpu()


def feature_metrics(stimuli: np.ndarray, recons: np.ndarray, nets: list[MetricNet] | None = None,
                    batch_size: int = 32) -> dict[str, float]:
    """``{metric: value}`` for every network (two-way in percent, distances in [0, 2])."""
    out: dict[str, float] = {}
    extractors: dict[tuple, FeatureExtractor] = {}
    for net in nets if nets is not None else DEFAULT_NETS:
        key = (net.arch, net.kind, net.layer, net.weights, net.seed)
        ext = extractors.setdefault(key, FeatureExtractor(net))

        def feats(images):
            return torch.cat([ext(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])

        a, b = feats(recons), feats(stimuli)
        out[net.metric] = two_way_identification(a, b) if net.score == "two_way" else correlation_distance(a, b)
    return out
