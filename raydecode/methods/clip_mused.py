"""CLIP-MUSED (CLIP-guided multi-subject semantic decoding): 80-way multi-label classification of the seen image's
COCO categories from ROI tokens, one transformer for every subject.

Input: each visual ROI group of a subject (the store's voxel ``roi`` labels), one token per group: with ``tokens:
pca`` (the paper) reduced to ``pca_dim`` by a PCA fitted on that subject's train trials only
(:class:`~raydecode.methods.spec.FitsRoiPCA`, :mod:`raydecode.data.pca`; kept in the checkpoint); with ``tokens:
template`` its voxels averaged into the cells of a ``template_grid``^3 grid over the subject's ROI bounding box
(:class:`~raydecode.nn.semantic.RoiTemplate`: entries that mean the same place in every subject; README,
CLIP-MUSED). A shared linear embedding and a learned position per group. Two learnable
tokens per subject are prepended (a low-level and a high-level token: with the PCA, the only per-subject state);
a pre-LayerNorm transformer reads them all and their outputs are z_llv and z_hlv. Losses (Eq. 10-16):

- L_c: binary cross-entropy of an MLP on [z_llv, z_hlv] against the 80 categories;
- L_llv, L_hlv: RSA, ||M_clip - M_brain||_F^2 / B^2 between the batch's cosine similarity matrices of the brain
  token and of the CLIP feature (low-level: CLIP's first image block; high-level: the mean of the clipped,
  normalised image and caption embeddings; encoder kind ``clip-levels``, computed by ``raydecode embed``);
- L_perp = ||z_llv z_hlv^T||_F^2 / B^2;

L = L_c + λ⊥ L_perp + λ_llv L_llv + λ_hlv L_hlv (NSD: 0.001, 0.0001, 0.001). The paper's baselines are
configurations of this method: SS-ViT is this model trained on one subject (``data.subjects: [s]``),
MS-SMODEL-ViT is ``subject_tokens: false`` (one low/high pair shared by every subject).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from raydecode.data.pca import group_indices
from raydecode.errors import ConfigError
from raydecode.methods.spec import DatasetInfo, EmbedsTargets, FitsRoiPCA, MethodSpec, ReadsVolume, register
from raydecode.nn.semantic import RoiPCA, RoiTemplate, orthogonality, rsa_loss
from raydecode.nn.volume import block_coords

# NSD's visual ROIs (paper: V1-V3, V3ab, hV4, VO, IPS, LO, MT, PHC) as labels of NSD's Kastner2015 atlas, the
# labels `raydecode ingest` writes for the nsd source (TO1/TO2: MT/MST)
NSD_ROI_GROUPS = [["V1v", "V1d"], ["V2v", "V2d"], ["V3v", "V3d"], ["V3A", "V3B"], ["hV4"], ["VO1", "VO2"],
                  ["IPS0", "IPS1", "IPS2", "IPS3", "IPS4", "IPS5"], ["LO1", "LO2"], ["TO1", "TO2"], ["PHC1", "PHC2"]]
# the synthetic store's labels (raydecode.data.synthetic)
SYNTHETIC_ROI_GROUPS = [["V1"], ["V2"], ["V3"], ["hV4"], ["ventral"], ["lateral"], ["parietal"]]


class ClipMusedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roi_groups: list[list[str]] = Field(default_factory=lambda: [list(g) for g in NSD_ROI_GROUPS], min_length=1,
                                        description="one token per group of the store's voxel ROI labels")
    tokens: Literal["pca", "template"] = Field(
        "pca", description="ROI tokens: 'pca' (the paper: a PCA per subject and ROI) or 'template' (the ROI's "
                           "voxels averaged on a grid over each subject's ROI bounding box, aligned across subjects)")
    pca_dim: int = Field(268, ge=1, description="components per ROI token (paper: 268, the smallest NSD ROI)")
    template_grid: int = Field(6, ge=1, description="tokens 'template': cells per axis (token width grid^3)")
    width: int = Field(512, ge=8)
    depth: int = Field(24, ge=1)
    heads: int = Field(8, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    subject_tokens: bool = Field(True, description="a low/high token pair per subject (false: one shared pair, "
                                                   "the paper's MS-SMODEL-ViT baseline)")
    classifier_hidden: int = Field(512, ge=1)
    image_encoder: str = Field("clip-levels-vitb32", description="the frozen CLIP feature target (encoder kind "
                                                                 "clip-levels: first image block + image/caption)")
    lambda_orth: float = Field(1e-3, ge=0, description="λ⊥ (NSD: 0.001)")
    lambda_llv: float = Field(1e-4, ge=0, description="λ_llv (NSD: 0.0001)")
    lambda_hlv: float = Field(1e-3, ge=0, description="λ_hlv (NSD: 0.001)")


_SMALL = dict(roi_groups=[list(g) for g in SYNTHETIC_ROI_GROUPS], width=48, depth=2, heads=4, dropout=0.0,
              classifier_hidden=48, lambda_orth=1e-3, lambda_llv=1.0, lambda_hlv=1.0)
PRESETS: dict[str, dict] = {
    "paper": {},
    "demo": dict(_SMALL, tokens="template", template_grid=6, pca_dim=32, image_encoder="clip-levels-demo"),
    "tiny": dict(_SMALL, tokens="template", template_grid=4, pca_dim=12, image_encoder="clip-levels-tiny"),
}


class ClipMused(nn.Module):
    def __init__(self, cfg: ClipMusedConfig, info: DatasetInfo):
        super().__init__()
        self.cfg = cfg
        with torch.device("cpu"):  # index tables are data, built for real even when sizing on the meta device
            rois = info.rois or {s: [g[0] for g in cfg.roi_groups for _ in range(max(1, n // len(cfg.roi_groups)))]
                                 for s, n in info.voxels.items()}  # model-info without a store: even groups
            index = {s: group_indices(rois[s], cfg.roi_groups, s) for s in info.subjects}
            if cfg.tokens == "pca":  # buffers only: real on CPU, whatever the device of the rest
                self.pca = RoiPCA(index, cfg.pca_dim)
            else:
                coords = info.coords or {s: block_coords(n) for s, n in info.voxels.items()}
                self.template = RoiTemplate({s: coords[s] for s in info.subjects}, index, cfg.template_grid)
        n = len(cfg.roi_groups)
        self.embed = nn.Linear(cfg.pca_dim if cfg.tokens == "pca" else cfg.template_grid**3, cfg.width)
        self.position = nn.Parameter(torch.randn(n + 2, cfg.width) * 0.02)
        pairs = info.subjects if cfg.subject_tokens else [0]
        self.subject_tokens = nn.ParameterDict({str(s): nn.Parameter(torch.randn(2, cfg.width) * 0.02) for s in pairs})
        with torch.device("cpu"):  # subject number -> its pair's row (-1: none); data, as the index tables above
            row = torch.full((max(pairs) + 1,), -1, dtype=torch.long)
            row[torch.tensor(pairs)] = torch.arange(len(pairs))
        self.register_buffer("token_row", row, persistent=False)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, norm=nn.LayerNorm(cfg.width),
                                             enable_nested_tensor=False)
        self.classifier = nn.Sequential(nn.Linear(2 * cfg.width, cfg.classifier_hidden), nn.GELU(),
                                        nn.Dropout(cfg.dropout), nn.Linear(cfg.classifier_hidden, info.n_classes))

    def tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_llv, z_hlv), each (B, width)."""
        subject = batch["subject"]
        reduce = self.pca if self.cfg.tokens == "pca" else self.template
        roi = self.embed(reduce(batch["betas"], subject))
        if self.cfg.subject_tokens:
            unknown = sorted(set(subject.tolist()) - {int(s) for s in self.subject_tokens})
            if unknown:
                raise ConfigError(f"subjects {unknown}: this CLIP-MUSED model has tokens for subjects "
                                  f"{sorted(int(s) for s in self.subject_tokens)}")
            # every subject's pair enters the graph (gathered from one table), so each rank's gradients cover every
            # parameter even when its batch holds one subject (ZeRO's bucketed reduction needs the same set)
            table = torch.stack(list(self.subject_tokens.values()))  # insertion order: the rows of token_row
            pair = table[self.token_row[subject.to(self.token_row.device, torch.long)]]
        else:
            pair = self.subject_tokens["0"].expand(len(subject), -1, -1)
        out = self.encoder(torch.cat([pair.to(roi.dtype), roi], 1) + self.position.to(roi.dtype))
        return out[:, 0], out[:, 1]

    def forward(self, batch: dict, predict: bool = False):
        low, high = self.tokens(batch)
        logits = self.classifier(torch.cat([low, high], -1)).float()
        if predict:
            return {"logits": logits, "embedding": torch.cat([low, high], -1), "low": low, "high": high}
        cfg = self.cfg
        l_c = F.binary_cross_entropy_with_logits(logits, batch["categories"].float())
        l_llv = rsa_loss(low, batch["clip_tokens"])
        l_hlv = rsa_loss(high, batch["clip_pooled"])
        l_orth = orthogonality(low, high)
        loss = l_c + cfg.lambda_orth * l_orth + cfg.lambda_llv * l_llv + cfg.lambda_hlv * l_hlv
        cos = F.cosine_similarity(low.float(), high.float(), dim=-1).abs().mean()
        return loss, {"loss": float(loss.detach()), "bce": float(l_c.detach()), "rsa_llv": float(l_llv.detach()),
                      "rsa_hlv": float(l_hlv.detach()), "orth": float(l_orth.detach()), "cos": float(cos.detach())}


def build_model(cfg: ClipMusedConfig, info: DatasetInfo) -> ClipMused:
    return ClipMused(cfg, info)


def param_groups(model: ClipMused, cfg: ClipMusedConfig, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "norm" not in name and "subject_tokens" not in name else no_decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def loss(model, batch: dict, progress):
    return model(batch)


def predict(model, batch: dict) -> dict[str, torch.Tensor]:
    return model(batch, predict=True)


def attach_pca(model: ClipMused, tensors: dict[str, torch.Tensor]) -> None:
    model.pca.load(tensors)


SPEC = register(MethodSpec(
    name="clip_mused",
    config_model=ClipMusedConfig,
    presets=PRESETS,
    build_model=build_model,
    param_groups=param_groups,
    loss=loss,
    predict=predict,
    columns=("betas", "subject", "image_id", "categories"),
    capabilities=(
        EmbedsTargets(lambda cfg: {"clip": cfg.image_encoder}),
        FitsRoiPCA(groups=lambda cfg: cfg.roi_groups, width=lambda cfg: cfg.pca_dim, attach=attach_pca,
                   enabled=lambda cfg: cfg.tokens == "pca"),
        ReadsVolume(),  # tokens 'template' place voxels by their coordinates
    ),
))
