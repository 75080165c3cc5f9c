"""The feature-based reconstruction metrics of MindEye / MindEye2 / Dynadiff's Table 1.

- two-way identification (percent; chance 50): AlexNet layer 2 (``features.4``) and layer 5 (``features.11``),
  InceptionV3 ``avgpool``, CLIP image embeddings (OpenAI ViT-L/14; Dynadiff's CLIP-12: the output of its
  transformer block 12);
- mean correlation distance (lower is better): EfficientNet-B1 ``avgpool`` and SwAV ResNet-50 ``avgpool``.

As the reference implementations compute them (MindEye2's final evaluation, Dynadiff's image metrics): each
network sees both images resized (bilinear, antialiased, as torchvision's ``Resize`` on tensors) to its protocol's
size and normalised as it was trained; InceptionV3 with the input transform of its pretrained weights; CLIP with
QuickGELU (OpenAI's weights were trained with it). MindEye2 resizes per network (:data:`DEFAULT_NETS`), Dynadiff
everything to 224 px (:data:`DYNADIFF_NETS`); :func:`paper_protocol` picks a method's.

Weights (``MetricNet.weights``): a torchvision state dict, an open_clip checkpoint, or for CLIP an open_clip
pretrained tag such as ``openai``, loaded through open_clip's own path from its cache (``HF_HUB_CACHE``; offline
once filled). Without weights a network is random with a fixed seed (tests and the CPU demo: the numbers then say
nothing about images, only that the protocol runs); ``raydecode evaluate`` refuses that for a paper-preset model
unless ``allow_random_weights``, and tags the run with the random ones.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from raydecode.errors import ConfigError, first_line
from raydecode.runtime import seeded
from raydecode.weights import local_weights

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class MetricNet(BaseModel):
    """One metric network and how a metric reads it."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(description="name under recon.*, e.g. alexnet2")
    arch: str = Field(description="torchvision model (alexnet, inception_v3, efficientnet_b1, resnet50) or "
                                  "open_clip model name (kind clip; OpenAI's weights: ViT-L-14-quickgelu)")
    kind: Literal["torchvision", "clip"] = "torchvision"
    layer: str | None = Field(None, description="torchvision node whose output is the feature; clip: a submodule of "
                                                "the image tower (e.g. transformer.resblocks.12), None: the embedding")
    size: int = Field(description="images are resized (bilinear, antialiased) to size x size")
    score: Literal["two_way", "distance"] = "two_way"
    weights: str | None = Field(None, description="weights (a file: local, s3:// or hf://; clip: or an open_clip "
                                                  "pretrained tag, e.g. openai); None: random weights from seed")
    seed: int = 0

    @property
    def random(self) -> bool:
        return self.weights is None


# MindEye2's evaluation (and Dynadiff's): the layers, sizes and scores of Table 1.
DEFAULT_NETS: tuple[MetricNet, ...] = (
    MetricNet(metric="alexnet2", arch="alexnet", layer="features.4", size=256),
    MetricNet(metric="alexnet5", arch="alexnet", layer="features.11", size=256),
    MetricNet(metric="inception", arch="inception_v3", layer="avgpool", size=342),
    MetricNet(metric="clip", arch="ViT-L-14-quickgelu", kind="clip", size=224),
    MetricNet(metric="effnet", arch="efficientnet_b1", layer="avgpool", size=255, score="distance"),
    MetricNet(metric="swav", arch="resnet50", layer="avgpool", size=224, score="distance"),
)

# Dynadiff's Table 1: the same networks, every image at 224 px, and CLIP-12 (its transformer block 12) for CLIP.
DYNADIFF_NETS: tuple[MetricNet, ...] = tuple(
    n.model_copy(update={"size": 224}) for n in DEFAULT_NETS if n.metric != "clip"
) + (MetricNet(metric="clip12", arch="ViT-L-14-quickgelu", kind="clip", layer="transformer.resblocks.12", size=224),)


@dataclass(frozen=True)
class PaperProtocol:
    """A paper's metric networks and its PixCorr / SSIM resolution."""

    nets: tuple[MetricNet, ...]
    pixel_size: int


MINDEYE2 = PaperProtocol(DEFAULT_NETS, 425)
PROTOCOLS = {"dynadiff": PaperProtocol(DYNADIFF_NETS, 224)}


def paper_protocol(method: str) -> PaperProtocol:
    """The evaluation protocol of the paper a method comes from (MindEye2's for the CLIP-space methods)."""
    return PROTOCOLS.get(method, MINDEYE2)


# The same networks and layers at small input sizes: the CPU demo and the tests (random weights: their numbers only
# show that the protocol runs).
SMALL_NETS: tuple[MetricNet, ...] = (
    MetricNet(metric="alexnet2", arch="alexnet", layer="features.4", size=64),
    MetricNet(metric="alexnet5", arch="alexnet", layer="features.11", size=64),
    MetricNet(metric="inception", arch="inception_v3", layer="avgpool", size=80),
    MetricNet(metric="clip", arch="raydecode-tiny-vit", kind="clip", size=32),
    MetricNet(metric="clip12", arch="raydecode-tiny-vit", kind="clip", layer="transformer.resblocks.1", size=32),
    MetricNet(metric="effnet", arch="efficientnet_b1", layer="avgpool", size=64, score="distance"),
    MetricNet(metric="swav", arch="resnet50", layer="avgpool", size=64, score="distance"),
)


def two_way_identification(recon: torch.Tensor | np.ndarray, stim: torch.Tensor | np.ndarray) -> float:
    """Percent of pairwise comparisons where a reconstruction's features correlate more with its own stimulus than
    with another stimulus (MindEye's protocol: Pearson over flattened features, each reconstruction ranks the
    stimuli; chance 50)."""
    a = torch.as_tensor(np.asarray(recon), dtype=torch.float64).flatten(1)
    b = torch.as_tensor(np.asarray(stim), dtype=torch.float64).flatten(1)
    n = len(a)
    if n < 2:
        raise ConfigError("two-way identification needs at least 2 test images")
    a = F.normalize(a - a.mean(1, keepdim=True), dim=1)
    b = F.normalize(b - b.mean(1, keepdim=True), dim=1)
    r = a @ b.T  # r[i, j]: reconstruction i vs stimulus j
    own = torch.diagonal(r)
    wins = (r < own[:, None]).sum(1).double()  # per reconstruction i: stimuli that correlate less than its own
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
        # the input transform torchvision's pretrained InceptionV3 applies (ImageNet- to its own normalisation)
        kwargs = ({"aux_logits": False, "init_weights": False, "transform_input": True}
                  if net.arch == "inception_v3" else {})
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
        what = f"metric {net.metric!r}"
        if net.arch not in open_clip.list_models():
            raise ConfigError(f"{what}: unknown OpenCLIP model {net.arch!r}")
        if net.weights is not None and net.weights in open_clip.list_pretrained_tags_by_model(net.arch):
            # open_clip's own path for its pretrained tags (e.g. openai: QuickGELU whatever the name says),
            # from its cache: HF_HUB_CACHE, read now (huggingface_hub reads it once, at import)
            tag = open_clip.get_pretrained_cfg(net.arch, net.weights)
            try:
                model = open_clip.create_model(net.arch, pretrained=net.weights, force_quick_gelu=tag.get("quick_gelu", False),
                                               cache_dir=os.environ.get("HF_HUB_CACHE"))
            except RuntimeError as e:
                raise ConfigError(f"{what}: open_clip's {net.arch!r} weights {net.weights!r} are not in its cache "
                                  f"(HF_HUB_CACHE; {first_line(e, 160)})") from None
        else:
            weights = str(local_weights(net.weights, what)) if net.weights is not None else None
            if weights is not None and zipfile.is_zipfile(weights) and _is_torchscript(weights):
                raise ConfigError(f"{what}: {net.weights} is a TorchScript archive (OpenAI's release file); use "
                                  f"weights: openai (open_clip's copy of the same weights, from its cache) with arch "
                                  f"ViT-L-14-quickgelu, or an open_clip state dict")
            model = create_openclip(net.arch, weights)
        visual = model.visual
        if net.layer is None:
            return visual
        try:
            visual.get_submodule(net.layer)
        except AttributeError:
            raise ConfigError(f"{what}: {net.arch} has no image-tower layer {net.layer!r}") from None
        return _LayerOutput(visual, net.layer)

    @torch.no_grad()
    def forward(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        x = torch.as_tensor(np.array(images)).to(device).permute(0, 3, 1, 2).float() / 255.0  # a copy: Ray gives read-only arrays
        x = F.interpolate(x, size=(self.net.size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        x = (x - x.new_tensor(self.mean).view(1, 3, 1, 1)) / x.new_tensor(self.std).view(1, 3, 1, 1)
        out = self.model(x)
        out = out["features"] if isinstance(out, dict) else out
        return out.float().flatten(1).cpu()


class _LayerOutput(torch.nn.Module):
    """The output of one submodule of ``model`` (a forward hook; the forward pass runs on past it)."""

    def __init__(self, model: torch.nn.Module, layer: str):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        hook = self.model.get_submodule(self.layer).register_forward_hook(lambda m, i, out: seen.append(out))
        try:
            self.model(x)
        finally:
            hook.remove()
        return seen[0]


def _is_torchscript(path: str) -> bool:
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())  # a state dict has neither


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
