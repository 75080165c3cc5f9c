"""Duala (Li et al. 2025, "Dual-Level Alignment of Subjects and Stimuli for Cross-Subject fMRI Decoding").

Adapts a pretrained MindEye2 to a new subject from about one session of data:

- the pretrained weights stay frozen; LoRA adapters (peft, rank 8) on the backbone's linear layers, the
  linear map to CLIP tokens and the retrieval projector, and the new subject's ridge map, are trained;
- the base loss is MindEye2's, with SoftCLIP taking over from BiMixCo for the last third of training;
- **stimulus-level semantic preservation** (SSP): a cosine triplet loss on the shared latent after the ridge
  map (:func:`semantic_alignment`: positive = same class, negative = the hardest other class, drawn from the
  batch and a memory bank of recent embeddings), and the MSE between the new subject's class-similarity
  matrix after the backbone and the source subjects' reference matrix (:func:`relational_consistency`);
- **subject-level distribution perturbation** (SDP): each embedding is split into its class mean (the
  stimulus factor) and the rest (the subject factor); the subject factor gets Gaussian noise scaled element-wise
  by the source subjects' deviations from the class means (:meth:`Duala.perturb`, probability ``perturb_p``,
  scale ``perturb_scale``).

Total = base + lambda_sa * SA + lambda_rc * RC. The source statistics (class prototypes, similarity matrices,
deviations) come from :mod:`raydecode.data.stats`, computed once per pretrained checkpoint. ``ssp: false,
sdp: false`` is plain LoRA fine-tuning (the ablation baseline). Class labels: each image's primary COCO
category (:func:`raydecode.data.schema.primary_category`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raydecode.methods.spec import (
    Adapts,
    DatasetInfo,
    EmbedsImages,
    EmbedsTargets,
    MethodSpec,
    NeedsStatistics,
    Progress,
    register,
)
from raydecode.nn import mindeye2 as me2

LORA_PARENTS = ("backbone", "to_tokens", "projector")


class DualaConfig(me2.MindEye2Config):
    lora_rank: int = Field(8, description="LoRA rank on the backbone, token map and projector linears")
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    ssp: bool = Field(True, description="stimulus-level semantic preservation (SA + RC losses)")
    sdp: bool = Field(True, description="subject-level distribution perturbation")
    margin: float = Field(0.2, description="cosine triplet margin of the semantic alignment loss")
    lambda_sa: float = 1.0
    lambda_rc: float = 0.1
    perturb_p: float = Field(0.5, description="probability that a sample is perturbed")
    perturb_scale: float = Field(1.0, description="noise scale, in units of the source deviations")
    memory_bank: int = Field(256, description="recent embeddings kept for positives/negatives and prototypes")
    min_class_samples: int = Field(3, description="a class enters a similarity matrix with at least this many samples")
    # "BiMixCo is replaced with SoftCLIP for one third of the training iterations" (Duala, Sec. 4.2)
    mixup_fraction: float = 2 / 3


PRESETS: dict[str, dict] = {name: dict(values) for name, values in me2.PRESETS.items()}


# -- losses --------------------------------------------------------------------------------


def primary_class(categories: torch.Tensor) -> torch.Tensor:
    """Multi-hot (B, C) -> the first category present, -1 where none (as ``data.schema.primary_category``)."""
    hot = categories > 0
    return torch.where(hot.any(-1), hot.int().argmax(-1), torch.full_like(hot[:, 0], -1, dtype=torch.long)).long()


def semantic_alignment(anchor: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor | None = None,
                       bank_labels: torch.Tensor | None = None, margin: float = 0.2) -> torch.Tensor:
    """Cosine triplet loss ``max(0, cos(a, n) - cos(a, p) + margin)``, averaged over every (anchor, positive)
    pair with positives of the anchor's class and the hardest negative of another class; candidates are the
    batch (the anchor itself excluded) and ``bank`` (detached). Samples labelled -1 take no part."""
    a = F.normalize(anchor, dim=-1)
    cand, cand_labels = a, labels
    if bank is not None and len(bank):
        cand = torch.cat([a, F.normalize(bank.to(a), dim=-1)])
        cand_labels = torch.cat([labels, bank_labels])
    sim = a @ cand.T
    b = a.shape[0]
    not_self = torch.ones_like(sim, dtype=torch.bool)
    not_self[torch.arange(b), torch.arange(b)] = False
    known = (labels[:, None] >= 0) & (cand_labels[None] >= 0)
    pos = known & (labels[:, None] == cand_labels[None]) & not_self
    neg = known & (labels[:, None] != cand_labels[None])
    hardest = sim.masked_fill(~neg, float("-inf")).max(1).values
    use = pos & neg.any(1, keepdim=True)
    if not use.any():
        return anchor.sum() * 0
    return (hardest[:, None] - sim + margin).clamp(min=0)[use].mean()


def class_similarity(emb: torch.Tensor, labels: torch.Tensor, n_classes: int, min_samples: int):
    """-> (C x C cosine similarity between class prototypes (mean normalised embedding), classes with at least
    ``min_samples`` samples (bool C))."""
    keep = labels >= 0
    onehot = F.one_hot(labels[keep], n_classes).to(emb.dtype)
    counts = onehot.sum(0)
    protos = onehot.T @ F.normalize(emb[keep], dim=-1) / counts.clamp(min=1)[:, None]
    unit = F.normalize(protos, dim=-1)
    return unit @ unit.T, counts >= min_samples


def relational_consistency(emb: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
                           min_samples: int = 3) -> torch.Tensor:
    """MSE between the class-similarity matrix of ``emb`` and ``reference`` over the off-diagonal class pairs
    present on both sides (classes with ``min_samples`` here; reference entries that are not NaN)."""
    sim, ok = class_similarity(emb, labels, reference.shape[0], min_samples)
    pair = ok[:, None] & ok[None] & ~torch.isnan(reference)
    pair &= ~torch.eye(len(ok), dtype=torch.bool, device=pair.device)
    if not pair.any():
        return emb.sum() * 0
    return ((sim - reference.nan_to_num().to(sim))[pair] ** 2).mean()


# -- model ---------------------------------------------------------------------------------


class Duala(me2.MindEye2):
    """MindEye2 with LoRA adapters, frozen pretrained weights and the SSP/SDP terms in its loss."""

    def __init__(self, cfg: DualaConfig, info: DatasetInfo):
        super().__init__(cfg, info)
        from peft import LoraConfig, inject_adapter_in_model

        targets = [name for name, m in self.named_modules()
                   if isinstance(m, nn.Linear) and name.split(".")[0] in LORA_PARENTS]
        inject_adapter_in_model(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                           target_modules=targets), self)
        for name, p in self.named_parameters():  # peft left only the adapters trainable; the new ridge map too
            p.requires_grad_("lora_" in name or name.startswith("ridge."))
        c, d = info.n_classes, cfg.hidden
        # source statistics (attach_statistics): reference class similarity after the backbone, and the source
        # subjects' RMS deviation from the class means in the shared latent
        self.register_buffer("reference", torch.full((c, c), float("nan")))
        self.register_buffer("deviation_scale", torch.zeros(c, d))
        # memory bank of recent (detached) embeddings; not checkpointed, refilled within a few steps
        self.register_buffer("bank_latent", torch.zeros(0, d), persistent=False)
        self.register_buffer("bank_hidden", torch.zeros(0, d), persistent=False)
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.long), persistent=False)

    def perturb(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """SDP: z = m_c + r (class mean + subject factor); r gets noise ``scale * eps * deviation_scale[c] * |z|``
        with probability ``perturb_p``, so z~ = m_c + r + noise: class means are kept in expectation."""
        cfg = self.cfg
        scale = self.deviation_scale[labels.clamp(min=0)].to(z)
        apply = (labels >= 0) & (torch.rand(len(z), device=z.device) < cfg.perturb_p)
        noise = cfg.perturb_scale * torch.randn_like(z) * scale * z.detach().norm(dim=-1, keepdim=True)
        return z + noise * apply[:, None].to(z)

    def _loss(self, batch: dict, progress: Progress) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        labels = primary_class(batch["categories"])
        clean: dict[str, torch.Tensor] = {}

        def perturb(z: torch.Tensor) -> torch.Tensor:
            clean["latent"] = z
            return self.perturb(z, labels) if cfg.sdp else z

        loss, metrics, emb = self.base_loss(batch, progress, perturb if self.training else None)
        if cfg.ssp:
            if emb["mixed"]:  # BiMixCo mixed the betas: the class losses need the unmixed embeddings
                clean["latent"] = self.ridge(batch["betas"], batch["subject"])
                emb["hidden"] = self.backbone(clean["latent"])
            z = clean.get("latent", emb["latent"])
            h = emb["hidden"]
            loss_sa = semantic_alignment(z, labels, self.bank_latent, self.bank_labels, cfg.margin)
            both = torch.cat([h, self.bank_hidden.to(h)]), torch.cat([labels, self.bank_labels])
            loss_rc = relational_consistency(*both, self.reference, cfg.min_class_samples)
            loss = loss + cfg.lambda_sa * loss_sa + cfg.lambda_rc * loss_rc
            metrics["loss_sa"] = loss_sa.detach()
            metrics["loss_rc"] = loss_rc.detach()
            if self.training:
                self._remember(z.detach(), h.detach(), labels)
        metrics["loss"] = loss.detach()
        return loss, {k: float(v) for k, v in metrics.items()}

    def _remember(self, z: torch.Tensor, h: torch.Tensor, labels: torch.Tensor) -> None:
        keep = labels >= 0
        n = self.cfg.memory_bank
        self.bank_latent = torch.cat([z[keep], self.bank_latent])[:n]
        self.bank_hidden = torch.cat([h[keep], self.bank_hidden])[:n]
        self.bank_labels = torch.cat([labels[keep], self.bank_labels])[:n]


# -- spec ----------------------------------------------------------------------------------


def build_model(cfg: DualaConfig, info: DatasetInfo) -> Duala:
    return Duala(cfg, info)


def load_pretrained(model: Duala, state: dict[str, torch.Tensor]) -> list[str]:
    """Start from a MindEye2 (or Duala) checkpoint: LoRA-wrapped linears take the pretrained weight as their
    ``base_layer``; other subjects' ridge maps are skipped. Returns the keys left at initialisation."""
    own = model.state_dict()
    usable = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        for cand in (key, f"{head}.base_layer.{leaf}"):
            if cand in own and own[cand].shape == value.shape:
                usable[cand] = value
                break
    model.load_state_dict(usable, strict=False)
    return sorted(k for k in own if k not in usable)


def statistics(cfg: DualaConfig) -> list[str]:
    """Embedding spaces of the pretrained model whose source statistics the losses need."""
    return ["latent", "hidden"] if (cfg.ssp or cfg.sdp) else []


def attach_statistics(model: Duala, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        model.reference.copy_(tensors["hidden.reference"])
        model.deviation_scale.copy_(tensors["latent.deviation_scale"])


SPEC = register(MethodSpec(
    name="duala",
    config_model=DualaConfig,
    presets=PRESETS,
    build_model=build_model,
    param_groups=me2.param_groups,
    loss=me2.loss,
    predict=me2.predict,
    columns=("betas", "subject", "image_id", "categories", "betas_repeats"),
    capabilities=(
        EmbedsTargets(me2.targets),
        Adapts(load_pretrained, from_methods=("mindeye2", "duala")),
        NeedsStatistics(statistics, attach_statistics),
        EmbedsImages(me2.image_embeddings),
    ),
))
