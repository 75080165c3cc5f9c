"""Dynadiff (Careil, Benchetrit et al. 2025, "Single-stage Decoding of Images from Continuously Evolving fMRI").

A brain module maps a window of the BOLD time series (T volumes of C voxels) to the
conditioning tokens of a frozen latent-diffusion UNet; the brain module and LoRA
adapters of the UNet's cross-attention are trained together with the plain
diffusion loss (Sec. 2.2):

- brain module: subject layer (voxels -> 1552 channels, per volume), timestep layer
  (distinct weights per volume), LayerNorm, GELU, dropout 0.5, linear temporal
  aggregation, linear output to N tokens x the UNet's cross-attention width
  (Versatile Diffusion's image UNet: 257 x 768);
- the UNet (diffusers ``UNet2DConditionModel``) and the VAE (``AutoencoderKL``) are frozen;
  LoRA (peft, rank 4, alpha 4) on ``attn2`` to_q / to_k / to_v / to_out.0;
- noise prediction with offset noise (0.1) and cubic timestep sampling (more draws
  of the noisiest timesteps, T2I-Adapter's schedule); 10% of the conditions are
  replaced by a learned null embedding, for classifier-free guidance;
- inference: DDIM, 20 steps, guidance 3, then the VAE decoder.

Multi-subject models keep a subject layer and a timestep layer per subject and share
the rest; a new subject starts from a multi-subject checkpoint with fresh layers of
its own (:func:`load_pretrained`). Checkpoints hold the trainable weights only
(brain module, LoRA, null embedding): the frozen UNet and VAE are rebuilt from their
path (or seed) when a model is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raydecode.config import WindowConfig
from raydecode.errors import ConfigError
from raydecode.methods.spec import (
    Adapts,
    DatasetInfo,
    EmbedsTargets,
    FreezesWeights,
    MethodSpec,
    Progress,
    ReadsWindows,
    Reconstructs,
    RowMetrics,
    register,
)
from raydecode.nn.diffusion import (
    SD_SCHEDULER,
    VD_IMAGE_UNET,
    ddim_denoise,
    ddim_scheduler,
    decode_latents,
    initial_noise,
)
from raydecode.nn.encoders import build_vae, encoder_config, on_meta, requires_weights
from raydecode.runtime import row_seeds, seeded
from raydecode.weights import local_weights

LORA_TARGETS = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' file name for LoRA weights

class DynadiffConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: WindowConfig = Field(default_factory=WindowConfig, description="fMRI window after each onset")
    channels: int = Field(1552, description="subject-layer width")
    dropout: float = 0.5
    cond_tokens: int = Field(257, description="conditioning tokens (Versatile Diffusion: 257 CLIP image tokens); "
                                              "their width is the UNet's cross_attention_dim")
    unet: str | None = Field(None, description="diffusers directory of the frozen UNet (a pipeline dir with "
                                               "image_unet/ or unet/, or a UNet dir); None: random weights from "
                                               "unet_config and seed (tiny / demo)")
    unet_config: dict[str, Any] = Field(default_factory=lambda: dict(VD_IMAGE_UNET),
                                        description="UNet2DConditionModel config for random weights")
    vae: str | dict[str, Any] = Field("sd-vae", description="the frozen VAE: an encoder name or mapping "
                                                            "(raydecode.nn.encoders); its latents are the targets")
    scheduler: dict[str, Any] = Field(default_factory=lambda: dict(SD_SCHEDULER),
                                      description="DDPMScheduler config (a UNet pipeline's scheduler/ wins)")
    seed: int = Field(0, description="seed of random-weight UNets")
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = 4.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    offset_noise: float = Field(0.1, ge=0)
    timestep_sampling: str = Field("cubic", pattern="^(cubic|uniform)$")
    null_prob: float = Field(0.1, ge=0, le=1, description="share of training conditions replaced by the null")
    ddim_steps: int = Field(20, ge=1)
    guidance: float = Field(3.0, ge=0)
    eval_timesteps: int = Field(10, ge=1, description="test loss: timesteps evenly spread over the schedule")


PRESETS: dict[str, dict] = {
    "paper": {},
    "demo": dict(
        channels=256, cond_tokens=16, vae="vae-demo",
        unet_config=dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64,
                         attention_head_dim=8, norm_num_groups=8,
                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
        scheduler=dict(SD_SCHEDULER, beta_schedule="squaredcos_cap_v2"),
    ),
    "tiny": dict(
        channels=64, cond_tokens=8, vae="vae-tiny",
        unet_config=dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                         attention_head_dim=8, norm_num_groups=8,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        scheduler=dict(SD_SCHEDULER, beta_schedule="squaredcos_cap_v2"),
    ),
}


# -- frozen parts --------------------------------------------------------------------------


def _unet_dir(path: str) -> tuple[Path, str | None]:
    p = local_weights(path, "model.unet", ("*.json",) if on_meta() else None)  # on meta: the configs only
    for sub in ("image_unet", "unet"):
        if (p / sub / "config.json").is_file():
            return p, sub
    if (p / "config.json").is_file():
        return p, None
    raise ConfigError(f"model.unet {path!r}: not a diffusers UNet directory (no config.json in it, nor in "
                      "image_unet/ or unet/)")


def _check_weights(cfg: DynadiffConfig) -> None:
    """Name every missing pretrained path at once (paper scale needs a UNet and a VAE directory)."""
    if on_meta():
        return
    missing = []
    if cfg.unet is None and cfg.unet_config.get("cross_attention_dim") == VD_IMAGE_UNET["cross_attention_dim"] \
            and tuple(cfg.unet_config.get("block_out_channels", ())) == VD_IMAGE_UNET["block_out_channels"]:
        missing.append("model.unet (a Versatile-Diffusion-compatible diffusers directory)")
    if requires_weights(encoder_config(cfg.vae)):
        missing.append(f"the weights of model.vae {encoder_config(cfg.vae).name!r} (a diffusers directory with vae/)")
    if missing:
        raise ConfigError("the paper preset fine-tunes a pretrained latent-diffusion model: set " + " and ".join(missing)
                          + "; nothing is downloaded at run time")


def build_unet(cfg: DynadiffConfig, latent_size: int):
    from diffusers import UNet2DConditionModel

    if cfg.unet is not None:
        root, sub = _unet_dir(cfg.unet)
        if on_meta():
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder=sub))
        return UNet2DConditionModel.from_pretrained(root, subfolder=sub)
    if not on_meta() and cfg.unet_config.get("cross_attention_dim") == VD_IMAGE_UNET["cross_attention_dim"] \
            and tuple(cfg.unet_config.get("block_out_channels", ())) == VD_IMAGE_UNET["block_out_channels"]:
        raise ConfigError("model.unet: the paper preset fine-tunes a pretrained UNet; set it to a Versatile-Diffusion-"
                          "compatible diffusers directory (nothing is downloaded at run time)")
    config = {"in_channels": 4, "out_channels": 4, **cfg.unet_config, "sample_size": latent_size}
    with seeded(cfg.seed):
        return UNet2DConditionModel(**config)


def build_scheduler(cfg: DynadiffConfig):
    from diffusers import DDPMScheduler

    if cfg.unet is not None:
        root, _ = _unet_dir(cfg.unet)
        if (root / "scheduler" / "scheduler_config.json").is_file():
            return DDPMScheduler.from_config(DDPMScheduler.load_config(root, subfolder="scheduler"))
    return DDPMScheduler(**cfg.scheduler)


# -- brain module --------------------------------------------------------------------------


class TimestepLinear(nn.Module):
    """A distinct ``channels x channels`` linear map for every time sample (Sec. 2.2, "timestep-specific")."""
    def __init__(self, n_samples: int, channels: int):
        super().__init__()
        bound = channels ** -0.5
        self.weight = nn.Parameter(torch.empty(n_samples, channels, channels).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_samples, channels).uniform_(-bound, bound))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        return torch.einsum("btc,tcd->btd", z, self.weight) + self.bias


class BrainModule(nn.Module):
    """(B, T, voxels) -> (B, N, D) conditioning tokens; subject and timestep layers per subject, the rest shared."""
    def __init__(self, voxels: dict[int, int], n_samples: int, channels: int, tokens: int, width: int, dropout: float):
        super().__init__()
        self.subject_layers = nn.ModuleDict({str(s): nn.Linear(v, channels) for s, v in sorted(voxels.items())})
        self.timestep_layers = nn.ModuleDict({str(s): TimestepLinear(n_samples, channels) for s in sorted(voxels)})
        self.voxels = dict(voxels)
        self.norm = nn.LayerNorm(channels)
        self.dropout = nn.Dropout(dropout)
        self.temporal = nn.Linear(n_samples, 1)  # linear aggregation over the window's volumes
        self.out = nn.Linear(channels, tokens * width)
        self.tokens, self.width, self.channels = tokens, width, channels

    def forward(self, bold: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
        known = torch.tensor(sorted(self.voxels), device=subject.device)
        if not torch.isin(subject, known).all():
            unknown = sorted(set(subject.tolist()) - set(self.voxels))
            raise ConfigError(f"subject(s) {unknown}: this model has subject layers for {sorted(self.voxels)} only")
        z = bold.new_zeros(bold.shape[0], bold.shape[1], self.channels)
        # every subject's layers run on every rank, in order (ZeRO-3 gathers parameters collectively)
        for key, layer in self.subject_layers.items():
            idx = torch.nonzero(subject == int(key)).flatten()
            h = self.timestep_layers[key](layer(bold[idx, :, : self.voxels[int(key)]]))
            z = z.index_copy(0, idx, h)
        z = self.dropout(F.gelu(self.norm(z)))
        z = self.temporal(z.transpose(1, 2)).squeeze(-1)  # (B, C)
        return self.out(z).view(-1, self.tokens, self.width)


class NullCondition(nn.Module):
    """The learned embedding that replaces the brain condition (training) and guides sampling (CFG)."""
    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(tokens, width))

    def forward(self, n: int) -> torch.Tensor:
        return self.embedding.unsqueeze(0).expand(n, -1, -1)


# -- the model -----------------------------------------------------------------------------


class Dynadiff(nn.Module):
    def __init__(self, cfg: DynadiffConfig, info: DatasetInfo):
        super().__init__()
        from peft import LoraConfig

        if info.tr_s is None:
            raise ConfigError("dynadiff reads BOLD time series: the store has no TR (ingest with timeseries: true)")
        self.cfg = cfg
        self.n_samples = cfg.window.n_samples(info.tr_s)
        _check_weights(cfg)
        self.vae_encoder, self.vae = build_vae(cfg.vae)
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_shape = (int(self.vae.config.latent_channels), self.vae_encoder.image_size // down,
                             self.vae_encoder.image_size // down)
        self.unet = build_unet(cfg, self.latent_shape[1])
        width = int(self.unet.config.cross_attention_dim)
        self.vae.requires_grad_(False).eval()
        self.unet.requires_grad_(False)
        self.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                         target_modules=list(cfg.lora_targets), init_lora_weights=True))
        self.brain = BrainModule(info.voxels, self.n_samples, cfg.channels, cfg.cond_tokens, width, cfg.dropout)
        self.null = NullCondition(cfg.cond_tokens, width)
        self.noise_scheduler = build_scheduler(cfg)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        return self

    def condition(self, batch: dict) -> torch.Tensor:
        return self.brain(batch["bold"], batch["subject"])

    def forward(self, batch: dict, progress: Progress | None = None, mode: str = "loss"):
        if mode == "loss":
            return self._loss(batch)
        if mode == "test":
            return self._test_losses(batch)
        return {"condition": self.condition(batch).flatten(1)}

    def _latents(self, batch: dict) -> torch.Tensor:
        return batch["latent_tokens"].view(-1, *self.latent_shape)

    def _noised(self, latents: torch.Tensor, t: torch.Tensor, generators: list[torch.Generator] | None = None):
        """Noised latents and the prediction target; ``generators``: one per row (test losses), else the global
        generator (training)."""
        def draw(shape):
            if generators is None:
                return torch.randn(shape)
            return torch.stack([torch.randn(shape[1:], generator=g) for g in generators])

        noise = draw(latents.shape).to(latents)
        if self.cfg.offset_noise:  # offset noise: a per-channel constant shift of the noise
            noise = noise + self.cfg.offset_noise * draw((*latents.shape[:2], 1, 1)).to(latents)
        sched = self.noise_scheduler
        noisy = sched.add_noise(latents, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        return noisy, target

    def sample_timesteps(self, n: int, device) -> torch.Tensor:
        total = self.noise_scheduler.config.num_train_timesteps
        u = torch.rand(n)
        if self.cfg.timestep_sampling == "cubic":  # more of the noisiest (first sampled) timesteps
            u = 1 - u ** 3
        return (u * total).long().clamp(0, total - 1).to(device)

    def _loss(self, batch: dict):
        latents = self._latents(batch)
        n = latents.shape[0]
        cond = self.condition(batch)
        drop = (torch.rand(n) < self.cfg.null_prob).to(cond.device)
        cond = torch.where(drop[:, None, None], self.null(n).to(cond.dtype), cond)
        t = self.sample_timesteps(n, latents.device)
        noisy, target = self._noised(latents, t)
        pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"loss": float(loss.detach()), "null_rate": float(drop.float().mean())}

    @torch.no_grad()
    def _test_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Denoising error per row at fixed timesteps and noise (comparable across epochs, shifts and runs) with
        the row's brain condition (``cond``), the learned null (``null``) and the condition of another test image
        of the same subject (``shuffled``: what the condition carries about *this* image). The noise is seeded per
        (subject, image): a row's values do not depend on how rows are batched (``shuffled`` pairs rows within the
        batch, so it does)."""
        latents = self._latents(batch)
        n = latents.shape[0]
        total = self.noise_scheduler.config.num_train_timesteps
        steps = torch.linspace(0, total - 1, self.cfg.eval_timesteps).long()
        gens = [torch.Generator().manual_seed(int(s))
                for s in row_seeds(0, batch["subject"].tolist(), batch["image_id"].tolist())]
        cond, null = self.condition(batch), self.null(n).to(latents.dtype)
        other = cond[_roll_within(batch["subject"])]
        out = {k: latents.new_zeros(n) for k in ("cond", "null", "shuffled")}
        for s in steps.tolist():
            t = torch.full((n,), s, dtype=torch.long, device=latents.device)
            noisy, target = self._noised(latents, t, gens)
            for key, c in (("cond", cond), ("null", null), ("shuffled", other)):
                pred = self.unet(noisy, t, encoder_hidden_states=c).sample
                out[key] += (pred.float() - target.float()).pow(2).flatten(1).mean(1) / len(steps)
        return out

    @torch.no_grad()
    def sample(self, batch: dict, steps: int | None = None, guidance: float | None = None,
               conditional_only: bool = False, noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM reconstructions as uint8 images (B, H, W, 3). ``guidance``: the classifier-free guidance scale
        (default: the config's); ``conditional_only``: the brain condition alone, no null pass. ``noise``: the
        initial latents (default: standard normal from the global generator; see :func:`initial_noise`)."""
        guidance = self.cfg.guidance if guidance is None else guidance
        cond = self.condition(batch)
        n = cond.shape[0]
        sched = ddim_scheduler(self.noise_scheduler.config, steps or self.cfg.ddim_steps)
        x = (noise if noise is not None else torch.randn(n, *self.latent_shape)).to(cond) * sched.init_noise_sigma
        null = None if conditional_only else self.null(n).to(cond.dtype)
        return self.decode(ddim_denoise(self.unet, sched, x, cond, null, guidance))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, latents)


def _roll_within(subject: torch.Tensor) -> torch.Tensor:
    """A permutation that moves every row to the next row of the same subject (cyclically)."""
    perm = torch.arange(len(subject), device=subject.device)
    for s in subject.unique():
        idx = torch.nonzero(subject == s).flatten()
        perm[idx] = idx.roll(1)
    return perm



# -- LoRA in the diffusers / peft format ---------------------------------------------------


def save_lora(model: Dynadiff, out_dir: str) -> str:
    """The UNet's LoRA as ``pytorch_lora_weights.safetensors`` (peft keys, the LoRA config in its metadata)."""
    model.unet.save_lora_adapter(out_dir, weight_name=LORA_WEIGHTS)
    return os.path.join(out_dir, LORA_WEIGHTS)


def export(model: Dynadiff, out_dir: str) -> list[str]:
    """``lora/pytorch_lora_weights.safetensors`` (diffusers/peft) and ``brain_module.safetensors`` (the brain module
    and the null embedding, ``brain.*`` / ``null.*`` keys)."""
    from safetensors.torch import save_file

    lora = save_lora(model, os.path.join(out_dir, "lora"))
    brain = os.path.join(out_dir, "brain_module.safetensors")
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
             if k.startswith(("brain.", "null."))}
    save_file(state, brain, metadata={"format": "pt"})
    return [lora, brain]


def reconstruct(model: Dynadiff, batch: dict, seeds, steps: int | None = None,
                guidance: float | None = None) -> torch.Tensor:
    return model.sample(batch, steps=steps, guidance=guidance, noise=initial_noise(seeds, model.latent_shape))


def load_lora(unet, lora_dir: str):
    """Load a saved LoRA into a UNet (e.g. a fresh copy of the frozen base)."""
    unet.load_lora_adapter(lora_dir, prefix=None, weight_name=LORA_WEIGHTS, adapter_name="default")
    return unet


# -- spec ----------------------------------------------------------------------------------


def build_model(cfg: DynadiffConfig, info: DatasetInfo) -> Dynadiff:
    return Dynadiff(cfg, info)


def param_groups(model: Dynadiff, cfg: DynadiffConfig, weight_decay: float) -> list[dict]:
    """Brain module and LoRA weights decay; biases, norms and the null embedding do not. Frozen weights are not
    handed to the optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.startswith("null.") or name.endswith(".bias")
         else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def loss(model, batch: dict, progress: Progress):
    return model(batch, progress=progress)


def predict(model, batch: dict) -> dict[str, torch.Tensor]:
    return model(batch, mode="predict")


def test_metrics(model, batch: dict) -> dict[str, torch.Tensor]:
    """Per-row test losses: ``diffusion_loss`` (the row's brain condition), ``null_loss`` (the learned null) and
    ``shuffled_loss`` (another test image's brain condition)."""
    out = model(batch, mode="test")
    return {"diffusion_loss": out["cond"], "null_loss": out["null"], "shuffled_loss": out["shuffled"]}


def summarize_test(means: dict[str, float]) -> dict[str, float]:
    """``condition_gain``: the share of the null condition's denoising error the brain condition removes (anything
    the condition learned, image-specific or not); ``image_gain``: the share of a mismatched image's condition error
    the right window's condition removes (what it decodes about the image seen; 0 = nothing)."""
    return {**means,
            "condition_gain": (means["null_loss"] - means["diffusion_loss"]) / max(means["null_loss"], 1e-12),
            "image_gain": (means["shuffled_loss"] - means["diffusion_loss"]) / max(means["shuffled_loss"], 1e-12)}


def targets(cfg: DynadiffConfig) -> dict[str, str | dict]:
    enc = encoder_config(cfg.vae)
    return {"latent": enc.name if isinstance(cfg.vae, str) else enc.model_dump()}


def windows(cfg: DynadiffConfig) -> WindowConfig:
    return cfg.window


def load_pretrained(model: Dynadiff, state: dict[str, torch.Tensor]) -> list[str]:
    """New-subject fine-tuning: every weight of the (multi-subject) checkpoint whose name and shape fit; the new
    subject's subject and timestep layers stay freshly initialised. Returns the trainable keys left at init."""
    own = {k: v for k, v in model.state_dict().items() if k in persisted_keys(model)}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable)


def persisted_keys(model: nn.Module) -> set[str]:
    """State-dict keys a checkpoint holds: trainable parameters and buffers (frozen weights are rebuilt)."""
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    return keys | {n for n, _ in model.named_buffers()}


SPEC = register(MethodSpec(
    name="dynadiff",
    config_model=DynadiffConfig,
    presets=PRESETS,
    build_model=build_model,
    param_groups=param_groups,
    loss=loss,
    predict=predict,
    columns=("bold", "subject", "image_id"),
    capabilities=(
        EmbedsTargets(targets),
        Adapts(load_pretrained),
        ReadsWindows(windows),
        RowMetrics(test_metrics, summarize_test, headline="image_gain"),
        FreezesWeights(persisted_keys),
        Reconstructs(reconstruct, export=export, defaults=lambda cfg: (cfg.ddim_steps, cfg.guidance)),
    ),
))
