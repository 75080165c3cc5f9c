"""MindLink (subject-agnostic cross-subject decoding): one model for every subject, no per-subject parameters.

Each trial's betas go back on the subject's 3D grid (``DatasetInfo.coords``, from the store's voxel tables), into
one patch frame shared by all subjects (:class:`~raydecode.nn.volume.VolumeLayout`: each subject's ROI bounding box
stretched onto one box, fixed at launch from the store or the pretrained model; cubic patches, those holding an
ROI voxel of any subject), each patch a token with a fixed 3D positional encoding. A transformer encoder E_b reads
the tokens; the losses (Eq. 1-6):

- masked voxel modelling, L_rec: a random share of the patches is zeroed (B ⊙ M), a light decoder D reconstructs
  the masked patches' voxels from E_b's tokens (mean squared error over the masked patches' real voxels);
- subject-adversarial, L_subj: a subject classifier on the pooled embedding (cross-entropy of the subject label)
  and the encoder learning to hide the subject from it (:class:`~raydecode.nn.volume.SubjectAdversary`): behind a
  gradient reversal layer (the paper) or, by default, by blinding it (its output pushed to uniform);
- alignment: a Perceiver resampler P maps E_b's tokens (of the unmasked volume) to N_I image tokens; L_align is
  their mean squared error to the frozen image tokens (IP-Adapter Plus's projection at paper scale), L_local the
  token-level bidirectional InfoNCE (:func:`~raydecode.nn.volume.local_infonce`, tau 0.1).

L = λ1 L_rec + λ2 L_subj + λ3 L_align + λ4 L_local with λ = (1, 1, 1, 1e-2); the first ``warmup_fraction`` of
training (paper: 50 of 150 epochs) weights everything but L_rec by 0 (every term is still computed, so every rank
runs the same graph under ZeRO). The subject classifier has ``subject_classes`` outputs (NSD: 8), fixed whatever
subjects a run trains on: the parameter count does not depend on the subjects or their voxel counts.

Deviations (documented in README): the paper's light decoder and pooling are not specified; D is a 2-layer
transformer over the encoder's tokens and the pooled embedding is the mean token. The adversary defaults to domain
confusion with a classifier on batch-standardised embeddings learning 10x faster: with the paper's reversal the
encoder fools its classifier (which ends confidently wrong) while a fresh linear probe still reads the subject.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raydecode.errors import ConfigError
from raydecode.methods.spec import (
    Adapts,
    DatasetInfo,
    EmbedsImages,
    EmbedsTargets,
    MethodSpec,
    Progress,
    ReadsVolume,
    register,
)
from raydecode.nn.volume import (
    PerceiverResampler,
    SubjectAdversary,
    VolumeLayout,
    block_coords,
    box_of,
    local_infonce,
    positional_encoding_3d,
)


class MindLinkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patch_size: int = Field(10, ge=1, description="edge of the cubic patches, in voxels (paper: 10)")
    frame: Literal["box", "corner"] = Field(
        "box", description="how subjects share one frame: 'box' stretches each subject's ROI bounding box onto "
                           "`box` voxels per axis, 'corner' only aligns the boxes' corners (the paper does not say)")
    box: tuple[int, int, int] | None = Field(
        None, description="the box frame's size in voxels; unset: the pretrained checkpoint's, else the largest ROI "
                          "bounding box of the store's subjects (resolved at launch, kept in the checkpoint)")
    dim: int = Field(768, ge=6, description="encoder width (a multiple of 6: the 3D positional encoding)")
    depth: int = Field(16, ge=1, description="encoder layers (paper: 16)")
    heads: int = Field(12, ge=1)
    decoder_dim: int = Field(384, ge=1, description="the light masked-voxel decoder's width")
    decoder_depth: int = Field(2, ge=1)
    mask_ratio: float = Field(0.5, gt=0, lt=1, description="share of patches masked for L_rec")
    dropout: float = 0.1
    proj_depth: int = Field(4, ge=1, description="Perceiver resampler layers (paper: 4)")
    proj_dim: int = Field(768, ge=1)
    image_encoder: str = Field("ipadapter-plus-sd15", description="frozen image-token target (IP-Adapter Plus's "
                                                                   "16 x 768 image tokens for SD 1.5)")
    image_tokens: tuple[int, int] = Field((16, 768), description="(N_I, width) of the image-token target")
    subject_classes: int = Field(8, ge=2, description="outputs of the subject classifier (NSD: 8 subjects)")
    adversary: Literal["confusion", "reversal"] = Field(
        "confusion", description="the encoder's side of L_subj: 'reversal' (the paper's gradient reversal) or "
                                 "'confusion' (blind the classifier: its output made uniform); README, MindLink")
    adversary_scale: float = Field(1.0, ge=0, description="scale of the encoder's side (the reversal's scale; "
                                                          "the confusion term's weight)")
    subject_head_layers: int = Field(2, ge=1, description="layers of the subject classifier (1: linear)")
    subject_head_lr: float = Field(10.0, gt=0, description="the subject classifier's learning rate, in multiples "
                                                           "of optim.lr (an adversary that keeps up)")
    lambdas: tuple[float, float, float, float] = Field((1.0, 1.0, 1.0, 1e-2),
                                                       description="weights of L_rec, L_subj, L_align, L_local")
    temperature: float = Field(0.1, gt=0, description="L_local's tau")
    warmup_fraction: float = Field(1 / 3, ge=0, lt=1, description="share of training with L_rec only (paper: "
                                                                  "50 of 150 epochs)")


# tiny / demo: random-weight image tokens carry little beyond their mean, so L_align (MSE) alone barely separates
# images; the token-level contrastive term is weighted 1 there (paper: 1e-2), as MindEye2's presets warm their
# temperatures (10 epochs on the tiny store: brain->image top-1 0.18 with 1, 0.09 with 1e-2; chance 0.033)
PRESETS: dict[str, dict] = {
    "paper": {},
    # demo: the tiny network reading the demo's 64-wide tokens; at width 96 / depth 4 the demo job stayed at chance
    # in its few hundred steps (8 epochs on 3 demo subjects: top-1 0.01 of 100; depth 2: 0.03; this size: 0.07)
    "demo": dict(patch_size=4, dim=48, depth=2, heads=4, decoder_dim=24, decoder_depth=1, proj_depth=1, proj_dim=48,
                 image_encoder="ipadapter-demo", image_tokens=(16, 64), dropout=0.0, lambdas=(1.0, 1.0, 1.0, 1.0)),
    "tiny": dict(patch_size=4, dim=48, depth=2, heads=4, decoder_dim=24, decoder_depth=1, proj_depth=1, proj_dim=48,
                 image_encoder="ipadapter-tiny", image_tokens=(16, 32), dropout=0.0, lambdas=(1.0, 1.0, 1.0, 1.0)),
}


def _encoder(dim: int, depth: int, heads: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)


class MindLink(nn.Module):
    def __init__(self, cfg: MindLinkConfig, info: DatasetInfo):
        super().__init__()
        too_many = [s for s in info.subjects if not 1 <= s <= cfg.subject_classes]
        if too_many:
            raise ConfigError(f"model.subject_classes {cfg.subject_classes}: subjects {too_many} have no class "
                              "(subject labels are 1..subject_classes)")
        self.cfg = cfg
        coords = info.coords or {s: block_coords(n) for s, n in info.voxels.items()}
        with torch.device("cpu"):  # index tables are data, built for real even when sizing on the meta device
            own = {s: coords[s] for s in info.subjects}
            box = (cfg.box or box_of(own)) if cfg.frame == "box" else None  # unresolved (no launch): these subjects'
            self.layout = VolumeLayout(own, cfg.patch_size, box)
            pos = positional_encoding_3d(self.layout.patch_centers().float(), cfg.dim)
            present = torch.tensor(sorted(info.subjects)) - 1  # the classes of the subjects trained on
        self.register_buffer("pos", pos, persistent=False)
        self.register_buffer("present", present, persistent=False)
        cube = cfg.patch_size ** 3
        self.embed = nn.Linear(cube, cfg.dim)
        self.encoder = _encoder(cfg.dim, cfg.depth, cfg.heads, cfg.dropout)
        self.decoder = nn.Sequential(nn.Linear(cfg.dim, cfg.decoder_dim),
                                     _encoder(cfg.decoder_dim, cfg.decoder_depth, max(1, cfg.heads // 2), 0.0),
                                     nn.Linear(cfg.decoder_dim, cube))
        nn.init.zeros_(self.decoder[-1].weight)  # reconstructions start at the betas' mean (0: z-scored), so
        nn.init.zeros_(self.decoder[-1].bias)    # L_rec starts at the masked voxels' variance and falls from there
        self.adversary = SubjectAdversary(cfg.dim, cfg.subject_classes, cfg.subject_head_layers, cfg.adversary,
                                          cfg.adversary_scale)
        n, width = cfg.image_tokens
        self.projector = PerceiverResampler(cfg.dim, cfg.proj_dim, cfg.proj_depth, n, max(1, cfg.proj_dim // 64),
                                            dim_head=min(64, cfg.proj_dim), dim_out=width)

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, p^3) patches -> (B, P, dim) tokens."""
        return self.encoder(self.embed(patches) + self.pos.to(patches.dtype))

    def forward(self, batch: dict, progress: Progress | None = None, predict: bool = False):
        patches = self.layout.to_patches(batch["betas"], batch["subject"])
        if predict:
            tokens = self.encode(patches)
            out = {"brain": self.projector(tokens).flatten(1), "embedding": tokens.mean(1)}
            if "clip_tokens" in batch:  # evaluation: the targets ride along; serving: betas only
                out["image"] = batch["clip_tokens"].flatten(1).float()
            return out
        return self._loss(batch, patches, progress)

    def _loss(self, batch: dict, patches: torch.Tensor, progress: Progress | None):
        cfg = self.cfg
        b, p, _ = patches.shape
        masked = torch.rand(b, p, device=patches.device) < cfg.mask_ratio
        recon = self.decoder(self.encode(patches * (~masked)[..., None].to(patches.dtype)))
        real = self.layout.voxel_mask(batch["subject"]) & masked[..., None]  # masked patches' real voxels
        l_rec = ((recon.float() - patches.float()) ** 2 * real).sum() / real.sum().clamp(min=1)

        tokens = self.encode(patches)
        l_subj, subject_ce = self.adversary(tokens.mean(1), batch["subject"] - 1, self.present)
        pred = self.projector(tokens).float()
        target = batch["clip_tokens"].view(b, *cfg.image_tokens).float()
        l_align = F.mse_loss(pred, target)
        l_local = local_infonce(pred, target, cfg.temperature)
        warm = progress is not None and progress.fraction < cfg.warmup_fraction
        w = (cfg.lambdas[0], 0.0, 0.0, 0.0) if warm else cfg.lambdas
        loss = w[0] * l_rec + w[1] * l_subj + w[2] * l_align + w[3] * l_local
        return loss, {"loss": float(loss.detach()), "rec": float(l_rec.detach()), "subj": float(subject_ce.detach()),
                      "align": float(l_align.detach()), "local": float(l_local.detach()), "warmup": float(warm)}


def resolve_frame(cfg: MindLinkConfig, store_coords: dict, pretrained: dict | None) -> MindLinkConfig:
    """The box frame's size, fixed at launch so that every run from one store (or one pretrained model) places
    subjects alike: the pretrained model's box when adapting one, else the largest ROI bounding box over all the
    store's subjects (a subject joining later fits without shrinking)."""
    if cfg.frame != "box" or cfg.box is not None:
        return cfg
    box = (pretrained or {}).get("box") if (pretrained or {}).get("frame") == "box" else None
    return cfg.model_copy(update={"box": tuple(box) if box else box_of(store_coords)})


def build_model(cfg: MindLinkConfig, info: DatasetInfo) -> MindLink:
    return MindLink(cfg, info)


def param_groups(model: MindLink, cfg: MindLinkConfig, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; the subject classifier at ``subject_head_lr`` times the learning rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("adversary."), p.ndim >= 2 and "norm" not in name), []).append(p)
    return [{"params": groups[head, decay], "weight_decay": weight_decay if decay else 0.0,
             **({"lr_scale": cfg.subject_head_lr} if head else {})}
            for head, decay in sorted(groups)]  # the encoder's groups first: the logged lr is theirs


def loss(model, batch: dict, progress: Progress):
    return model(batch, progress=progress)


def predict(model, batch: dict) -> dict[str, torch.Tensor]:
    return model(batch, predict=True)


def image_embeddings(model: MindLink, batch: dict, seeds, steps: int | None = None,
                     guidance: float | None = None) -> dict[str, torch.Tensor]:
    """What the image generator decodes (SD 1.5 + IP-Adapter Plus, :mod:`raydecode.evaluate.ipadapter`): the
    projector's N_I image tokens (deterministic: the seeds are the generator's)."""
    brain = predict(model, {"betas": batch["betas"], "subject": batch["subject"]})["brain"]
    return {"clip_tokens": brain.view(len(brain), *model.cfg.image_tokens).float()}


def load_pretrained(model: MindLink, state: dict[str, torch.Tensor]) -> list[str]:
    """New subjects: every weight (none is per subject); the volume layout is rebuilt from the new run's voxel
    coordinates. Returns the keys left at initialisation (none when the sizes match)."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable)


SPEC = register(MethodSpec(
    name="mindlink",
    config_model=MindLinkConfig,
    presets=PRESETS,
    build_model=build_model,
    param_groups=param_groups,
    loss=loss,
    predict=predict,
    columns=("betas", "subject", "image_id"),
    capabilities=(
        EmbedsTargets(lambda cfg: {"clip": cfg.image_encoder}),
        EmbedsImages(image_embeddings),
        Adapts(load_pretrained),
        ReadsVolume(resolve_frame),
    ),
))
