"""The consolidated checkpoint: what a finished run leaves for evaluation and fine-tuning.

``<run>/final/`` holds ``model.safetensors`` (the full fp32 state dict, gathered
from every ZeRO partition), ``config.json`` (method, preset, resolved method
config, dataset info, frozen targets, the stage config) and ``metrics.json``.
:func:`load_consolidated` rebuilds the model from these files in any process:
no Ray, no DeepSpeed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from raydecode.errors import ConfigError, StoreError
from raydecode.methods.spec import Adapts, DatasetInfo, FreezesWeights, MethodSpec, Reconstructs, get_method
from raydecode.report import filter_literal
from raydecode.storage import S3Options, resolve

MODEL_FILE = "model.safetensors"  # in a final/ checkpoint and a registered package: every trained weight
ADAPTER_FILE = "adapter.safetensors"  # packages registered before 0.2: the weights that differ from init_from
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
    try:
        data = json.loads(loc.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{loc.uri}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise StoreError(f"{loc.uri}: expected a JSON object, found {type(data).__name__}")
    return data


def load_state(uri: str, s3: S3Options | None = None) -> dict[str, torch.Tensor]:
    loc = resolve(uri, s3).join(MODEL_FILE)
    if not loc.exists():
        raise StoreError(f"{loc.uri} does not exist: not a raydecode checkpoint")
    return load_safetensors(loc.read_bytes())


def rebuild(config: dict):
    """The method, its config, the dataset info and a freshly built model (random trained weights, frozen parts
    rebuilt) from a checkpoint's ``config.json``: what every loader starts from."""
    missing = [k for k in ("method", "model", "info") if k not in config]
    if missing:
        raise StoreError(f"{CONFIG_FILE}: no {missing[0]!r}: not a raydecode checkpoint's config")
    spec = get_method(config["method"])
    try:
        mcfg = spec.config_model(**config["model"])
        info = DatasetInfo.from_dict(config["info"])
    except (ValidationError, TypeError, KeyError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        raise StoreError(f"{CONFIG_FILE}: its 'model' / 'info' do not describe a {spec.name} model "
                         f"({first[0][:200] if first else type(exc).__name__})") from None
    return spec, mcfg, info, spec.build_model(mcfg, info)


def load_consolidated(uri: str, s3: S3Options | None = None, device: str = "cpu") -> Consolidated:
    """Rebuild the model of a finished run from its ``final/`` directory (eval mode, on ``device``)."""
    metrics = read_json(uri, METRICS_FILE, s3)
    config = read_json(uri, CONFIG_FILE, s3)
    spec, mcfg, info, model = rebuild(config)
    check_rebuilt(model, spec, config, uri)
    missing, unexpected = model.load_state_dict(load_state(uri, s3), strict=False)
    frozen = spec.get(FreezesWeights)
    if frozen is not None:  # frozen weights are rebuilt, not stored
        keep = frozen.persisted_keys(model)
        missing = [k for k in missing if k in keep]
    if missing or unexpected:
        raise StoreError(f"{uri}: checkpoint does not match method {spec.name!r} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return Consolidated(model.to(device).eval(), spec, mcfg, info, config, metrics, uri)


def check_rebuilt(model: torch.nn.Module, spec: MethodSpec, config: dict, uri: str) -> None:
    """Refuse a model whose rebuilt frozen weights (e.g. a diffusion UNet from its path) are not those it was trained
    with."""
    want = config.get("frozen_sha256")
    frozen = spec.get(FreezesWeights)
    if want and frozen is not None:
        state = model.state_dict()
        if frozen_digest(state, frozen.persisted_keys(model)) != want:
            raise StoreError(f"{uri}: the frozen weights rebuilt from model config (e.g. model.unet / model.vae) "
                             "differ from those this checkpoint was trained with")


# -- registered packages ---------------------------------------------------------------------------


def adapter_package(checkpoint_uri: str, out_dir: str, s3=None) -> dict:
    """Write what a registered model needs into ``out_dir``: the run's final checkpoint as it is (every trained
    weight: for Duala the adapted MindEye2 with its LoRA adapters, new ridge map and source statistics; frozen
    weights rebuilt from the config, e.g. a diffusion UNet from its seed or weights reference, are left out as in
    the checkpoint), its config.json / metrics.json and the method's export (e.g. Dynadiff's LoRA in the diffusers
    format). Nothing refers back to ``init_from``: the package loads anywhere. Returns the config."""
    root = resolve(checkpoint_uri, s3)
    config = json.loads(root.join(CONFIG_FILE).read_bytes())
    os.makedirs(out_dir, exist_ok=True)
    for name in (MODEL_FILE, CONFIG_FILE, METRICS_FILE):
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(root.join(name).read_bytes())
    spec = get_method(config["method"])
    own = spec.get(Reconstructs)
    if own is not None and own.export is not None:  # e.g. Dynadiff: LoRA in the diffusers format + the brain module
        own.export(load_consolidated(checkpoint_uri, s3).model, out_dir)
    return config


def load_adapted(package_dir: str, s3=None, device: str = "cpu"):
    """Rebuild a registered model from its package (no Ray, no DeepSpeed). A package is a final/ checkpoint
    directory, so it loads as one; a package from before 0.2 holds only what differs from ``init_from``, which is
    loaded first. Returns the ``Consolidated`` view."""
    if os.path.exists(os.path.join(package_dir, MODEL_FILE)):
        return load_consolidated(package_dir, device=device)
    return _load_legacy_package(package_dir, s3, device)


def _load_legacy_package(package_dir: str, s3, device: str):
    from safetensors.torch import load_file

    with open(os.path.join(package_dir, CONFIG_FILE)) as f:
        config = json.load(f)
    with open(os.path.join(package_dir, METRICS_FILE)) as f:
        metrics = json.load(f)
    spec, mcfg, info, model = rebuild(config)
    base_uri = config["train"].get("init_from")
    if base_uri:
        s3 = s3 or S3Options(**{k: v for k, v in config["train"].get("s3", {}).items() if v is not None})
        if spec.get(Adapts) is not None:
            spec.load_pretrained(model, load_state(base_uri, s3))
        else:
            model.load_state_dict(load_state(base_uri, s3), strict=False)
    model.load_state_dict(load_file(os.path.join(package_dir, ADAPTER_FILE)), strict=False)
    check_rebuilt(model, spec, config, package_dir)
    return Consolidated(model.to(device).eval(), spec, mcfg, info, config, metrics, package_dir)


# -- model references: a registry version, a run's model or a checkpoint URI ------------------------


@dataclass(frozen=True)
class ModelRef:
    """A model reference resolved to a fixed identity (an alias may move; ``canonical`` does not)."""
    ref: str
    kind: str  # registry | run | checkpoint
    canonical: str  # models:/name/<version> | runs:/<id>/<path> | the checkpoint URI
    run_id: str | None  # the run the model was logged in / trained by
    name: str | None = None
    version: str | None = None


def resolve_ref(ref: str, s3=None) -> ModelRef:
    """Resolve ``ref`` against the current MLflow tracking URI; a one-line ConfigError names what is missing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if ref.startswith("models:/"):
            body = ref[len("models:/"):]
            if "@" in body:
                name, alias = body.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, _, version = body.partition("/")
                if not version.isdigit():
                    raise ConfigError(f"--model {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
                mv = client.get_model_version(name, version)
            return ModelRef(ref, "registry", f"models:/{name}/{mv.version}", mv.run_id, name, str(mv.version))
        if ref.startswith("runs:/"):
            run_id = ref[len("runs:/"):].split("/")[0]
            client.get_run(run_id)
            return ModelRef(ref, "run", ref, run_id)
    except MlflowException as exc:
        raise ConfigError(f"--model {ref!r}: {exc.message.splitlines()[0]}") from None

    read_json(ref, CONFIG_FILE, s3)  # a StoreError naming the missing file
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`raydecode.checkpoint_uri` = {filter_literal(ref)}", order_by=["attributes.start_time DESC"],
        max_results=1)
    return ModelRef(ref, "checkpoint", ref, runs[0].info.run_id if runs else None)


def fetch(ref: ModelRef, out_dir: str) -> str:
    """Registry / run references: the model's package directory, downloaded under ``out_dir``."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=ref.canonical, dst_path=out_dir)
    package = os.path.join(local, "artifacts", "package")
    if not os.path.isdir(package):
        raise ConfigError(f"--model {ref.ref!r}: not a raydecode model (no artifacts/package in it)")
    return package


def model_config(ref: ModelRef, s3=None) -> dict:
    """The model's config.json (method, model config, dataset info, targets, training config)."""
    if ref.kind == "checkpoint":
        return read_json(ref.canonical, CONFIG_FILE, s3)
    with tempfile.TemporaryDirectory(prefix="raydecode-eval-") as tmp:
        with open(os.path.join(fetch(ref, tmp), CONFIG_FILE)) as f:
            return json.load(f)


def load_model(ref: ModelRef, s3=None, device: str = "cpu"):
    """The model (:class:`~raydecode.checkpoint.Consolidated`) in any process: no Ray, no DeepSpeed."""
    if ref.kind == "checkpoint":
        return load_consolidated(ref.canonical, s3, device)
    with tempfile.TemporaryDirectory(prefix="raydecode-eval-") as tmp:  # the weights are read while loading
        return load_adapted(fetch(ref, tmp), s3, device)
