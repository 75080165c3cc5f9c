"""MindEye2 (Scotti et al. 2024): multi-subject pretraining and the 1-hour fine-tune. The model, its losses and
presets are :mod:`raydecode.nn.mindeye2` (Duala adapts the same model)."""

from __future__ import annotations

from raydecode.methods.spec import Adapts, EmbedsImages, EmbedsTargets, MethodSpec, register
from raydecode.nn.mindeye2 import (
                                   PRESETS,
                                   MindEye2Config,
                                   build_model,
                                   image_embeddings,
                                   load_pretrained,
                                   loss,
                                   param_groups,
                                   predict,
                                   targets,
)

SPEC = register(MethodSpec(
    name="mindeye2",
    config_model=MindEye2Config,
    presets=PRESETS,
    build_model=build_model,
    param_groups=param_groups,
    loss=loss,
    predict=predict,
    columns=("betas", "subject", "image_id", "betas_repeats"),
    capabilities=(
        EmbedsTargets(targets),
        Adapts(load_pretrained),
        EmbedsImages(image_embeddings),
    ),
))
