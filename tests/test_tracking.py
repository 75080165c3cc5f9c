"""MLflow artifacts reach the store's S3 endpoint through the same settings as the store; the registry gate."""

from conftest import FAULTS

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


def _registry(tmp_path):
    """A real MLflow registry (sqlite) and a helper that registers a version whose run measured ``score``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("gate")
    (tmp_path / "model").mkdir()
    exp = experiment("gate")

    def version(score: float) -> str:
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "final.retrieval.top1", score)
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version("gate", str(tmp_path / "model"), run_id=run.info.run_id)
        for key, value in {"raydecode.metric": "retrieval.top1", "raydecode.tie_break": "retrieval.top1",
                           "raydecode.test_set": "abc"}.items():
            client.set_model_version_tag("gate", mv.version, key, value)
        return str(mv.version)

    return client, version


def test_a_nan_score_never_leads_and_never_blocks_the_gate(tmp_path):
    """A version scored NaN does not become champion even with no champion yet, and a NaN champion (registered
    before this rule) is replaced by the next real score."""
    from raydecode.tracking import CHAMPION, promote

    client, version = _registry(tmp_path)
    nan = version(float("nan"))
    first = promote("gate", nan, client)
    assert first.alias == "challenger" and "nan" in first.reason
    client.set_registered_model_alias("gate", CHAMPION, nan)  # as an older gate would have left it
    real = promote("gate", version(0.2), client)
    assert real.alias == CHAMPION and "no finite" in real.reason, real
    assert str(client.get_model_version_by_alias("gate", CHAMPION).version) == real.version
    worse = promote("gate", version(0.1), client)
    assert worse.alias == "challenger", worse


def test_the_gate_reads_the_run_not_tags_anyone_can_write(tmp_path):
    """A ``metric.*`` tag written on a version, or a later ``log_metric`` on its run, does not change its score:
    the gate reads the first value the version's own run logged."""
    from raydecode.tracking import CHAMPION, promote

    client, version = _registry(tmp_path)
    champion = version(0.5)
    assert promote("gate", champion, client).alias == CHAMPION
    forged = version(0.1)
    client.set_model_version_tag("gate", forged, "metric.retrieval.top1", "0.99")
    run_id = client.get_model_version("gate", forged).run_id
    client.log_metric(run_id, "final.retrieval.top1", 0.99)
    d = promote("gate", forged, client)
    assert d.alias == "challenger" and d.candidate["value"] == 0.1, d
    assert str(client.get_model_version_by_alias("gate", CHAMPION).version) == champion
    assert client.get_model_version("gate", forged).tags["raydecode.evidence"] == \
        f"runs:/{run_id} final.retrieval.top1=0.1"


def test_concurrent_promotions_leave_the_best_version_champion(tmp_path):
    """Eight promotions started together (threads, each its own client, one registry) in three rounds: whatever
    order the gates run in, the best score is champion at the end, each decision saw the champion before it, and
    the lock is released."""
    import random
    import threading

    from mlflow.tracking import MlflowClient

    from raydecode.tracking import CHAMPION, GATE_LOCK_PREFIX, promote

    client, version = _registry(tmp_path)
    rng = random.Random(0)
    best = 0.0
    for round_ in range(3):
        scores = [round(rng.uniform(0.1 + round_, 0.9 + round_), 4) for _ in range(8)]
        versions = [version(s) for s in scores]
        start, decisions, errors = threading.Barrier(len(versions)), [], []

        def gate(v):
            try:
                start.wait()
                decisions.append(promote("gate", v, MlflowClient()))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=gate, args=(v,)) for v in versions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        best = max(best, *scores)
        champion = client.get_model_version_by_alias("gate", CHAMPION)
        assert client.get_metric_history(champion.run_id, "final.retrieval.top1")[0].value == best, (scores, best)
        # serialised: every gate that took champion beat the one that held it when it decided
        winners = [d for d in decisions if d.alias == CHAMPION]
        assert all(d.champion is None or d.candidate["value"] > d.champion["value"] for d in winners)
        assert len({d.champion["version"] if d.champion else None for d in winners}) == len(winners)
    assert not [m for m in client.search_registered_models() if m.name.startswith(GATE_LOCK_PREFIX)]
    FAULTS.append(("8 promotions of one model at once, 3 rounds", "the best score champion every round; each "
                   "decision saw the champion before it", "none"))
