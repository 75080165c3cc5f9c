"""MLflow: where runs and their artifacts go.

Artifacts of a store on S3 go to the same endpoint: :func:`configure` exports the stage's
:class:`~raydecode.storage.S3Options` as the variables MLflow's S3 artifact repository reads
(``MLFLOW_S3_ENDPOINT_URL``, ``AWS_*``). Runs, nested trial runs and registry promotion build on this.
"""

from __future__ import annotations

import os

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
