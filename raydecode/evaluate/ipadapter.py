"""Reconstructions from predicted IP-Adapter Plus image tokens: Stable Diffusion 1.5 + IP-Adapter Plus (MindLink).

MindLink's projector predicts the 16 tokens IP-Adapter Plus's resampler makes from an image
(:mod:`raydecode.nn.ipadapter`); :class:`IPAdapterDecoder` loads the adapter with diffusers' own
``StableDiffusionPipeline.load_ip_adapter`` and feeds the tokens *after* the image projection (the UNet's
projection layer is an identity here, so its ``image_embeds`` are the tokens themselves):

- the empty prompt for text (its CLIP text embedding computed once; random-weight presets: zeros), DDIM 50 steps,
  guidance 7.5 (MindLink's settings);
- classifier-free guidance against the tokens of a blank image (IP-Adapter's unconditional embedding: the image
  encoder on an all-zeros normalised image, i.e. the CLIP mean colour), computed once from the target encoder;
- one seeded initial latent per row (an image depends on its row's tokens and seed only).

``path`` names a local diffusers Stable Diffusion 1.5 directory (``unet/``, ``vae/``, ``scheduler/``,
``text_encoder/``, ``tokenizer/``); ``ip_adapter`` a directory with IP-Adapter Plus's file and ``image_encoder/``
(h94/IP-Adapter's ``models/``). Tiny / demo presets build random-weight models from a seed, the IP-Adapter weights
in the published layout, so the same loading path runs at every scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raydecode.config import format_validation_error
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
from raydecode.nn.encoders import OPENAI_MEAN, FrozenEncoder, build_vae, encoder_config, on_meta
from raydecode.nn.ipadapter import IP_ADAPTER_FILE, random_image_proj, random_ip_layers, read_ip_adapter
from raydecode.weights import local_weights

# Stable Diffusion 1.5's UNet (text cross-attention 768 wide), the architecture IP-Adapter Plus SD 1.5 plugs into
SD15_UNET = dict(VD_IMAGE_UNET, cross_attention_dim=768)


class IPAdapterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["ip-adapter"] = "ip-adapter"
    path: str | None = Field(None, description="Stable Diffusion 1.5 diffusers directory (unet/, vae/, scheduler/, "
                                               "text_encoder/, tokenizer/); None: random weights (tiny / demo)")
    ip_adapter: str | None = Field(None, description="directory with the IP-Adapter Plus file and image_encoder/ "
                                                     "(h94/IP-Adapter's models/); None: random adapter weights")
    weight_name: str = IP_ADAPTER_FILE
    image_encoder: str | dict[str, Any] = Field(
        "ipadapter-plus-sd15", description="the target encoder of the predicted tokens (a name or mapping of "
                                           "raydecode.nn.encoders; its weights: `ip_adapter`'s): the blank image's tokens")
    unet_config: dict[str, Any] = Field(default_factory=lambda: dict(SD15_UNET),
                                        description="UNet2DConditionModel config for random weights (path None)")
    vae: str | dict[str, Any] = Field("sd-vae", description="path None: the VAE (an encoder name of nn.encoders)")
    scheduler: dict[str, Any] = Field(default_factory=lambda: dict(SD_SCHEDULER))
    seed: int = Field(0, description="seed of random weights")
    steps: int = Field(50, ge=1, description="DDIM steps (MindLink: 50)")
    guidance: float = Field(7.5, ge=0, description="classifier-free guidance scale (MindLink: 7.5)")


# token widths match MindLink's presets (tiny: 16 x 32 from ipadapter-tiny, demo: 16 x 64, paper: 16 x 768)
PRESETS: dict[str, dict] = {
    "paper": {},
    "demo": dict(unet_config=dict(DEMO_UNET, cross_attention_dim=64), vae="vae-demo", image_encoder="ipadapter-demo",
                 scheduler=RANDOM_SCHEDULER),
    "tiny": dict(unet_config=dict(TINY_UNET, cross_attention_dim=32), vae="vae-tiny", image_encoder="ipadapter-tiny",
                 scheduler=RANDOM_SCHEDULER),
}


def ipadapter_config(values: dict | IPAdapterConfig) -> IPAdapterConfig:
    """A mapping of fields, optionally with ``preset`` (tiny, demo, paper; the mapping's other fields win)."""
    if isinstance(values, IPAdapterConfig):
        return values
    values = dict(values)
    preset = values.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"ip-adapter preset {preset!r}: allowed values: {', '.join(PRESETS)}")
        values = {**PRESETS[preset], **values}
    try:
        return IPAdapterConfig(**values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(IPAdapterConfig, exc, "decoder (ip-adapter)")) from None


def _text_embedding(root, width: int) -> torch.Tensor:
    """The empty prompt's CLIP text embedding (1, 77, width): SD 1.5's text encoder, or zeros (random weights)."""
    if root is None:
        return torch.zeros(1, 77, width)
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(root, subfolder="text_encoder").eval()
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return text(ids)[0]


class IPAdapterDecoder:
    """Frozen SD 1.5 + IP-Adapter Plus: predicted image tokens (B, 16, width) -> uint8 images (B, H, W, 3)."""

    def __init__(self, pipe, prompt: torch.Tensor, null_tokens: torch.Tensor, cfg: IPAdapterConfig):
        self.pipe, self.prompt, self.null_tokens, self.cfg = pipe, prompt, null_tokens, cfg
        unet = pipe.unet
        self.width = int(unet.config.cross_attention_dim)
        self.latent_shape = (int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size))
        self.image_size = int(unet.config.sample_size) * pipe.vae_scale_factor

    @classmethod
    def from_config(cls, cfg: IPAdapterConfig | dict) -> IPAdapterDecoder:
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        cfg = ipadapter_config(cfg)
        if cfg.path is not None:
            root = local_weights(cfg.path, "decoder.path")
            unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(root, subfolder="vae")
            sched = DDIMScheduler.from_config(DDIMScheduler.load_config(root, subfolder="scheduler"), clip_sample=False)
        else:
            if not on_meta() and cfg.unet_config.get("block_out_channels") == SD15_UNET["block_out_channels"]:
                raise ConfigError("decoder.path: the paper preset generates with Stable Diffusion 1.5; set it to a "
                                  "local diffusers directory (nothing is downloaded at run time)")
            root = None
            enc, vae = build_vae(cfg.vae, "decoder.vae")
            unet = random_unet(cfg.unet_config, vae, enc.image_size, cfg.seed)
            sched = DDIMScheduler(**cfg.scheduler)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, image_encoder=None,
                                       requires_safety_checker=False)
        encoder = encoder_config(cfg.image_encoder)
        if cfg.ip_adapter is not None:
            state = read_ip_adapter(local_weights(cfg.ip_adapter, "decoder.ip_adapter") / cfg.weight_name)
            encoder = encoder.model_copy(update={"weights": cfg.ip_adapter, "weight_name": cfg.weight_name})
        else:
            width = int(unet.config.cross_attention_dim)
            state = {"image_proj": random_image_proj(width, width, cfg.seed), "ip_adapter": random_ip_layers(unet, cfg.seed)}
        pipe.load_ip_adapter(state, subfolder="", weight_name=cfg.weight_name, image_encoder_folder=None)
        pipe.unet.encoder_hid_proj.image_projection_layers[0] = torch.nn.Identity()  # tokens come projected
        blank = torch.tensor([round(255 * m) for m in OPENAI_MEAN], dtype=torch.uint8).expand(
            1, encoder.image_size, encoder.image_size, 3)
        null = FrozenEncoder(encoder).encode(blank)[0]
        return cls(pipe, _text_embedding(root, int(unet.config.cross_attention_dim)), null, cfg)

    def to(self, device) -> IPAdapterDecoder:
        self.pipe.to(device)
        return self

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, seeds: Sequence[int], blurry=None, steps: int | None = None,
                 guidance: float | None = None) -> torch.Tensor:
        """Images (B, H, W, 3) uint8 (CPU) from ``tokens`` (B, 16, width), one seed per row (``blurry`` is not
        used: MindLink has no low-level branch)."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != tuple(self.null_tokens.shape[1:]):
            raise ConfigError(f"image tokens of shape {tuple(tokens.shape)}: the IP-Adapter decoder takes (B, "
                              f"{', '.join(map(str, self.null_tokens.shape[1:]))}) (its target encoder's tokens)")
        n = tokens.shape[0]
        if len(seeds) != n:
            raise ConfigError(f"{len(seeds)} seeds for {n} rows of image tokens: give one seed per row")
        unet = self.pipe.unet
        param = next(unet.parameters())
        tokens = tokens.to(param.device, param.dtype)
        guidance = self.cfg.guidance if guidance is None else guidance
        prompt = self.prompt.to(tokens).expand(n, -1, -1)
        null = self.null_tokens.to(tokens).expand(n, -1, -1)
        sched = ddim_scheduler(self.pipe.scheduler.config, self.cfg.steps if steps is None else steps)
        x = initial_noise(list(seeds), self.latent_shape).to(tokens) * sched.init_noise_sigma
        # the UNet called directly, one image per row (the pipeline's __call__ repeats ip_adapter_image_embeds
        # for every prompt: per-row images would be mixed)
        x = ddim_denoise(unet, sched, x, prompt, prompt if guidance != 1 else None, guidance,
                         added={"image_embeds": [tokens[:, None]]}, added_null={"image_embeds": [null[:, None]]})
        return decode_latents(self.pipe.vae, x).cpu()
