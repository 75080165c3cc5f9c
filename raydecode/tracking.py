"""MLflow: where runs and their artifacts go.

Artifacts of a store on S3 go to the same endpoint: :func:`configure` exports the stage's
:class:`~raydecode.storage.S3Options` as the variables MLflow's S3 artifact repository reads
(``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``). Runs, nested trial runs and registry promotion build on this.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from raydecode.checkpoint import adapter_package
from raydecode.config import StageConfig
from raydecode.errors import ConfigError
from raydecode.methods.spec import Reconstructs, get_method
from raydecode.pyfunc import DecoderModel


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
    """The id of experiment ``name``, created (with ``artifact_location``, e.g. an s3:// URI) if missing. With a
    sqlite tracking store and no location, artifacts go to ``mlartifacts/`` beside the database (MLflow's default
    is ``./mlruns`` in whatever directory the process runs from)."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    if artifact_location is None and uri.startswith("sqlite:///"):
        db = os.path.abspath(uri[len("sqlite:///"):])
        artifact_location = Path(os.path.dirname(db), "mlartifacts").as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)


SECRET_KEYS = {"access_key_id", "secret_access_key", "session_token"}  # never logged, whatever block holds them


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as ``a.b.c`` keys (MLflow params), secrets left out."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif k not in SECRET_KEYS:
            out[key] = v
    return out


def log_params(params: dict) -> None:
    import mlflow

    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})  # MLflow's limit on a param's value


@contextmanager
def stage_run(cfg: StageConfig, stage: str, *, run_name: str | None = None, tags: dict | None = None,
              parent_run_id: str | None = None, exclude: set[str] | None = None) -> Iterator:
    """One stage's MLflow run in ``cfg.experiment``: tagged ``raydecode.stage``, the flattened config (secrets and
    ``exclude`` left out) as params; it ends FINISHED, or FAILED when the block raises. A sweep trial its scheduler
    stopped may already be KILLED: that status stays."""
    import mlflow

    all_tags = {"raydecode.stage": stage, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(experiment_id=experiment(cfg.experiment), run_name=run_name, tags=all_tags)
    try:
        log_params(flatten(cfg.model_dump(mode="json", exclude=exclude)))
        yield run
    except BaseException:
        try:
            killed = mlflow.MlflowClient().get_run(run.info.run_id).info.status == "KILLED"
        except Exception:  # noqa: BLE001 - the tracking store's own trouble must not hide the error above
            killed = False
        mlflow.end_run(status="KILLED" if killed else "FAILED")
        raise
    mlflow.end_run()


# -- models and the registry -----------------------------------------------------------------

CHAMPION, CHALLENGER = "champion", "challenger"
# what loading and running a registered model imports (raydecode's own code travels with the model as code_paths):
# pinned to this environment's versions in the model's requirements.txt; Ray, DeepSpeed and the data tools are
# training-side only
SERVE_REQUIREMENTS = ("torch", "numpy", "pyarrow", "pydantic", "pyyaml", "scipy", "tqdm", "pillow", "diffusers",
                      "peft", "safetensors")


def model_name(method: str, subjects: list[int]) -> str:
    """``raydecode-<method>-subjNN`` (one subject) or ``raydecode-<method>-multi``."""
    return f"raydecode-{method}-subj{subjects[0]:02d}" if len(subjects) == 1 else f"raydecode-{method}-multi"


def serve_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in SERVE_REQUIREMENTS]


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
    if not math.isfinite(cand["value"]):  # a NaN or infinite score can never be champion
        alias, reason = CHALLENGER, f"{cand['metric']} is {cand['value']}: not a score that can lead"
    elif champ is None:
        alias, reason = CHAMPION, "no champion yet"
    elif champ["version"] == cand["version"]:
        alias, reason = CHAMPION, "already the champion"
    elif champ["test_set"] != cand["test_set"] or champ["metric"] != cand["metric"]:
        alias, reason = CHALLENGER, (f"champion v{champ['version']} was measured on another test set or metric "
                                     f"({champ['metric']} on {champ['test_set']}): not comparable")
    elif champ["value"] is None or not math.isfinite(champ["value"]):  # nor block a real one
        alias, reason = CHAMPION, f"champion v{champ['version']} has no finite {cand['metric']} ({champ['value']})"
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
    spec = get_method(config["method"])
    own = spec.get(Reconstructs)
    if own is None:
        return None
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    steps, guidance = own.defaults(spec.config_model(**config["model"]))
    return ModelSignature(inputs=None, outputs=None, params=ParamSchema([
        ParamSpec("steps", "long", int(steps)), ParamSpec("guidance", "double", float(guidance)),
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
        name = name or model_name(get_method(config["method"]).name, config["info"]["subjects"])

        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):  # e.g. inside a sweep's run
            # raydecode's code travels with the model (MLflow puts code/ on the path when it loads it): the model
            # loads in an environment made from its own requirements.txt alone, no checkout, no index serving us
            info = mlflow.pyfunc.log_model(
                name="model", python_model=DecoderModel(), artifacts={"package": os.path.join(tmp, "package")},
                code_paths=[os.path.dirname(os.path.abspath(__file__))], pip_requirements=serve_requirements(),
                signature=_signature(config))
    mv = mlflow.register_model(info.model_uri, name)
    tags = {"raydecode.metric": metric, "raydecode.tie_break": tie_break, "raydecode.test_set": test_set,
            "raydecode.store_manifest_sha256": manifest_sha256, "raydecode.checkpoint_uri": checkpoint_uri,
            "raydecode.method": config["method"], **(extra_tags or {})}
    tags.update({f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items()
                 if k.startswith(("retrieval.", "test.", "recon.")) and isinstance(v, (int, float))})
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, str(value))
    return promote(name, mv.version, client)
