"""Frozen image encoders that produce training targets: OpenCLIP image tokens, CLIP feature levels, VAE latents.

An encoder maps uint8 images ``(B, H, W, 3)`` to ``tokens`` (a fixed shape per
encoder) and a ``pooled`` vector. At ``paper`` scale the weights come from a
local file or directory named in config (OpenCLIP ViT-bigG/14, the Stable
Diffusion VAE); at ``tiny``/``demo`` scale the same architectures are built
small with random weights from a fixed seed, so nothing is downloaded.

- ``openclip``: ``tokens`` = the vision transformer's patch tokens after
  ``ln_post`` (256 x 1664 for ViT-bigG/14 at 224 px, MindEye2's target),
  ``pooled`` = the projected image embedding.
- ``clip-levels``: CLIP-MUSED's two feature levels (its sec. 2.2 and appendix) of an image and its
  caption: ``tokens`` = f_llv, the output of the image encoder's FIRST transformer block, every token with the
  class token first (50 x 768 for ViT-B/32 at 224 px); ``pooled`` = f_hlv, the mean of the image and the caption's
  text embedding (CLIP's last layer, projected), each first truncated to [-1.5, 1.5] and L2-normalised to 1 (512).
  Captions are tokenised with open_clip's tokenizer for the arch; text towers with a smaller vocabulary than the
  tokenizer's (the tiny / demo ones: 64 ids, 16 positions) get the ids folded into theirs (:func:`fold_tokens`).
- ``ipadapter``: ``tokens`` = IP-Adapter Plus's image tokens (16 x 768 for SD 1.5: CLIP ViT-H/14's penultimate
  hidden states through the adapter's resampler, :mod:`raydecode.nn.ipadapter`; MindLink's target),
  ``pooled`` = the CLIP vision tower's projected image embedding (1024).
- ``vae``: ``tokens`` = the scaled posterior mean (4 x 28 x 28 for the SD VAE at
  224 px, MindEye2's low-level target), ``pooled`` = the encoder's mid-block
  feature maps average-pooled to 2 x 2 (no method trains on it: MindEye2's
  auxiliary head reads the ``convnext`` encoder's tokens).
- ``convnext``: MindEye2's auxiliary low-level target (:mod:`raydecode.nn.convnext`): ``tokens`` = ConvNeXt-XL's
  final feature map through the reference's ``maps_projector`` (49 x 512 at 224 px), ``pooled`` = their mean.
  Training also asks it for the tokens of a blur-augmented copy of each image, drawn afresh every step
  (:meth:`FrozenEncoder.encode_augmented`): such encoders ``augment``.

The same encoder objects serve the ``embed`` stage (targets written to the
store) and the train loop (targets computed in the worker when the store has
none).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from raydecode.errors import ConfigError
from raydecode.nn.convnext import MEAN as CONVNEXT_MEAN
from raydecode.nn.convnext import STD as CONVNEXT_STD
from raydecode.nn.convnext import ConvNeXtTarget, blur_augment, load_reference
from raydecode.nn.convnext import arch as convnext_arch
from raydecode.nn.diffusion import decode_latents
from raydecode.nn.ipadapter import IP_ADAPTER_FILE, ImageTokens
from raydecode.runtime import seeded
from raydecode.weights import local_weights

CONFIG_DIR = Path(__file__).with_name("encoder_configs")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class EncoderConfig(BaseModel):
    """One frozen encoder. ``name`` is also its key under the store's ``embeddings/``."""
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: Literal["openclip", "clip-levels", "vae", "ipadapter", "convnext"]
    arch: str = Field(description="openclip, clip-levels: OpenCLIP model name (e.g. ViT-bigG-14); "
                                  "vae: 'tiny' or 'pretrained'; convnext: 'xlarge' (the reference's), 'demo', 'tiny'; "
                                  "ipadapter: 'pretrained', 'tiny' or 'demo'")
    weights: str | None = Field(None, description="a file or diffusers dir: a local path, s3:// prefix or "
                                                 "hf://ORG/REPO[@REV][/PATH] (raydecode.weights); None = random weights from `seed`")
    image_size: int = Field(224, ge=8)
    seed: int = 0
    tiny_channels: tuple[int, ...] = Field((16, 32, 32), description="vae 'tiny': block widths (downsampling 2^(n-1))")
    weight_name: str = Field(IP_ADAPTER_FILE, description="ipadapter: the adapter's file in `weights` (a directory "
                                                          "with image_encoder/ beside it, as h94/IP-Adapter's models/)")


# Named encoders a config can refer to by name (a full EncoderConfig mapping also works).
ENCODERS: dict[str, EncoderConfig] = {
    e.name: e
    for e in (
        EncoderConfig(name="openclip-bigg", kind="openclip", arch="ViT-bigG-14", image_size=224),
        EncoderConfig(name="sd-vae", kind="vae", arch="pretrained", image_size=224),
        EncoderConfig(name="openclip-tiny", kind="openclip", arch="raydecode-tiny-vit", image_size=32),
        EncoderConfig(name="vae-tiny", kind="vae", arch="tiny", image_size=32, tiny_channels=(16, 32, 32)),
        EncoderConfig(name="openclip-demo", kind="openclip", arch="raydecode-demo-vit", image_size=64),
        EncoderConfig(name="vae-demo", kind="vae", arch="tiny", image_size=64, tiny_channels=(16, 32, 32)),
        EncoderConfig(name="ipadapter-plus-sd15", kind="ipadapter", arch="pretrained", image_size=224),
        EncoderConfig(name="ipadapter-tiny", kind="ipadapter", arch="tiny", image_size=32),
        EncoderConfig(name="ipadapter-demo", kind="ipadapter", arch="demo", image_size=64),
        # CLIP-MUSED's targets; the paper's CLIP is OpenAI's ViT-B/32 (weights: its open_clip state dict)
        EncoderConfig(name="clip-levels-vitb32", kind="clip-levels", arch="ViT-B-32-quickgelu", image_size=224),
        EncoderConfig(name="clip-levels-tiny", kind="clip-levels", arch="raydecode-tiny-vit", image_size=32),
        EncoderConfig(name="clip-levels-demo", kind="clip-levels", arch="raydecode-demo-vit", image_size=64),
        # MindEye2's auxiliary target: weights = its convnext_xlarge_alpha0.75_fullckpt.pth (pscotti/mindeyev2)
        EncoderConfig(name="convnext-xl-mindeye2", kind="convnext", arch="xlarge", image_size=224),
        EncoderConfig(name="convnext-tiny", kind="convnext", arch="tiny", image_size=32),
        EncoderConfig(name="convnext-demo", kind="convnext", arch="demo", image_size=64),
    )
}


def encoder_config(ref: str | EncoderConfig | dict) -> EncoderConfig:
    if isinstance(ref, EncoderConfig):
        return ref
    if isinstance(ref, dict):
        return EncoderConfig(**ref)
    if ref not in ENCODERS:
        raise ConfigError(f"encoder {ref!r}: allowed names: {', '.join(ENCODERS)} (or a full encoder mapping)")
    return ENCODERS[ref]


class _IntendedRandomInit(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def create_openclip(arch: str, weights: str | None, device: str = "cpu") -> torch.nn.Module:
    """``open_clip.create_model`` on CPU; random weights (``weights`` None: the seeded tiny / demo encoders) are
    intended, so open_clip's warning about them is not printed once per process."""
    import open_clip

    quiet = _IntendedRandomInit()
    root = logging.getLogger()
    if weights is None:
        root.addFilter(quiet)
    try:
        return open_clip.create_model(arch, pretrained=weights, device=device)
    finally:
        root.removeFilter(quiet)


def _register_openclip_configs() -> None:
    import open_clip

    if "raydecode-tiny-vit" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def sd_vae_architecture(image_size: int) -> torch.nn.Module:
    """Stable Diffusion's VAE (AutoencoderKL, 4 blocks 128-512, 4 latent channels), random weights: parameter
    counts and shapes on the meta device."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         sample_size=image_size)


class FrozenEncoder(torch.nn.Module):
    """A frozen image encoder: ``encode(images_uint8, captions) -> (tokens, pooled)`` in float32."""
    def __init__(self, cfg: EncoderConfig, *, architecture_only: bool = False):
        """``architecture_only``: the network on the meta device, its weights never read (output shapes for
        planning: ``tokens_shape`` / ``pooled_dim``), pretrained-only architectures included."""
        super().__init__()
        self.cfg = cfg
        self.needs_captions = cfg.kind == "clip-levels"
        self.augments = augments(cfg)
        if architecture_only:
            with torch.device("meta"):
                self.net = self._build(cfg.model_copy(update={"weights": None}), meta=True)
        else:
            if requires_weights(cfg):
                raise ConfigError(f"encoder {cfg.name!r} needs `weights` (a local path, s3:// or hf:// reference); "
                                  "random weights exist only for the tiny / demo (raydecode-*) architectures")
            with seeded(cfg.seed):
                self.net = self._build(cfg)
        self.net.eval().requires_grad_(False)
        self._mid: torch.Tensor | None = None
        if cfg.kind == "vae":
            self.net.encoder.mid_block.register_forward_hook(lambda _m, _i, out: setattr(self, "_mid", out))
        if cfg.kind == "clip-levels":  # f_llv: the image encoder's first block (batch-first or (T, B, W))
            import open_clip

            self.tokenizer = open_clip.get_tokenizer(cfg.arch)
            self.net.visual.transformer.resblocks[0].register_forward_hook(
                lambda _m, _i, out: setattr(self, "_mid", out if self.net.visual.transformer.batch_first
                                            else out.transpose(0, 1)))
        with torch.no_grad():
            tokens, pooled = self.encode(torch.zeros(1, cfg.image_size, cfg.image_size, 3, dtype=torch.uint8),
                                         ["a photo"])
        self.tokens_shape = tuple(tokens.shape[1:])
        self.pooled_dim = int(pooled.shape[1])

    @staticmethod
    def _build(cfg: EncoderConfig, meta: bool = False) -> torch.nn.Module:
        """The frozen network of ``cfg`` (``meta``: its architecture only, ``cfg`` without weights)."""
        if cfg.kind in ("openclip", "clip-levels"):
            model = FrozenEncoder._build_clip(cfg, "meta" if meta else "cpu")
            if cfg.kind == "clip-levels":
                return model  # both towers
            model.visual.output_tokens = True
            return model.visual
        if cfg.kind == "convnext":
            return FrozenEncoder._build_convnext(cfg)
        if cfg.kind == "ipadapter":
            return ImageTokens.build(cfg.arch, None, cfg.weight_name, cfg.seed, meta=True) if meta \
                else FrozenEncoder._build_ipadapter(cfg)
        return FrozenEncoder._vae_architecture(cfg) if meta else FrozenEncoder._build_vae(cfg)

    @staticmethod
    def _build_clip(cfg: EncoderConfig, device: str = "cpu") -> torch.nn.Module:
        import open_clip

        _register_openclip_configs()
        if cfg.arch not in open_clip.list_models():
            raise ConfigError(f"encoder {cfg.name!r}: unknown OpenCLIP model {cfg.arch!r}")
        weights = str(local_weights(cfg.weights, f"encoder {cfg.name!r}")) if cfg.weights is not None else None
        return create_openclip(cfg.arch, weights, device)

    @staticmethod
    def _build_convnext(cfg: EncoderConfig) -> torch.nn.Module:
        net = ConvNeXtTarget(convnext_arch(cfg.arch))
        if cfg.weights is not None and not on_meta():
            load_reference(net, local_weights(cfg.weights, f"encoder {cfg.name!r}"), f"encoder {cfg.name!r}")
        return net

    @staticmethod
    def _build_ipadapter(cfg: EncoderConfig) -> torch.nn.Module:
        weights = local_weights(cfg.weights, f"encoder {cfg.name!r}") if cfg.weights is not None else None
        return ImageTokens.build(cfg.arch, weights, cfg.weight_name, cfg.seed)

    @staticmethod
    def _vae_architecture(cfg: EncoderConfig) -> torch.nn.Module:
        """The VAE's architecture, no weights read: Stable Diffusion's KL-f8 for ``pretrained`` (the pretrained
        VAEs used here, SD's and Versatile Diffusion's, share it), the tiny one otherwise."""
        if cfg.arch == "pretrained":
            return sd_vae_architecture(cfg.image_size)
        return FrozenEncoder._build_vae(cfg.model_copy(update={"weights": None}))

    @staticmethod
    def _build_vae(cfg: EncoderConfig) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        if cfg.weights is not None:
            path = local_weights(cfg.weights, f"encoder {cfg.name!r}")
            sub = "vae" if (path / "vae" / "config.json").exists() else None
            return AutoencoderKL.from_pretrained(path, subfolder=sub)
        n = len(cfg.tiny_channels)
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.tiny_channels), layers_per_block=1, latent_channels=4,
            norm_num_groups=8, sample_size=cfg.image_size,
        )

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(next(self.net.parameters()).device)
        x = x.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-1] != self.cfg.image_size or x.shape[-2] != self.cfg.image_size:
            x = F.interpolate(x, size=(self.cfg.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        return x

    @torch.no_grad()
    def encode(self, images: torch.Tensor, captions: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (B, H, W, 3) -> (tokens, pooled) float32; ``captions`` (one per image) are read by the
        ``clip-levels`` kind only, which requires them."""
        x = self._pixels(images)
        if self.cfg.kind == "convnext":
            tokens = self._convnext(x)
            return tokens, tokens.mean(1)
        if self.cfg.kind in ("openclip", "ipadapter", "clip-levels"):
            mean = x.new_tensor(OPENAI_MEAN).view(1, 3, 1, 1)
            std = x.new_tensor(OPENAI_STD).view(1, 3, 1, 1)
            x = (x - mean) / std
            if self.cfg.kind == "clip-levels":
                return self._clip_levels(x, captions)
            out = self.net(x)
            tokens, pooled = out if self.cfg.kind == "ipadapter" else out[::-1]
            return tokens.float(), pooled.float()
        posterior = self.net.encode(x * 2 - 1).latent_dist
        latents = posterior.mean * self.net.config.scaling_factor
        pooled = F.adaptive_avg_pool2d(self._mid, 2).flatten(1)
        return latents.float(), pooled.float()

    @torch.no_grad()
    def encode_augmented(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``augments`` encoders: the tokens of a blur-augmented copy of each uint8 image, a fresh draw per call."""
        if not self.augments:
            raise ConfigError(f"encoder {self.cfg.name!r}: a {self.cfg.kind} encoder has no augmented view")
        return self._convnext(blur_augment(self._pixels(images), generator))

    def _convnext(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.new_tensor(CONVNEXT_MEAN).view(1, 3, 1, 1)) / x.new_tensor(CONVNEXT_STD).view(1, 3, 1, 1)
        return self.net(x).float()

    def _clip_levels(self, x: torch.Tensor, captions: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP-MUSED's (f_llv, f_hlv) of normalised pixels ``x`` and their ``captions``."""
        if captions is None or len(captions) != len(x):
            raise ConfigError(f"encoder {self.cfg.name!r} reads the stimuli's captions: give one per image "
                              f"({len(x)} images, {'no' if captions is None else len(captions)} captions)")
        text = fold_tokens(self.tokenizer([str(c) for c in captions], context_length=self.net.context_length),
                           self.net.vocab_size, self.tokenizer)
        image = self.net.encode_image(x)  # the hook keeps the first block's output
        text = self.net.encode_text(text.to(x.device))
        # truncate at 1.5, unit L2 norm, then the mean of the two (the paper's appendix)
        hlv = (F.normalize(image.clamp(-1.5, 1.5), dim=-1) + F.normalize(text.clamp(-1.5, 1.5), dim=-1)) / 2
        return self._mid.float(), hlv.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE encoders: latents as :meth:`encode` gives them -> uint8 images (B, H, W, 3)."""
        if self.cfg.kind != "vae":
            raise ConfigError(f"encoder {self.cfg.name!r}: a {self.cfg.kind} encoder cannot decode images")

        return decode_latents(self.net, latents.to(next(self.net.parameters()).device)).cpu()


class TargetCache:
    """Frozen targets by image id, computed once per process (images repeat across epochs and subjects)."""
    def __init__(self, encoders: dict[str, FrozenEncoder]):
        self.encoders = encoders
        self.cache: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {k: {} for k in encoders}

    def __call__(self, image_ids: torch.Tensor, images: torch.Tensor | None = None, load_images=None,
                 captions: list[str] | None = None, load_captions=None) -> dict[str, torch.Tensor]:
        """Targets for ``image_ids``; images of uncached ids come from ``images`` (aligned with the ids)
        or from ``load_images(ids)``, their captions (encoders that read them) from ``captions`` or
        ``load_captions(ids)`` likewise."""
        out: dict[str, torch.Tensor] = {}
        ids = [int(i) for i in image_ids.tolist()]
        for key, enc in self.encoders.items():
            cache = self.cache[key]
            missing = [n for n, i in enumerate(ids) if i not in cache]
            if missing:
                if images is not None:
                    pixels = images[missing]
                elif load_images is not None:
                    pixels = load_images(torch.tensor([ids[n] for n in missing]))
                else:
                    raise ConfigError(f"target {key!r}: no images and no embeddings in the store")
                texts = None
                if enc.needs_captions and captions is not None:
                    texts = [captions[n] for n in missing]
                elif enc.needs_captions and load_captions is not None:
                    texts = list(load_captions(torch.tensor([ids[n] for n in missing])))
                tokens, pooled = enc.encode(pixels, texts)  # no captions: encoders that need them say so
                for j, n in enumerate(missing):
                    cache[ids[n]] = (tokens[j].cpu(), pooled[j].cpu())
            out[f"{key}_tokens"] = torch.stack([cache[i][0] for i in ids])
            out[f"{key}_pooled"] = torch.stack([cache[i][1] for i in ids])
        return out


def fold_tokens(ids: torch.Tensor, vocab_size: int, tokenizer) -> torch.Tensor:
    """open_clip token ids (B, L) -> ids a text tower with ``vocab_size`` ids embeds (unchanged when it has the
    tokenizer's vocabulary). A smaller vocabulary (the tiny / demo towers) gets start -> vocab_size - 2,
    end -> vocab_size - 1 (the largest id: argmax pooling still reads the end token), padding stays 0, every
    other id -> 1 + id mod (vocab_size - 3): deterministic and valid (words may share an id: such towers have
    random weights). The tokenizer already truncates to the tower's context length, keeping the end token."""
    if ids.max() < vocab_size:
        return ids
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    folded = 1 + ids % (vocab_size - 3)
    folded = torch.where(ids == 0, 0, folded)
    folded = torch.where(ids == sot, vocab_size - 2, folded)
    return torch.where(ids == eot, vocab_size - 1, folded)


def augments(cfg: EncoderConfig) -> bool:
    """Whether training also reads the tokens of an augmented view of each image (``<key>_aug_tokens``, drawn
    every step): MindEye2's ConvNeXt target."""
    return cfg.kind == "convnext"


def requires_weights(cfg: EncoderConfig) -> bool:
    """True for encoders that exist only as pretrained weights (nothing is downloaded at run time)."""
    if cfg.weights is not None:
        return False
    if cfg.kind in ("openclip", "clip-levels"):
        return not cfg.arch.startswith("raydecode-")
    if cfg.kind == "convnext":
        return cfg.arch == "xlarge"
    return cfg.arch == "pretrained"


def on_meta() -> bool:
    """Whether modules are being built on the meta device (parameter counts, memory plans: no weights read)."""
    return torch.empty(0).device.type == "meta"


def build_vae(name: str, what: str = "model.vae") -> tuple[EncoderConfig, torch.nn.Module]:
    """The VAE ``name`` exactly as the target encoder of that name builds it (same weights, same latents): a
    diffusion method's latent space (``what``: the config key, for errors); on the meta device only its config."""
    from diffusers import AutoencoderKL

    enc = encoder_config(name)
    if enc.kind != "vae":
        raise ConfigError(f"{what} {enc.name!r}: a {enc.kind} encoder, not a VAE")
    if on_meta():
        if enc.weights is not None:
            root = local_weights(enc.weights, f"{what} {enc.name!r}", ("*.json",))  # the config only
            sub = "vae" if (root / "vae" / "config.json").exists() else None
            return enc, AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder=sub))
        if enc.arch == "pretrained":  # Stable Diffusion's VAE architecture (counts only)
            return enc, sd_vae_architecture(enc.image_size)
    if requires_weights(enc):
        raise ConfigError(f"{what} {enc.name!r} needs `weights` (a diffusers directory: a local path, s3:// or "
                          "hf:// reference)")
    with seeded(enc.seed):
        return enc, FrozenEncoder._build_vae(enc)
