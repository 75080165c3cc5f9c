"""The consolidated checkpoint: what a finished run leaves for evaluation and fine-tuning.

``<run>/final/`` holds ``model.safetensors`` (the full fp32 state dict, gathered
from every ZeRO partition), ``config.json`` (method, preset, resolved method
config, dataset info, frozen targets, the stage config) and ``metrics.json``.
:func:`load_consolidated` rebuilds the model from these files in any process:
no Ray, no DeepSpeed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from raydecode.errors import StoreError
from raydecode.methods.base import DatasetInfo, MethodSpec, get_method
from raydecode.storage import S3Options, resolve

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


@dataclass
class Consolidated:
    model: torch.nn.Module
    spec: MethodSpec
    method_config: Any
    info: DatasetInfo
    config: dict  # everything in config.json
    metrics: dict
    uri: str


def write_consolidated(uri: str, state: dict[str, torch.Tensor], config: dict, metrics: dict,
                       s3: S3Options | None = None) -> str:
    """Write the three files (model and config first, metrics last: its presence marks completeness)."""
    root = resolve(uri, s3)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() if v.is_floating_point() else v.detach().cpu()
               for k, v in state.items()}
    root.join(MODEL_FILE).write_bytes_atomic(save_safetensors(tensors, metadata={"format": "pt"}))
    root.join(CONFIG_FILE).write_bytes_atomic(json.dumps(config, indent=2, default=str).encode())
    root.join(METRICS_FILE).write_bytes_atomic(json.dumps(metrics, indent=2).encode())
    return root.uri


def frozen_digest(state: dict[str, torch.Tensor], persisted: set[str]) -> str:
    """sha256 of the weights a checkpoint leaves out (as fp32), by name: a loader rebuilding them from their path
    or seed checks it got the same ones."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(k for k in state if k not in persisted):
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_json(uri: str, name: str, s3: S3Options | None = None) -> dict:
    loc = resolve(uri, s3).join(name)
    if not loc.exists():
        raise StoreError(f"{loc.uri} does not exist: not a complete raydecode checkpoint")
    return json.loads(loc.read_bytes())


def load_state(uri: str, s3: S3Options | None = None) -> dict[str, torch.Tensor]:
    loc = resolve(uri, s3).join(MODEL_FILE)
    if not loc.exists():
        raise StoreError(f"{loc.uri} does not exist: not a raydecode checkpoint")
    return load_safetensors(loc.read_bytes())


def load_consolidated(uri: str, s3: S3Options | None = None, device: str = "cpu") -> Consolidated:
    """Rebuild the model of a finished run from its ``final/`` directory (eval mode, on ``device``)."""
    metrics = read_json(uri, METRICS_FILE, s3)
    config = read_json(uri, CONFIG_FILE, s3)
    spec = get_method(config["method"])
    mcfg = spec.config_model(**config["model"])
    info = DatasetInfo.from_dict(config["info"])
    model = spec.build_model(mcfg, info)
    check_rebuilt(model, spec, config, uri)
    missing, unexpected = model.load_state_dict(load_state(uri, s3), strict=False)
    if spec.persisted_keys is not None:  # frozen weights are rebuilt, not stored
        keep = spec.persisted_keys(model)
        missing = [k for k in missing if k in keep]
    if missing or unexpected:
        raise StoreError(f"{uri}: checkpoint does not match method {spec.name!r} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return Consolidated(model.to(device).eval(), spec, mcfg, info, config, metrics, uri)


def check_rebuilt(model: torch.nn.Module, spec: MethodSpec, config: dict, uri: str) -> None:
    """Refuse a model whose rebuilt frozen weights (e.g. a diffusion UNet from its path) are not those it was trained
    with."""
    want = config.get("frozen_sha256")
    if want and spec.persisted_keys is not None:
        state = model.state_dict()
        if frozen_digest(state, spec.persisted_keys(model)) != want:
            raise StoreError(f"{uri}: the frozen weights rebuilt from model config (e.g. model.unet / model.vae) "
                             "differ from those this checkpoint was trained with")
