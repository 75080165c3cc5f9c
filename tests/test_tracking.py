"""MLflow artifacts reach the store's S3 endpoint through the same settings as the store."""

from raydecode.config import InfoConfig
from raydecode.storage import resolve
from raydecode.tracking import configure, experiment


def test_mlflow_artifacts_go_to_the_configured_s3_endpoint(s3_server, tmp_path, monkeypatch):
    import mlflow

    for k in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    cfg = InfoConfig(store="s3://nsd/stores/x", workdir=str(tmp_path), s3=s3_server)
    uri = configure(cfg)
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
    exp = experiment("raydecode-test", artifact_location="s3://nsd/mlflow")
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifact(str(note))
    obj = resolve(f"s3://nsd/mlflow/{run.info.run_id}/artifacts/note.txt", s3_server)
    assert obj.read_bytes() == b"hello"
    mlflow.set_tracking_uri(None)
