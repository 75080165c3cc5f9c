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
from raydecode.errors import ConfigError, TrackingUnavailable, first_line
from raydecode.methods.spec import Reconstructs, get_method
from raydecode.pyfunc import DecoderModel

# MLflow's HTTP client waits 120 s per request and retries 7 times with a doubling backoff (minutes per call on a
# dead server); raydecode's defaults: a short timeout and a few retries. MLflow's own variables win when set.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def bounded_http() -> None:
    """MLflow calls of this process fail within about a minute on an unreachable server (:data:`HTTP_DEFAULTS`)."""
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)


def check_reachable(uri: str) -> None:
    """Fail with one line, before anything is claimed or started, when the tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure to answer is the same news for the user
        raise TrackingUnavailable(f"MLflow tracking server {uri} does not answer ({first_line(exc)}); nothing was "
                                  "started (check tracking_uri / MLFLOW_TRACKING_URI and the server)") from None


def configure(cfg: StageConfig) -> str:
    """Point MLflow at the stage's tracking URI and S3 endpoint, with bounded HTTP retries; returns the tracking
    URI (without credentials)."""
    import mlflow

    bounded_http()
    uri = cfg.resolved_tracking_uri()
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///"):]) or ".", exist_ok=True)
    cfg.export_credentials()  # config values win; unset ones already came from the environment
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


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as ``a.b.c`` keys (MLflow params; credentials are never in a config's dump)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_params(params: dict) -> None:
    import mlflow

    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})  # MLflow's limit on a param's value


@contextmanager
def stage_run(cfg: StageConfig, stage: str, *, run_name: str | None = None, tags: dict | None = None,
              parent_run_id: str | None = None, exclude: set[str] | None = None,
              resume_run_id: str | None = None) -> Iterator:
    """One stage's MLflow run in ``cfg.experiment``: tagged ``raydecode.stage``, the flattened config (``exclude``
    left out) as params; it ends FINISHED, or FAILED when the block raises. A sweep trial its scheduler stopped
    may already be KILLED: that status stays. ``resume_run_id``: go on logging in that run (a resumed training run)
    if the tracking store still has it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    all_tags = {"raydecode.stage": stage, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = None
    if resume_run_id:
        try:
            mlflow.MlflowClient().get_run(resume_run_id)
            run = mlflow.start_run(run_id=resume_run_id, tags=all_tags)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    params = {k: str(v)[:500] for k, v in flatten(cfg.model_dump(mode="json", exclude=exclude)).items()}
    if run is None:
        run = mlflow.start_run(experiment_id=experiment(cfg.experiment), run_name=run_name, tags=all_tags)
    else:  # a param is logged once: what a resumed run was started with stays; a changed key (how it is run,
        # e.g. `promote`: the identity of a resumed run is the same) is recorded as a tag
        logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
        mlflow.set_tags({f"raydecode.resumed_with.{k}": v for k, v in params.items() if k in logged and logged[k] != v})
        params = {k: v for k, v in params.items() if k not in logged}
    try:
        log_params(params)
        yield run
    except BaseException:
        try:  # the tracking store's own trouble (a server gone) must not hide the error above
            killed = mlflow.MlflowClient().get_run(run.info.run_id).info.status == "KILLED"
            mlflow.end_run(status="KILLED" if killed else "FAILED")
        except Exception:  # noqa: BLE001 - end_run leaves the active run first: nothing is left dangling
            pass
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


GATE_LOCK_PREFIX = "raydecode-gate-lock."  # registered models used as locks, one per gated model name


def _first_value(client, run_id: str | None, key: str | None) -> float | None:
    """The first value ``key`` was logged with in run ``run_id``: what the run measured, not what a later
    ``log_metric`` on the same run may claim."""
    if not run_id or not key:
        return None
    history = client.get_metric_history(run_id, key)
    return float(min(history, key=lambda m: (m.timestamp, m.step)).value) if history else None


def _evidence(client, mv) -> dict:
    """A version's score as the gate reads it: ``final.<metric>`` (and ``final.<tie_break>``) of the run the
    version was created from (``mv.run_id``, fixed at registration). Tags hold only which metric and test set
    :func:`register_run` recorded; a ``metric.*`` tag anyone may write is not read."""
    tags = dict(mv.tags)
    metric, tie = tags.get("raydecode.metric"), tags.get("raydecode.tie_break")
    value = _first_value(client, mv.run_id, metric and f"final.{metric}")
    tie_value = _first_value(client, mv.run_id, tie and f"final.{tie}")
    return {"version": str(mv.version), "metric": metric, "tie_break": tie, "value": value,
            "tie_value": float("-inf") if tie_value is None or not math.isfinite(tie_value) else tie_value,
            "test_set": tags.get("raydecode.test_set"), "run_id": mv.run_id}


@contextmanager
def gate_lock(client, name: str, timeout_s: float = 120.0, lease_s: float = 300.0) -> Iterator[None]:
    """Promotions of one model name, one at a time. The lock is a registered model ``raydecode-gate-lock.<name>``:
    the registry creates a name once (a unique key), so exactly one of N concurrent gates holds it. A lock older
    than ``lease_s`` (its holder died) is taken over; waiting longer than ``timeout_s`` is an error."""
    import time
    import uuid

    from mlflow.exceptions import MlflowException

    lock, me, t0 = GATE_LOCK_PREFIX + name, uuid.uuid4().hex, time.time()
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": me, "since": f"{time.time():.3f}"},
                                           description=f"held while raydecode's gate promotes a version of {name}")
            break
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):  # the second: the
                raise  # holder released it while the registry looked up who holds it
        try:
            since = float(client.get_registered_model(lock).tags.get("since", "0"))
        except MlflowException:
            continue  # released between our two calls
        if time.time() - since > lease_s:
            try:
                client.delete_registered_model(lock)
            except MlflowException:
                pass
            continue
        if time.time() - t0 > timeout_s:
            raise ConfigError(f"model {name!r}: another promotion has held the registry lock {lock!r} for "
                              f"{time.time() - since:.0f} s (waited {timeout_s:.0f} s); if no promotion is running, "
                              f"delete that registered model")
        time.sleep(0.05 + 0.1 * (uuid.uuid4().int % 10) / 10)
    try:
        yield
    finally:
        try:
            if client.get_registered_model(lock).tags.get("holder") == me:
                client.delete_registered_model(lock)
        except MlflowException:
            pass


def promote(name: str, version: str | int, client=None) -> Decision:
    """The registry gate: ``champion`` moves to ``version`` only if it beats the current champion on the same test
    set and metric (tie-break second); otherwise ``version`` becomes the ``challenger``. Scores are read from the
    versions' own runs (:func:`_evidence`); a NaN, infinite or missing score never leads and never blocks a real
    one. Promotions of one name are serialised (:func:`gate_lock`) and the champion is read inside the lock, so
    concurrent promotions leave the best version champion. The decision and its evidence are tags on the version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = client or MlflowClient()
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ConfigError(f"model {name!r} version {version}: not in the registry at {mlflow_uri()}") from None
        raise TrackingUnavailable(f"the model registry at {mlflow_uri()} does not answer: {first_line(exc)}") \
            from None
    if not mv.tags.get("raydecode.metric"):
        raise ConfigError(f"model {name!r} version {version}: no tag raydecode.metric naming the score to compare "
                          "(was it registered by raydecode?)")
    cand = _evidence(client, mv)
    with gate_lock(client, name):
        try:
            current = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            current = None
        champ = _evidence(client, current) if current is not None else None
        alias, reason = _decide(cand, champ)
        client.set_registered_model_alias(name, alias, cand["version"])
        evidence = f"runs:/{cand['run_id']} final.{cand['metric']}={cand['value']}"
        client.set_model_version_tag(name, cand["version"], "raydecode.decision", f"{alias}: {reason}")
        client.set_model_version_tag(name, cand["version"], "raydecode.evidence", evidence)
    return Decision(name, cand["version"], alias, reason, cand, champ)


def _decide(cand: dict, champ: dict | None) -> tuple[str, str]:
    if cand["value"] is None or not math.isfinite(cand["value"]):  # a NaN, infinite or missing score never leads
        return CHALLENGER, (f"{cand['metric']} is {cand['value']} in run {cand['run_id']}: not a score that can "
                            "lead")
    if champ is None:
        return CHAMPION, "no champion yet"
    if champ["version"] == cand["version"]:
        return CHAMPION, "already the champion"
    if champ["test_set"] != cand["test_set"] or champ["metric"] != cand["metric"]:
        return CHALLENGER, (f"champion v{champ['version']} was measured on another test set or metric "
                            f"({champ['metric']} on {champ['test_set']}): not comparable")
    if champ["value"] is None or not math.isfinite(champ["value"]):  # nor block a real one
        return CHAMPION, f"champion v{champ['version']} has no finite {cand['metric']} ({champ['value']})"
    if (cand["value"], cand["tie_value"]) > (champ["value"], champ["tie_value"]):
        return CHAMPION, (f"{cand['metric']} {cand['value']:.4f} beats champion v{champ['version']} "
                          f"({champ['value']:.4f})")
    return CHALLENGER, (f"{cand['metric']} {cand['value']:.4f} does not beat champion v{champ['version']} "
                        f"({champ['value']:.4f})")


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


def register_run(run_id: str, checkpoint_uri: str, metric: str, tie_break: str, test_set: str,
                 manifest_sha256: str, extra_tags: dict | None = None, name: str | None = None, s3=None):
    """Log the run's model (an MLflow pyfunc whose artifact is the :func:`adapter_package`) in run ``run_id``,
    register it as ``name`` (default :func:`model_name`), tag it with which score and test set the gate compares,
    and pass it through :func:`promote`, which reads the score from the run's ``final.<metric>``. Returns the
    :class:`Decision`."""
    import tempfile

    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    metrics = {k[len("final."):]: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("final.")}
    if metric not in metrics:
        raise ConfigError(f"run {run_id}: no final.{metric} to gate on; measured: "
                          f"{', '.join(sorted(metrics)) or 'nothing'}")
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
    # for people reading the registry: the gate itself reads the run (see _evidence)
    tags.update({f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items()
                 if k.startswith(("retrieval.", "test.", "recon."))})
    for key, value in tags.items():
        client.set_model_version_tag(name, mv.version, key, str(value))
    return promote(name, mv.version, client)
