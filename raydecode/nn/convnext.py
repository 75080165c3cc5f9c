"""MindEye2's auxiliary low-level target: ConvNeXt feature maps projected to 512-d tokens, and the blur
augmentation its soft contrastive loss compares them with.

The reference (MedARC-AI/MindEyeV2, ``Train.ipynb``) runs a frozen ConvNeXt-XL fine-tuned by the MindEye authors
(``convnext_xlarge_alpha0.75_fullckpt.pth`` in the pscotti/mindeyev2 dataset on Hugging Face) on each 224-px image
and on a blur-augmented copy of it; the low-level branch's 7 x 7 x 512 maps are pulled towards the clean image's
49 tokens by a soft contrastive loss whose soft labels are the clean-vs-augmented similarities (temperature 0.2,
weight 0.1 inside the blurry loss).

:class:`ConvNeXtTarget` is that network: Liu et al.'s ConvNeXt (no layer scale, as the reference builds it), its
token LayerNorm, then a 3-layer MLP ``maps_projector`` (2048-512-512-512). Its parameter names are the reference
checkpoint's, so :func:`load_reference` reads the released file (``{"model": state_dict}``, keys possibly prefixed
``module.``). ``tiny`` / ``demo`` are the same network with small widths and a 2-px stem, built with random
weights for tests and the CPU demo.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from raydecode.errors import ConfigError

log = logging.getLogger(__name__)

# the reference normalises with ImageNet's mean and this std (its 0.228, not torchvision's 0.229, is kept)
MEAN = (0.485, 0.456, 0.406)
STD = (0.228, 0.224, 0.225)


@dataclass(frozen=True)
class ConvNeXtArch:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    stem: int  # patchify stride: the token grid is image_size / (stem * 8)
    projector: tuple[int, ...] = (512, 512, 512)


ARCHS = {
    "xlarge": ConvNeXtArch((3, 3, 27, 3), (256, 512, 1024, 2048), 4),  # the reference's convnext_xlarge
    "demo": ConvNeXtArch((1, 1, 1, 1), (16, 32, 48, 64), 2, (64, 64, 64)),
    "tiny": ConvNeXtArch((1, 1, 1, 1), (8, 16, 24, 32), 2, (32, 32, 32)),
}


def arch(name: str) -> ConvNeXtArch:
    if name not in ARCHS:
        raise ConfigError(f"convnext arch {name!r}: allowed {', '.join(ARCHS)}")
    return ARCHS[name]


class ChannelsFirstNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (ConvNeXt's stem and downsampling norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Block(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, 4x pointwise MLP with GELU, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """The backbone: (B, 3, H, W) normalised pixels -> (B, H/32 * W/32, C) tokens after the final LayerNorm."""

    def __init__(self, a: ConvNeXtArch):
        super().__init__()
        d = a.dims
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, d[0], kernel_size=a.stem, stride=a.stem), ChannelsFirstNorm(d[0]))]
            + [nn.Sequential(ChannelsFirstNorm(d[i]), nn.Conv2d(d[i], d[i + 1], kernel_size=2, stride=2))
               for i in range(3)])
        self.stages = nn.ModuleList(nn.Sequential(*[Block(d[i]) for _ in range(a.depths[i])]) for i in range(4))
        self.norm = nn.LayerNorm(d[-1], eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x.flatten(2).transpose(1, 2))


class ConvNeXtTarget(nn.Module):
    """Backbone tokens through the ``maps_projector`` MLP: (B, 3, H, W) -> (B, tokens, 512)."""

    def __init__(self, a: ConvNeXtArch):
        super().__init__()
        self.backbone = ConvNeXt(a)
        widths = (a.dims[-1], *a.projector)
        layers: list[nn.Module] = []
        for i in range(len(widths) - 2):
            layers += [nn.Linear(widths[i], widths[i + 1]), nn.LayerNorm(widths[i + 1]), nn.ReLU(True)]
        layers.append(nn.Linear(widths[-2], widths[-1], bias=False))
        self.maps_projector = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maps_projector(self.backbone(x))


def load_reference(model: ConvNeXtTarget, path: Path, what: str) -> None:
    """The reference checkpoint (a torch pickle ``{"model": state_dict, ...}`` or a safetensors file of the same
    keys) into ``model``. Keys the network does not have (a classifier head, training state) are ignored, as the
    reference's ``strict=False`` load ignores them; a missing or mis-shaped weight is an error."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:  # the released file also pickles its training arguments (an argparse.Namespace)
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure gets the same one-line answer
            raise ConfigError(f"{what}: {path} is not a ConvNeXt checkpoint torch can read safely "
                              f"({type(exc).__name__}); save its state dict as safetensors") from exc
        state = raw.get("model", raw) if isinstance(raw, dict) else None
        if not isinstance(state, dict):
            raise ConfigError(f"{what}: {path} holds no state dict (expected {{'model': state_dict}})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise ConfigError(f"{what}: {path} lacks {len(missing)} weights of the ConvNeXt target, e.g. {missing[0]!r} "
                          "(expected MindEye2's convnext_xlarge_alpha0.75_fullckpt.pth layout)")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ConfigError(f"{what}: {path}: {k} has shape {tuple(state[k].shape)}, the {len(own)}-tensor "
                              f"network expects {tuple(v.shape)} (wrong arch?)")
    ignored = sorted(k for k in state if k not in own)
    if ignored:
        log.info("%s: %d entries of %s not used (e.g. %s)", what, len(ignored), path, ignored[0])
    model.load_state_dict({k: state[k] for k in own})


# -- the blur augmentation (the reference's kornia pipeline, parameters drawn per image) ---------------------


def blur_augment(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in [0, 1] (B, 3, H, W) -> an augmented copy, each image with its own draw, as the reference's kornia
    ``AugmentationSequential``: ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), RandomGrayscale(p=0.1), RandomSolarize(p=0.1;
    threshold 0.5 +- 0.1, addition +- 0.1), RandomResizedCrop to the same size at scale 0.9, ratio 1."""
    from torchvision.transforms.v2 import functional as TF

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    out = []
    for img in x:
        if u(0, 1) < 0.8:
            jitters = [
                lambda t: TF.adjust_brightness(t, u(0.6, 1.4)),
                lambda t: TF.adjust_contrast(t, u(0.6, 1.4)),
                lambda t: TF.adjust_saturation(t, u(0.8, 1.2)),
                lambda t: TF.adjust_hue(t, u(-0.1, 0.1)),
            ]
            for j in torch.randperm(4, generator=generator).tolist():
                img = jitters[j](img)
        if u(0, 1) < 0.1:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if u(0, 1) < 0.1:
            threshold, addition = u(0.4, 0.6), u(-0.1, 0.1)
            img = (img + addition).clamp(0, 1)
            img = torch.where(img < threshold, img, 1 - img)
        h, w = img.shape[-2:]
        side = round((0.9 * h * w) ** 0.5)
        top, left = int(u(0, h - side + 1)), int(u(0, w - side + 1))
        img = TF.resized_crop(img, top, left, side, side, [h, w], antialias=True)
        out.append(img.clamp(0, 1))
    return torch.stack(out)


def soft_cont_loss(student: torch.Tensor, teacher: torch.Tensor, teacher_aug: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """MindEye2's soft contrastive loss on L2-normalised rows: the student's similarities to the augmented teacher
    rows are matched (cross-entropy, both directions) to the clean teacher's similarities to them."""
    tt = teacher @ teacher_aug.T / temperature
    st = student @ teacher_aug.T / temperature
    loss1 = -(st.log_softmax(-1) * tt.softmax(-1)).sum(-1).mean()
    loss2 = -(st.T.log_softmax(-1) * tt.T.softmax(-1)).sum(-1).mean()
    return (loss1 + loss2) / 2
