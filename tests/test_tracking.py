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


def test_a_nan_score_never_leads_and_never_blocks_the_gate(tmp_path):
    """The registry gate on a real MLflow registry (sqlite): a version scored NaN does not become champion even
    with no champion yet, and a NaN champion (registered before this rule) is replaced by the next real score."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from raydecode.tracking import CHAMPION, promote

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("gate")
    (tmp_path / "model").mkdir()

    def version(score: str) -> str:
        mv = client.create_model_version("gate", str(tmp_path / "model"))
        for key, value in {"raydecode.metric": "retrieval.top1", "raydecode.tie_break": "retrieval.top1",
                           "raydecode.test_set": "abc", "metric.retrieval.top1": score}.items():
            client.set_model_version_tag("gate", mv.version, key, value)
        return str(mv.version)

    nan = version("nan")
    first = promote("gate", nan, client)
    assert first.alias == "challenger" and "nan" in first.reason
    client.set_registered_model_alias("gate", CHAMPION, nan)  # as an older gate would have left it
    real = promote("gate", version("0.2"), client)
    assert real.alias == CHAMPION and "no finite" in real.reason, real
    assert str(client.get_model_version_by_alias("gate", CHAMPION).version) == real.version
    worse = promote("gate", version("0.1"), client)
    assert worse.alias == "challenger", worse
