"""MindEye2's model (Scotti et al. 2024, "Shared-Subject Models Enable fMRI-To-Image With 1 Hour of Data"), shared by
the ``mindeye2`` method and the methods that adapt it (``duala``).

Per-subject ridge maps voxels -> a shared latent; a residual MLP backbone maps it
to OpenCLIP ViT-bigG/14 image tokens; three heads train it:

- a diffusion prior (transformer over the tokens) that denoises the true CLIP
  image tokens conditioned on the backbone tokens (Sec. 2.3);
- a retrieval projector with a contrastive loss: BiMixCo (mixup in voxel space)
  for the first third of training, then SoftCLIP with a cosine-annealed
  temperature (Sec. 2.4);
- a low-level branch predicting the image's VAE latents (L1) with an auxiliary
  feature head trained contrastively (Sec. 2.5): its s x s maps are pulled towards the
  ConvNeXt tokens of the image, with the tokens of a blur-augmented copy as the soft
  labels' anchor (the reference's ``soft_cont_loss``, :mod:`raydecode.nn.convnext`).

Loss = prior_scale * prior + clip_scale * contrastive + blur_scale * (L1 + aux_scale * aux).
Fine-tuning (the 1-hour recipe) loads a pretrained state dict and adds the new
subject's ridge map (:func:`load_pretrained`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from raydecode.errors import ConfigError
from raydecode.nn.context import DatasetInfo, Progress
from raydecode.nn.convnext import arch as convnext_arch
from raydecode.nn.convnext import soft_cont_loss
from raydecode.nn.encoders import encoder_config


class MindEye2Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(4096, description="shared latent width (ridge output, backbone width)")
    blocks: int = Field(4, description="residual MLP blocks in the backbone")
    dropout: float = 0.15
    clip_encoder: str = Field("openclip-bigg", description="frozen image-token target encoder")
    clip_tokens: tuple[int, int] = Field((256, 1664), description="(tokens, width) of the CLIP target")
    proj_layers: int = Field(3, description="retrieval projector depth")
    prior: bool = True
    prior_depth: int = 6
    prior_heads: int = 32  # 1664 / 32 = 52-dim heads
    prior_timesteps: int = 100
    prior_cond_drop: float = Field(0.2, description="brain-condition dropout (to a learned null) while training")
    prior_image_drop: float = Field(0.2, description="noised-image dropout (to a learned null) while training, as "
                                                     "the reference's prior (DALLE2-pytorch's image_cond_drop_prob)")
    prior_guidance: float = Field(1.0, description="classifier-free guidance when sampling (reference: 1, none)")
    lowlevel: bool = True
    vae_encoder: str = Field("sd-vae", description="frozen VAE-latent target encoder")
    vae_latents: tuple[int, int, int] = (4, 28, 28)
    lowlevel_channels: int = 64
    lowlevel_size: int = 7
    decoder_channels: tuple[int, ...] = (32, 64, 128)
    decoder_norm_groups: int = 32
    aux_encoder: str | dict = Field("convnext-xl-mindeye2", description="the auxiliary head's target: a convnext "
                                    "encoder (name or mapping) whose token grid is lowlevel_size x lowlevel_size")
    blurry_dropout: float = Field(0.3, description="dropout on the low-level branch's input maps (reference: 0.3)")
    # loss (MindEye2 paper: 30, 1, 0.5)
    prior_scale: float = 30.0
    clip_scale: float = 1.0
    blur_scale: float = 0.5
    aux_scale: float = 0.1
    aux_temperature: float = 0.2
    mixup_fraction: float = Field(0.33, description="BiMixCo for this fraction of training, then SoftCLIP")
    mixup_beta: float = 0.15
    mixup_select: float = 0.5
    bimixco_temperature: float = 0.006
    softclip_temperature: tuple[float, float] = (0.004, 0.0075)
    ridge_weight_decay: float = Field(1e-2, description="the ridge penalty: weight decay on the ridge maps")

    @model_validator(mode="after")
    def _aux_grid(self):
        if self.lowlevel:
            enc = encoder_config(self.aux_encoder)
            if enc.kind != "convnext":
                raise ValueError(f"aux_encoder {enc.name!r} is a {enc.kind} encoder; the auxiliary head's target is a "
                                 "convnext one (e.g. convnext-xl-mindeye2)")
            grid = enc.image_size // (convnext_arch(enc.arch).stem * 8)
            if grid != self.lowlevel_size:
                raise ValueError(f"aux_encoder {enc.name!r} gives a {grid} x {grid} token grid at {enc.image_size} px; "
                                 f"lowlevel_size is {self.lowlevel_size}")
        return self

    def aux_dim(self) -> int:
        """The width of the auxiliary target's tokens (512 for the reference's ConvNeXt)."""
        return convnext_arch(encoder_config(self.aux_encoder).arch).projector[-1]


PRESETS: dict[str, dict] = {
    "paper": {},
    "demo": dict(
        hidden=256, blocks=4, clip_encoder="openclip-demo", clip_tokens=(16, 64), prior_depth=2, prior_heads=4,
        vae_encoder="vae-demo", vae_latents=(4, 16, 16), lowlevel_channels=16, lowlevel_size=4,
        decoder_channels=(16, 32, 32), decoder_norm_groups=8, aux_encoder="convnext-demo",
        # random-weight targets have far less spread than real CLIP tokens: warmer contrastive temperatures
        bimixco_temperature=0.05, softclip_temperature=(0.04, 0.075),
    ),
    "tiny": dict(
        hidden=128, blocks=2, clip_encoder="openclip-tiny", clip_tokens=(16, 32), prior_depth=1, prior_heads=2,
        vae_encoder="vae-tiny", vae_latents=(4, 8, 8), lowlevel_channels=16, lowlevel_size=2,
        decoder_channels=(16, 16, 32), decoder_norm_groups=8, aux_encoder="convnext-tiny",
        bimixco_temperature=0.05, softclip_temperature=(0.04, 0.075),
    ),
}


# -- modules -------------------------------------------------------------------------------


class RidgeMaps(nn.Module):
    """One linear map per subject: voxels -> shared latent (the ridge penalty is their weight decay)."""

    def __init__(self, voxels: dict[int, int], hidden: int):
        super().__init__()
        self.maps = nn.ModuleDict({str(s): nn.Linear(v, hidden) for s, v in sorted(voxels.items())})
        self.voxels = dict(voxels)

    def forward(self, betas: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
        out = betas.new_zeros(betas.shape[0], next(iter(self.maps.values())).out_features)
        widest = max(self.voxels.values())
        if betas.shape[1] < widest:  # a batch padded to its own subjects' width (e.g. evaluating one subject)
            betas = F.pad(betas, (0, widest - betas.shape[1]))
        # every map runs on every rank, in the same order (ZeRO-3 gathers parameters collectively)
        for key, linear in self.maps.items():
            idx = (subject == int(key)).nonzero(as_tuple=True)[0]
            out = out.index_copy(0, idx, linear(betas[idx, : self.voxels[int(key)]]))
        return out


class ResidualMLP(nn.Module):
    """Backbone: blocks of LayerNorm -> Linear -> GELU -> Dropout -> Linear, each with a residual."""

    def __init__(self, hidden: int, blocks: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(hidden, hidden))
            for _ in range(blocks)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def projector(width: int, layers: int) -> nn.Sequential:
    """Retrieval projector applied per token (MindEye2's clip_proj): (LayerNorm, GELU, Linear) x layers."""
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.LayerNorm(width), nn.GELU(), nn.Linear(width, width)]
    return nn.Sequential(*mods)


class DiffusionPrior(nn.Module):
    """Transformer denoiser of CLIP image tokens conditioned on backbone tokens (predicts x0).

    Sequence: [condition tokens, timestep token, noised image tokens]; the output at the image
    positions is the denoised tokens. Conditioning dropout swaps the condition for a learned null.
    """

    def __init__(self, tokens: int, width: int, depth: int, heads: int, timesteps: int):
        super().__init__()
        from diffusers import DDPMScheduler

        self.cond_pos = nn.Parameter(torch.zeros(1, tokens, width))
        self.image_pos = nn.Parameter(torch.zeros(1, tokens, width))
        self.null_cond = nn.Parameter(torch.zeros(1, tokens, width))
        self.null_image = nn.Parameter(torch.zeros(1, tokens, width))
        for p in (self.cond_pos, self.image_pos, self.null_cond, self.null_image):
            nn.init.normal_(p, std=0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))
        self.width = width
        self.scheduler = DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2",
                                       prediction_type="sample", clip_sample=False)

    def _time_embedding(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([args.sin(), args.cos()], -1)
        if emb.shape[1] < self.width:
            emb = F.pad(emb, (0, self.width - emb.shape[1]))
        return emb.to(dtype)

    def forward(self, cond: torch.Tensor, noised: torch.Tensor, t: torch.Tensor,
                drop: torch.Tensor | None = None, drop_image: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            cond = torch.where(drop[:, None, None], self.null_cond.to(cond.dtype).expand_as(cond), cond)
        if drop_image is not None:
            noised = torch.where(drop_image[:, None, None], self.null_image.to(noised.dtype).expand_as(noised), noised)
        time = self.time_mlp(self._time_embedding(t, cond.dtype))[:, None]
        x = torch.cat([cond + self.cond_pos, time, noised + self.image_pos], 1)
        x = self.transformer(x)
        return self.out(x[:, -noised.shape[1]:])

    def loss(self, cond: torch.Tensor, target: torch.Tensor, cond_drop: float, image_drop: float = 0.0) -> torch.Tensor:
        b = target.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), device=target.device)
        noise = torch.randn_like(target)
        noised = self.scheduler.add_noise(target, noise, t)
        drop = torch.rand(b, device=target.device) < cond_drop
        drop_image = torch.rand(b, device=target.device) < image_drop
        return F.mse_loss(self(cond, noised, t, drop, drop_image), target)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int = 20, guidance: float = 1.0,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDIM sampling; with ``guidance`` other than 1, classifier-free guidance against the learned null
        condition and null image (as the reference's ``forward_with_cond_scale``); ``noise``: the initial tokens
        (default: standard normal from ``generator``)."""
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        x = noise if noise is not None else torch.randn(cond.shape, generator=generator, dtype=torch.float32)
        x = x.to(cond)
        null = torch.ones(cond.shape[0], dtype=torch.bool, device=cond.device)
        for t in sched.timesteps:
            tt = t.expand(cond.shape[0]).to(cond.device)
            pred = self(cond, x, tt)
            if guidance != 1:
                pred_u = self(cond, x, tt, drop=null, drop_image=null)
                pred = pred_u + guidance * (pred - pred_u)
            x = sched.step(pred, t, x).prev_sample
        return x


class LowLevel(nn.Module):
    """Low-level branch: linear to C x s x s maps, a conv decoder up to the VAE latents, and an
    auxiliary feature head (MindEye2's blin1 / bupsampler / b_maps_projector)."""

    def __init__(self, cfg: MindEye2Config):
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder

        c, s = cfg.lowlevel_channels, cfg.lowlevel_size
        self.shape = (c, s, s)
        self.linear = nn.Linear(cfg.hidden, c * s * s)
        self.dropout = nn.Dropout(cfg.blurry_dropout)
        self.norm = nn.GroupNorm(1, c)
        n = len(cfg.decoder_channels)
        self.decoder = Decoder(in_channels=c, out_channels=cfg.vae_latents[0], up_block_types=("UpDecoderBlock2D",) * n,
                               block_out_channels=tuple(cfg.decoder_channels), layers_per_block=1,
                               norm_num_groups=cfg.decoder_norm_groups)
        f = cfg.aux_dim()  # the reference's b_maps_projector: 1x1 convs to the target's width, per position
        self.aux = nn.Sequential(nn.Conv2d(c, f, 1, bias=False), nn.GroupNorm(1, f), nn.ReLU(),
                                 nn.Conv2d(f, f, 1, bias=False), nn.GroupNorm(1, f), nn.ReLU(), nn.Conv2d(f, f, 1))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (VAE latents, auxiliary tokens (B, s * s, target width))."""
        maps = self.norm(self.dropout(self.linear(h)).view(-1, *self.shape))
        latents = self.decoder(maps)
        aux = self.aux(maps).flatten(2).transpose(1, 2)
        return latents, aux


class MindEye2(nn.Module):
    def __init__(self, cfg: MindEye2Config, info: DatasetInfo):
        super().__init__()
        self.cfg = cfg
        n, d = cfg.clip_tokens
        self.ridge = RidgeMaps(info.voxels, cfg.hidden)
        self.backbone = ResidualMLP(cfg.hidden, cfg.blocks, cfg.dropout)
        self.to_tokens = nn.Linear(cfg.hidden, n * d)
        self.projector = projector(d, cfg.proj_layers)
        self.prior = DiffusionPrior(n, d, cfg.prior_depth, cfg.prior_heads, cfg.prior_timesteps) if cfg.prior else None
        self.lowlevel = LowLevel(cfg) if cfg.lowlevel else None

    def encode(self, betas: torch.Tensor, subject: torch.Tensor,
               perturb: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """-> (shared latent after the ridge map (B, hidden), backbone output (B, hidden), tokens (B, N, D)).

        ``perturb``: applied to the shared latent before the backbone (Duala's distribution perturbation)."""
        z = self.ridge(betas, subject)
        if perturb is not None:
            z = perturb(z)
        h = self.backbone(z)
        return z, h, self.to_tokens(h).view(-1, *self.cfg.clip_tokens)

    def forward(self, batch: dict, progress: Progress | None = None, predict: bool = False):
        if predict:
            return self._predict(batch)
        return self._loss(batch, progress)

    def _predict(self, batch: dict) -> dict[str, torch.Tensor]:
        reps = batch.get("betas_repeats")
        if reps is not None:  # MindEye2's test protocol: the outputs averaged over the image's repetitions
            single = {k: v for k, v in batch.items() if k != "betas_repeats"}
            outs = [self._predict({**single, "betas": reps[:, r]}) for r in range(reps.shape[1])]
            return {k: outs[0][k] if k == "image" else torch.stack([o[k] for o in outs]).mean(0) for k in outs[0]}
        z, h, tokens = self.encode(batch["betas"], batch["subject"])
        out = {"brain": self.projector(tokens).flatten(1), "backbone": tokens.flatten(1), "latent": z, "hidden": h,
               "embedding": h}  # the representation evaluation maps (t-SNE): the backbone's input latent
        if "clip_tokens" in batch:
            out["image"] = batch["clip_tokens"].flatten(1)
        if self.lowlevel is not None:
            out["lowlevel_latents"] = self.lowlevel(h)[0]
        return out

    def _loss(self, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics, _ = self.base_loss(batch, progress)
        metrics["loss"] = loss.detach()
        return loss, {k: float(v) for k, v in metrics.items()}

    def base_loss(self, batch: dict, progress: Progress, perturb: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor | bool]]:
        """The MindEye2 objective -> (loss, metric tensors, {"latent", "hidden": this pass's embeddings,
        "mixed": whether the betas were mixed up}); fine-tuning methods add their terms to it."""
        cfg = self.cfg
        betas, subject = batch["betas"], batch["subject"]
        target = batch["clip_tokens"].view(-1, *cfg.clip_tokens)
        mixup = progress.fraction < cfg.mixup_fraction
        if mixup:
            betas, perm, lam = mixco(betas, subject, cfg.mixup_beta, cfg.mixup_select)
        z, h, tokens = self.encode(betas, subject, perturb)
        brain = F.normalize(self.projector(tokens).flatten(1), dim=-1)
        image = F.normalize(target.flatten(1), dim=-1)
        if mixup:
            loss_clip = mixco_nce(brain, image, cfg.bimixco_temperature, perm, lam)
        else:
            phase = (progress.fraction - cfg.mixup_fraction) / max(1e-8, 1 - cfg.mixup_fraction)
            loss_clip = soft_clip_loss(brain, image, cosine_anneal(*cfg.softclip_temperature, phase))
        loss = cfg.clip_scale * loss_clip
        metrics = {"loss_clip": loss_clip.detach()}
        if self.prior is not None:
            loss_prior = self.prior.loss(tokens, target, cfg.prior_cond_drop, cfg.prior_image_drop)
            loss = loss + cfg.prior_scale * loss_prior
            metrics["loss_prior"] = loss_prior.detach()
        if self.lowlevel is not None:
            latents, aux = self.lowlevel(h)
            loss_blur = F.l1_loss(latents, batch["vae_tokens"].view_as(latents))
            width = aux.shape[-1]  # every position of every image is a row, as the reference's soft_cont_loss
            loss_aux = soft_cont_loss(F.normalize(aux.reshape(-1, width), dim=-1),
                                      F.normalize(batch["cnx_tokens"].reshape(-1, width), dim=-1),
                                      F.normalize(batch["cnx_aug_tokens"].reshape(-1, width), dim=-1),
                                      cfg.aux_temperature)
            loss = loss + cfg.blur_scale * (loss_blur + cfg.aux_scale * loss_aux)
            metrics["loss_blur"] = loss_blur.detach()
            metrics["loss_aux"] = loss_aux.detach()
        return loss, metrics, {"latent": z, "hidden": h, "mixed": mixup}


# -- losses --------------------------------------------------------------------------------


def mixco(betas: torch.Tensor, subject: torch.Tensor, beta: float, select: float):
    """Mixup in voxel space within each subject (MindEye's mixco): -> (mixed betas, partner index, weight)."""
    b = betas.shape[0]
    perm = torch.arange(b, device=betas.device)
    for s in subject.unique():
        idx = (subject == s).nonzero(as_tuple=True)[0]
        perm[idx] = idx[torch.randperm(len(idx), device=betas.device)]
    lam = torch.distributions.Beta(beta, beta).sample((b,)).to(betas)
    lam = torch.where(torch.rand(b, device=betas.device) <= select, lam, torch.ones_like(lam))
    mixed = betas * lam[:, None] + betas[perm] * (1 - lam[:, None])
    return mixed, perm, lam


def mixco_nce(brain: torch.Tensor, image: torch.Tensor, temperature: float, perm: torch.Tensor,
              lam: torch.Tensor) -> torch.Tensor:
    """BiMixCo: bidirectional InfoNCE with soft targets lam on the own image and 1 - lam on the partner. As the
    reference (``utils.mixco_nce``) the partner's weight is written over the diagonal, so a sample mixed with
    itself (``perm[i] == i``) has target 1 - lam on its own image, not 1."""
    logits = brain @ image.T / temperature
    b = brain.shape[0]
    probs = torch.diag(lam.to(logits.dtype))
    probs[torch.arange(b), perm] = (1 - lam).to(logits.dtype)
    loss_b2i = -(logits.log_softmax(-1) * probs).sum(-1).mean()
    loss_i2b = -(logits.T.log_softmax(-1) * probs.T).sum(-1).mean()
    return (loss_b2i + loss_i2b) / 2


def soft_clip_loss(brain: torch.Tensor, image: torch.Tensor, temperature: float) -> torch.Tensor:
    """SoftCLIP: cross-entropy against the image-image similarity distribution, both directions."""
    targets = (image @ image.T / temperature).softmax(-1)
    logits = brain @ image.T / temperature
    loss1 = -(logits.log_softmax(-1) * targets).sum(-1).mean()
    loss2 = -(logits.T.log_softmax(-1) * targets).sum(-1).mean()
    return (loss1 + loss2) / 2


def cosine_anneal(start: float, end: float, fraction: float) -> float:
    fraction = min(1.0, max(0.0, fraction))
    return start + (end - start) * (1 - math.cos(math.pi * fraction)) / 2


# -- spec ----------------------------------------------------------------------------------


def build_model(cfg: MindEye2Config, info: DatasetInfo) -> MindEye2:
    return MindEye2(cfg, info)


def param_groups(model: MindEye2, cfg: MindEye2Config, weight_decay: float) -> list[dict]:
    """Ridge maps get the ridge penalty; biases and norms no decay; everything else ``weight_decay``."""
    ridge = [p for p in model.ridge.parameters() if p.requires_grad]
    ridge_ids = {id(p) for p in ridge}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in ridge_ids:
            continue
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith("_pos") else decay).append(p)
    groups = [{"params": ridge, "weight_decay": cfg.ridge_weight_decay},
              {"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def loss(model, batch: dict, progress: Progress):
    return model(batch, progress=progress)


def predict(model, batch: dict) -> dict[str, torch.Tensor]:
    return model(batch, predict=True)


@torch.no_grad()
def image_embeddings(model: MindEye2, batch: dict, seeds, steps: int | None = None,
                     guidance: float | None = None) -> dict[str, torch.Tensor]:
    """What an unCLIP-style generator turns into images (MindEye2 Sec. 2.5): the diffusion prior's CLIP image
    tokens (DDIM from one seeded noise per row, so rows do not depend on batching) and the low-level branch's VAE
    latents (the blurry image)."""
    from raydecode.nn.diffusion import initial_noise

    if model.prior is None:
        raise ConfigError("image reconstructions need the diffusion prior: this model was trained with prior: false")
    reps = batch.get("betas_repeats")
    betas = [reps[:, r] for r in range(reps.shape[1])] if reps is not None else [batch["betas"]]
    encoded = [model.encode(b, batch["subject"]) for b in betas]  # averaged over repetitions, as the reference
    tokens = torch.stack([e[2] for e in encoded]).mean(0)
    noise = initial_noise(seeds, tuple(tokens.shape[1:]))
    guidance = model.cfg.prior_guidance if guidance is None else guidance
    out = {"clip_tokens": model.prior.sample(tokens, steps or 20, guidance, noise=noise)}
    if model.lowlevel is not None:
        out["lowlevel_latents"] = torch.stack([model.lowlevel(e[1])[0] for e in encoded]).mean(0)
    return out


def targets(cfg: MindEye2Config) -> dict[str, str]:
    out = {"clip": cfg.clip_encoder}
    if cfg.lowlevel:
        out["vae"] = cfg.vae_encoder
        out["cnx"] = cfg.aux_encoder
    return out


def load_pretrained(model: MindEye2, state: dict[str, torch.Tensor]) -> list[str]:
    """Fine-tune start: every pretrained weight except other subjects' ridge maps; new subjects' ridge
    maps stay freshly initialised. Returns the keys left at initialisation."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable)
