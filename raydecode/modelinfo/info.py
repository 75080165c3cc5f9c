"""``raydecode model-info``: parameter counts per module, built on the meta device (no memory)."""

from __future__ import annotations

import torch

from raydecode.data.synthetic import PRESETS
from raydecode.methods.spec import DatasetInfo, count_parameters, get_method
from raydecode.report import table


def dataset_info(preset: str, voxels: list[int] | None = None) -> DatasetInfo:
    """Subjects 1..len(voxels) with those voxel counts (default: the preset's; at paper scale NSD's nsdgeneral
    counts of subjects 1-8) and the preset's TR (time-series methods size their input from it)."""
    sizes = PRESETS["paper" if preset == "paper" else preset]
    voxels = list(voxels or sizes.voxels)
    return DatasetInfo(list(range(1, len(voxels) + 1)), {i + 1: v for i, v in enumerate(voxels)}, tr_s=sizes.tr_s)


def model_info(method: str, preset: str, voxels: list[int] | None = None, overrides: dict | None = None) -> dict:
    """Build ``method`` at ``preset`` on the meta device for subjects 1..len(voxels) and count parameters."""
    spec = get_method(method)
    cfg = spec.config(preset, overrides)
    info = dataset_info(preset, voxels)
    voxels = [info.voxels[s] for s in info.subjects]
    with torch.device("meta"):
        model = spec.build_model(cfg, info)
        trainable = [p for g in spec.param_groups(model, cfg, 0.0) for p in g["params"]]
    counts = count_parameters(model, trainable)
    on_meta = all(p.is_meta for p in model.parameters())
    return {"method": method, "preset": preset, "voxels": voxels, "device": "meta" if on_meta else "mixed", **counts}


def format_model_info(info: dict) -> str:
    rows = [[name, f"{c['total']:,}", f"{c['trainable']:,}"] for name, c in info["modules"].items()]
    rows.append(["total", f"{info['total']:,}", f"{info['trainable']:,}"])
    head = f"{info['method']} ({info['preset']}), {len(info['voxels'])} subjects, voxels {info['voxels']}\n"
    return head + table(["module", "parameters", "trainable"], rows)
