"""Latent-diffusion sampling pieces shared by the methods and the evaluation suite's image generators: seeded
initial noise (one generator per row), a DDIM scheduler that never clips latents, the DDIM loop with batched
classifier-free guidance, and VAE latents -> uint8 images. Nothing here knows about a method."""

from __future__ import annotations

import numpy as np
import torch

from raydecode.runtime import seeded

# Versatile Diffusion's image UNet (a Stable-Diffusion-1 UNet with 768-wide cross-attention to 257 CLIP tokens):
# the architecture paper presets build on the meta device when no weights are named (parameter counts).
VD_IMAGE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
# Small random-weight UNets of the tiny / demo image generators (cross_attention_dim set by each preset)
TINY_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
DEMO_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    prediction_type="epsilon", clip_sample=False, steps_offset=1)
RANDOM_SCHEDULER = dict(SD_SCHEDULER, beta_schedule="squaredcos_cap_v2")  # the tiny / demo generators


def initial_noise(seeds: np.ndarray | list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One seeded standard-normal latent per row (reconstructions do not depend on how rows are batched)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def ddim_scheduler(noise_scheduler_config, steps: int):
    """A DDIM scheduler set to ``steps`` steps, from the training scheduler's config; latents are never clipped
    (they exceed [-1, 1])."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(noise_scheduler_config, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    return sched


def _cat(a, b):
    """Two batches of UNet inputs (tensors, or lists of tensors as IP-Adapter's ``image_embeds``) as one."""
    return [torch.cat([x, y]) for x, y in zip(a, b)] if isinstance(a, list) else torch.cat([a, b])


def ddim_denoise(unet, sched, x: torch.Tensor, cond: torch.Tensor, null: torch.Tensor | None = None,
                 guidance: float = 1.0, timesteps: torch.Tensor | None = None, added: dict | None = None,
                 added_null: dict | None = None) -> torch.Tensor:
    """DDIM (eta 0) from the latents ``x`` over ``timesteps`` (default: all of ``sched``'s), the UNet conditioned on
    ``cond`` through cross-attention (and ``added``: its ``added_cond_kwargs``, e.g. IP-Adapter's image tokens).
    With a ``null`` condition (and ``added_null``): classifier-free guidance,
    ``eps_null + guidance * (eps_cond - eps_null)``, both predictions from one batched UNet call; without: the
    conditional prediction alone."""
    for t in sched.timesteps if timesteps is None else timesteps:
        inp = sched.scale_model_input(x, t)
        if null is None:
            eps = unet(inp, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample
        else:
            both_added = {k: _cat(v, added_null[k]) for k, v in added.items()} if added else None
            both = unet(torch.cat([inp, inp]), t, encoder_hidden_states=torch.cat([cond, null]),
                        added_cond_kwargs=both_added).sample
            eps_cond, eps_null = both.chunk(2)
            eps = eps_null + guidance * (eps_cond - eps_null)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents (B, C, h, w) -> uint8 images (B, H, W, 3)."""
    images = vae.decode(latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def random_unet(unet_config: dict, vae, image_size: int, seed: int):
    """A random-weight ``UNet2DConditionModel`` (``unet_config``) in ``vae``'s latent space for images of
    ``image_size`` pixels, its weights from ``seed`` (the tiny / demo image generators)."""
    from diffusers import UNet2DConditionModel

    down = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = vae.config.latent_channels
    with seeded(seed):
        return UNet2DConditionModel(**{"in_channels": channels, "out_channels": channels, **unet_config,
                                       "sample_size": image_size // down})
