"""A method that lives outside raydecode: one file, nothing else edited. A linear map per subject (MindEye2's
ridge maps, a shared torch part) to a shared embedding, trained contrastively against a frozen image encoder's pooled output. Configs name it
``method: tests.toy_method:toy`` (Ray's workers import it from the checkout, which is on their path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from raydecode.methods.spec import DatasetInfo, EmbedsTargets, MethodSpec, Progress, register
from raydecode.nn.mindeye2 import RidgeMaps


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int = 32
    encoder: str = "openclip-tiny"
    temperature: float = 0.1


class Toy(nn.Module):
    def __init__(self, cfg: ToyConfig, info: DatasetInfo):
        super().__init__()
        self.ridge = RidgeMaps(info.voxels, cfg.width)  # every subject's map runs on every rank (ZeRO's collectives)

    def forward(self, betas: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
        return self.ridge(betas, subject)


def loss(model, batch: dict, progress: Progress):
    brain = F.normalize(model(batch["betas"], batch["subject"]), dim=-1)
    image = F.normalize(batch["clip_pooled"].float(), dim=-1)
    logits = brain @ image.T / 0.1
    labels = torch.arange(len(brain), device=brain.device)
    value = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return value, {"loss": float(value.detach())}


def predict(model, batch: dict) -> dict[str, torch.Tensor]:
    out = {"brain": model(batch["betas"], batch["subject"])}
    if "clip_pooled" in batch:  # evaluation: the targets ride along; serving: betas only
        out["image"] = batch["clip_pooled"].float()
    return out


SPEC = register(MethodSpec(
    name="toy",
    config_model=ToyConfig,
    presets={"tiny": {}},
    build_model=Toy,
    param_groups=lambda model, cfg, wd: [{"params": list(model.parameters()), "weight_decay": wd}],
    loss=loss,
    predict=predict,
    columns=("betas", "subject", "image_id"),
    capabilities=(EmbedsTargets(lambda cfg: {"clip": cfg.encoder}),),
))
