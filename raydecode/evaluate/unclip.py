"""Reconstructions from predicted CLIP image embeddings: the unCLIP decoder of CLIP-space models (MindEye2, Duala).

MindEye2 (Scotti et al. 2024) does not decode pixels itself: its diffusion
prior predicts the 256 x 1664 OpenCLIP ViT-bigG/14 image tokens of the stimulus, and
an unCLIP latent-diffusion model, conditioned on those tokens through cross-attention,
generates the reconstruction; the low-level branch's blurry image can give the start
of the sampling (img2img). :class:`EmbeddingDecoder` is that generator, frozen:

- the UNet (diffusers ``UNet2DConditionModel``, ``cross_attention_dim`` = the token
  width) and the VAE (``AutoencoderKL``) come from a local diffusers directory
  (``path``: ``unet/``, ``vae/``, optionally ``scheduler/``) at ``paper`` scale; at
  ``tiny`` / ``demo`` scale they are random-weight models from a fixed seed, the VAE
  the same as the store's VAE targets of that name;
- DDIM, eta 0, 20 steps, latents never clipped; classifier-free guidance (scale 3)
  against an all-zeros embedding (the unCLIP convention), the conditional and the
  unconditional prediction from one batched UNet call;
- one seeded initial noise per row, so an image depends on its row's tokens and seed
  only, not on how the rows are batched;
- img2img (``blend``, MindEye's ``img2img_strength`` read the other way round): the
  blurry image's VAE latents, noised to a later timestep, replace the pure noise and
  the first part of the schedule is skipped (:func:`img2img_timesteps`).

Nothing is downloaded: ``path`` names a local directory, and :meth:`EmbeddingDecoder.save_pretrained`
writes one in the same layout. The UNet is conditioned through cross-attention only: MindEye2's own
unCLIP (a fine-tuned SDXL, which also takes a pooled "vector" condition) needs converting to such a
``UNet2DConditionModel`` first. The blurry image enters through its VAE posterior mean (MindEye draws
a sample), so img2img adds no randomness beyond the row's seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from raydecode.errors import ConfigError
from raydecode.nn.diffusion import (
    DEMO_UNET,
    RANDOM_SCHEDULER,
    SD_SCHEDULER,
    TINY_UNET,
    VD_IMAGE_UNET,
    ddim_denoise,
    ddim_scheduler,
    decode_latents,
    initial_noise,
    random_unet,
)
from raydecode.nn.encoders import build_vae, on_meta
from raydecode.weights import local_weights

# A Stable-Diffusion-1-sized UNet attending to OpenCLIP ViT-bigG/14's 1664-wide image tokens: the architecture of
# the paper preset (which needs `path`: its weights are never random).
UNCLIP_UNET = dict(VD_IMAGE_UNET, cross_attention_dim=1664)


class UnclipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="local diffusers directory with unet/ (UNet2DConditionModel, "
                                               "cross_attention_dim = the token width), vae/ (AutoencoderKL) and "
                                               "optionally scheduler/; None: random weights (tiny / demo)")
    unet_config: dict[str, Any] = Field(default_factory=lambda: dict(UNCLIP_UNET),
                                        description="UNet2DConditionModel config for random weights (path None)")
    vae: str | dict[str, Any] = Field("sd-vae", description="path None: the VAE, an encoder name or mapping of "
                                                            "raydecode.nn.encoders (built as its targets are)")
    scheduler: dict[str, Any] = Field(default_factory=lambda: dict(SD_SCHEDULER),
                                      description="DDPMScheduler config of the noise schedule (path/scheduler/ wins)")
    seed: int = Field(0, description="seed of random-weight UNets")
    steps: int = Field(20, ge=1, description="DDIM steps")
    guidance: float = Field(3.0, ge=0, description="classifier-free guidance scale against all-zeros tokens")
    blend: float = Field(0.0, ge=0, lt=1, description="img2img: the share of the DDIM schedule skipped by starting "
                                                      "from the noised blurry image (1 - MindEye's img2img_strength)")


# Token widths match the CLIP tokens of MindEye2's presets (tiny: 16 x 32 from openclip-tiny, demo: 16 x 64 from
# openclip-demo, paper: 256 x 1664 from ViT-bigG/14); the VAEs are those of its low-level branch.
PRESETS: dict[str, dict] = {
    "paper": {},
    "demo": dict(unet_config=dict(DEMO_UNET, cross_attention_dim=64), vae="vae-demo",
                 scheduler=RANDOM_SCHEDULER),
    "tiny": dict(unet_config=dict(TINY_UNET, cross_attention_dim=32), vae="vae-tiny",
                 scheduler=RANDOM_SCHEDULER),
}


def unclip_config(preset_or_dict: str | dict | UnclipConfig) -> UnclipConfig:
    """A preset name (``tiny``, ``demo``, ``paper``), or a mapping of fields, optionally with ``preset`` (the
    mapping's other fields override the preset's)."""
    if isinstance(preset_or_dict, UnclipConfig):
        return preset_or_dict
    values = {"preset": preset_or_dict} if isinstance(preset_or_dict, str) else dict(preset_or_dict)
    preset = values.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unclip preset {preset!r}: allowed values: {', '.join(PRESETS)}")
        values = {**PRESETS[preset], **values}
    try:
        return UnclipConfig(**values)
    except ValidationError as exc:
        from raydecode.config import format_validation_error

        raise ConfigError(format_validation_error(UnclipConfig, exc, "unclip")) from None


def img2img_timesteps(timesteps: torch.Tensor, blend: float) -> torch.Tensor:
    """The part of a DDIM schedule (``timesteps``, noisiest first) that an img2img run with ``blend`` runs.

    ``blend`` = s in [0, 1) is MindEye's ``img2img_strength`` = 1 - s: of the ``n`` steps, the last
    ``max(1, floor(n * (1 - s)))`` run and the first ones are skipped; the run starts from the blurry image's latents
    noised to the first timestep that runs. s = 0 runs the whole schedule (and starts from pure noise); the larger
    s, the less noise is added and the more of the blurry image survives.
    """
    n = len(timesteps)
    run = max(1, math.floor(n * (1 - blend) + 1e-6))  # 1e-6: 20 * (1 - 0.3) is 13.999...
    return timesteps[n - run:]


def _is_diffusers_dir(path: Path) -> bool:
    return all((path / sub / "config.json").is_file() for sub in ("unet", "vae"))


class EmbeddingDecoder(nn.Module):
    """Frozen unCLIP decoder: predicted CLIP image tokens (B, N, D) -> uint8 images (B, H, W, 3)."""

    def __init__(self, unet, vae, scheduler_config, cfg: UnclipConfig):
        super().__init__()
        self.cfg = cfg
        self.unet, self.vae = unet, vae
        self.scheduler_config = scheduler_config  # the noise schedule (a DDPMScheduler config)
        self.unet.requires_grad_(False).eval()
        self.vae.requires_grad_(False).eval()
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        size = int(unet.config.sample_size)
        self.latent_shape = (int(vae.config.latent_channels), size, size)
        self.image_size = size * down
        self.width = int(unet.config.cross_attention_dim)

    @classmethod
    def from_config(cls, cfg: UnclipConfig | str | dict) -> EmbeddingDecoder:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        cfg = unclip_config(cfg)
        if cfg.path is not None:
            root = local_weights(cfg.path, "unclip.path")
            if not _is_diffusers_dir(root):
                raise ConfigError(f"unclip.path {cfg.path!r}: not a diffusers directory (needs unet/config.json and "
                                  "vae/config.json; nothing is downloaded)")
            unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
            schedule = cfg.scheduler
            if (root / "scheduler" / "scheduler_config.json").is_file():
                schedule = DDPMScheduler.load_config(root, subfolder="scheduler")
            return cls(unet, vae, DDPMScheduler.from_config(schedule).config, cfg)
        if not on_meta() and tuple(cfg.unet_config.get("block_out_channels", ())) \
                == UNCLIP_UNET["block_out_channels"]:
            raise ConfigError("unclip.path: the paper preset generates with a pretrained unCLIP model; set it to a "
                              "local diffusers directory (unet/, vae/); nothing is downloaded at run time")
        enc, vae = build_vae(cfg.vae, "decoder.vae")  # the VAE of the store's targets of that name (same seed, same weights)
        unet = random_unet(cfg.unet_config, vae, enc.image_size, cfg.seed)
        return cls(unet, vae, DDPMScheduler(**cfg.scheduler).config, cfg)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and norms always in inference mode

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.ndim != 3 or tokens.shape[-1] != self.width:
            raise ConfigError(f"CLIP tokens of shape {tuple(tokens.shape)}: the unCLIP UNet attends to tokens of "
                              f"shape (B, N, {self.width}) (its cross_attention_dim)")

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> scaled VAE latents (the posterior mean), resized to the decoder's size."""
        param = next(self.vae.parameters())
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
        x = x.to(param.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        latents = self.vae.encode((x * 2 - 1).to(param.dtype)).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, seeds: Sequence[int], blurry=None, steps: int | None = None,
                 guidance: float | None = None, blend: float | None = None) -> torch.Tensor:
        """Images (B, H, W, 3) uint8 (CPU) generated from ``tokens`` (B, N, D), one seed per row. ``blurry``: uint8
        images (B, H, W, 3) to start from when ``blend`` > 0 (img2img, :func:`img2img_timesteps`); without them, or
        with ``blend`` 0, the run starts from pure noise over the whole schedule. ``steps``, ``guidance``,
        ``blend``: the config's unless given."""
        steps = self.cfg.steps if steps is None else steps
        guidance = self.cfg.guidance if guidance is None else guidance
        blend = self.cfg.blend if blend is None else blend
        if not 0 <= blend < 1:
            raise ConfigError(f"unclip blend {blend}: must be in [0, 1)")
        tokens = torch.as_tensor(tokens)
        self._check_tokens(tokens)
        n = tokens.shape[0]
        if len(seeds) != n:
            raise ConfigError(f"{len(seeds)} seeds for {n} rows of CLIP tokens: give one seed per row")
        param = next(self.unet.parameters())
        cond = tokens.to(param.device, param.dtype)
        sched = ddim_scheduler(self.scheduler_config, steps)
        noise = initial_noise(list(seeds), self.latent_shape).to(cond)
        timesteps = sched.timesteps
        if blurry is not None and blend > 0:
            if len(blurry) != n:
                raise ConfigError(f"{len(blurry)} blurry images for {n} rows of CLIP tokens")
            timesteps = img2img_timesteps(sched.timesteps, blend)
            x = sched.add_noise(self.encode(blurry).to(cond), noise, timesteps[:1].repeat(n))
        else:
            x = noise * sched.init_noise_sigma
        x = ddim_denoise(self.unet, sched, x, cond, torch.zeros_like(cond), guidance, timesteps)
        return decode_latents(self.vae, x).cpu()

    def save_pretrained(self, out_dir: str) -> str:
        """``unet/``, ``vae/`` and ``scheduler/`` in diffusers' layout: a directory for :attr:`UnclipConfig.path`."""
        from diffusers import DDPMScheduler

        out = Path(out_dir)
        self.unet.save_pretrained(out / "unet")
        self.vae.save_pretrained(out / "vae")
        DDPMScheduler.from_config(self.scheduler_config).save_pretrained(out / "scheduler")
        return str(out)
