"""MLflow: where runs and their artifacts go.

Artifacts of a store on S3 go to the same endpoint: :func:`configure` exports the stage's
:class:`~raydecode.storage.S3Options` as the variables MLflow's S3 artifact repository reads
(``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``). Runs, nested trial runs and registry promotion build on this.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from raydecode.config import StageConfig


def configure(cfg: StageConfig) -> str:
    """Point MLflow at the stage's tracking URI and S3 endpoint; returns the tracking URI."""
    import mlflow

    uri = cfg.resolved_tracking_uri()
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    os.environ.update(cfg.s3.env())  # config values win; unset ones already came from the environment
    mlflow.set_tracking_uri(uri)
    return uri


def experiment(name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (with ``artifact_location``, e.g. an s3:// URI) if missing."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifact_location)


# -- models and the registry -----------------------------------------------------------------

CHAMPION, CHALLENGER = "champion", "challenger"
ADAPTER_FILE = "adapter.safetensors"


def model_name(method: str, subjects: list[int]) -> str:
    """``raydecode-<method>-subjNN`` (one subject) or ``raydecode-<method>-multi``."""
    return f"raydecode-{method}-subj{subjects[0]:02d}" if len(subjects) == 1 else f"raydecode-{method}-multi"


def adapter_package(checkpoint_uri: str, out_dir: str, s3=None) -> dict:
    """Write what a registered model needs into ``out_dir``: the weights that differ from the run's ``init_from``
    checkpoint (for Duala: the new ridge map, LoRA adapters and source statistics; all weights when there was no
    ``init_from``), and the run's config.json / metrics.json. Returns the config."""
    import torch
    from safetensors.torch import save_file

    from raydecode.train.checkpoint import CONFIG_FILE, METRICS_FILE, load_state, read_json

    config = read_json(checkpoint_uri, CONFIG_FILE, s3)
    state = load_state(checkpoint_uri, s3)
    base_uri = config["train"].get("init_from")
    if base_uri:
        base = load_state(base_uri, s3)
        for key, value in base.items():
            for cand in (key, "{0}.base_layer.{2}".format(*key.rpartition("."))):
                if cand in state and state[cand].shape == value.shape and torch.equal(state[cand], value):
                    del state[cand]
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, ADAPTER_FILE))
    from raydecode.methods.base import get_method

    spec = get_method(config["method"])
    if spec.export is not None:  # e.g. Dynadiff: LoRA in the diffusers format + the brain module
        from raydecode.train.checkpoint import load_consolidated

        spec.export(load_consolidated(checkpoint_uri, s3).model, out_dir)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, METRICS_FILE), "w") as f:
        json.dump(read_json(checkpoint_uri, METRICS_FILE, s3), f, indent=2)
    return config


def load_adapted(package_dir: str, s3=None, device: str = "cpu"):
    """Rebuild a registered model from its package (no Ray, no DeepSpeed): the method's model, the ``init_from``
    weights it was adapted from, then the package's own weights. Returns the ``Consolidated`` view."""
    from safetensors.torch import load_file

    from raydecode.methods.base import DatasetInfo, get_method
    from raydecode.storage import S3Options
    from raydecode.train.checkpoint import CONFIG_FILE, METRICS_FILE, Consolidated, check_rebuilt, load_state

    with open(os.path.join(package_dir, CONFIG_FILE)) as f:
        config = json.load(f)
    with open(os.path.join(package_dir, METRICS_FILE)) as f:
        metrics = json.load(f)
    spec = get_method(config["method"])
    mcfg = spec.config_model(**config["model"])
    info = DatasetInfo.from_dict(config["info"])
    model = spec.build_model(mcfg, info)
    base_uri = config["train"].get("init_from")
    if base_uri:
        s3 = s3 or S3Options(**{k: v for k, v in config["train"].get("s3", {}).items() if v is not None})
        base = load_state(base_uri, s3)
        (spec.load_pretrained or (lambda m, st: m.load_state_dict(st, strict=False)))(model, base)
    model.load_state_dict(load_file(os.path.join(package_dir, ADAPTER_FILE)), strict=False)
    check_rebuilt(model, spec, config, package_dir)
    return Consolidated(model.to(device).eval(), spec, mcfg, info, config, metrics, package_dir)


@dataclass
class Decision:
    name: str
    version: str
    alias: str  # champion | challenger
    reason: str
    candidate: dict
    champion: dict | None


def _evidence(mv) -> dict:
    tags = dict(mv.tags)
    metric, tie = tags.get("raydecode.metric"), tags.get("raydecode.tie_break")
    return {"version": str(mv.version), "metric": metric, "tie_break": tie,
            "value": float(tags[f"metric.{metric}"]) if metric and f"metric.{metric}" in tags else None,
            "tie_value": float(tags[f"metric.{tie}"]) if tie and f"metric.{tie}" in tags else float("-inf"),
            "test_set": tags.get("raydecode.test_set"), "run_id": mv.run_id}


def promote(name: str, version: str | int, client=None) -> Decision:
    """The registry gate: ``champion`` moves to ``version`` only if it beats the current champion on the same test
    set and metric (tie-break second); otherwise ``version`` becomes the ``challenger``. The decision and its
    evidence are written as tags on the version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from raydecode.errors import ConfigError

    client = client or MlflowClient()
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise ConfigError(f"model {name!r} version {version}: not in the registry at {mlflow_uri()}") from None
    cand = _evidence(mv)
    if cand["value"] is None:
        raise ConfigError(f"model {name!r} version {version}: no tag metric.<name> to compare (was it registered "
                          "by raydecode?)")
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    champ = _evidence(current) if current is not None else None
    if champ is None:
        alias, reason = CHAMPION, "no champion yet"
    elif champ["version"] == cand["version"]:
        alias, reason = CHAMPION, "already the champion"
    elif champ["test_set"] != cand["test_set"] or champ["metric"] != cand["metric"]:
        alias, reason = CHALLENGER, (f"champion v{champ['version']} was measured on another test set or metric "
                                     f"({champ['metric']} on {champ['test_set']}): not comparable")
    elif (cand["value"], cand["tie_value"]) > (champ["value"], champ["tie_value"]):
        alias, reason = CHAMPION, (f"{cand['metric']} {cand['value']:.4f} beats champion v{champ['version']} "
                                   f"({champ['value']:.4f})")
    else:
        alias, reason = CHALLENGER, (f"{cand['metric']} {cand['value']:.4f} does not beat champion "
                                     f"v{champ['version']} ({champ['value']:.4f})")
    client.set_registered_model_alias(name, alias, cand["version"])
    client.set_model_version_tag(name, cand["version"], "raydecode.decision", f"{alias}: {reason}")
    return Decision(name, cand["version"], alias, reason, cand, champ)


def _signature(config: dict):
    """Inference parameters of models that reconstruct images (``predict(..., params={"steps": 4})``); MLflow drops
    params a signature does not declare. Defaults: the model's own."""
    from raydecode.methods.base import get_method

    if get_method(config["method"]).reconstruct is None:
        return None
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    model = config["model"]
    return ModelSignature(inputs=None, outputs=None, params=ParamSchema([
        ParamSpec("steps", "long", int(model.get("ddim_steps", 20))),
        ParamSpec("guidance", "double", float(model.get("guidance", 3.0))),
        ParamSpec("reconstruct", "boolean", True)]))


def mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def register_run(run_id: str, checkpoint_uri: str, metrics: dict, metric: str, tie_break: str, test_set: str,
                 manifest_sha256: str, extra_tags: dict | None = None, name: str | None = None, s3=None):
    """Log the run's model (an MLflow pyfunc whose artifact is the :func:`adapter_package`) in run ``run_id``,
    register it as ``name`` (default :func:`model_name`), tag it with its evidence, and pass it through
    :func:`promote`. Returns the :class:`Decision`."""
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        config = adapter_package(checkpoint_uri, os.path.join(tmp, "package"), s3)
        name = name or model_name(config["method"], config["info"]["subjects"])
        from raydecode.pyfunc import DecoderModel

        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):  # e.g. inside a sweep's run
            info = mlflow.pyfunc.log_model(
                name="model", python_model=DecoderModel(), artifacts={"package": os.path.join(tmp, "package")},
                pip_requirements=["raydecode"], signature=_signature(config))
    mv = mlflow.register_model(info.model_uri, name)
    tags = {"raydecode.metric": metric, "raydecode.tie_break": tie_break, "raydecode.test_set": test_set,
            "raydecode.store_manifest_sha256": manifest_sha256, "raydecode.checkpoint_uri": checkpoint_uri,
            "raydecode.method": config["method"], **(extra_tags or {})}
    tags.update({f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items()
                 if k.startswith(("retrieval.", "test.", "recon.")) and isinstance(v, (int, float))})
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, str(value))
    return promote(name, mv.version, client)
