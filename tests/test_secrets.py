"""Credentials given to raydecode are used and never written anywhere: a pipeline on S3 with an authenticated
MLflow server, its S3 keys and tracking password set in the config file a user would write, then every byte it
left behind is searched for them."""

import json
import secrets
from pathlib import Path

import yaml
from conftest import run_main


def _needles() -> dict[str, str]:
    tag = secrets.token_hex(6)
    return {"s3.access_key_id": f"AKIARDTEST{tag.upper()}", "s3.secret_access_key": f"rd-secret-key-{tag}",
            "s3.session_token": f"rd-session-token-{tag}", "tracking password": f"rd-tracking-pw-{tag}"}


def _ray_state() -> str:
    """What Ray's control store holds about every actor and job (runtime envs, names, options), as text: what
    ``ray list actors --detail`` and ``ray list jobs`` read."""
    import ray._private.state as state
    from ray.core.generated import gcs_pb2

    accessor = state.state._connect_and_get_accessor()
    actors = [str(gcs_pb2.ActorTableData.FromString(raw)) for raw in accessor.get_actor_table(None, None)]
    jobs = [str(gcs_pb2.JobTableData.FromString(raw)) for raw in accessor.get_job_table(skip_submission_job_info_field=False,
                                                                                         skip_is_running_tasks_field=False)]
    return "\n".join(actors + jobs)


def _files(root: Path):
    for p in root.rglob("*"):
        if p.is_file():
            yield p


def test_credentials_reach_no_file_run_registry_ray_state_or_log(s3_server, mlflow_server, ray_local, tmp_path,
                                                                  monkeypatch):
    import boto3
    import ray

    from raydecode import tracking
    from raydecode.config import TrainConfig, load_config
    from raydecode.data.store import open_store

    needles = _needles()
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_USERNAME",
              "MLFLOW_TRACKING_PASSWORD", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)  # restored after the test: the stages export what the config gives
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(k, v)
    host = mlflow_server.url.removeprefix("http://")
    work, prefix = tmp_path / "work", f"secrets-{secrets.token_hex(4)}"
    store = f"s3://nsd/{prefix}/store"
    # the user's own files: the one place the credentials are written
    (tmp_path / "user").mkdir()
    common = {"store": store, "workdir": str(work), "preset": "tiny",
              "tracking_uri": f"http://alice:{needles['tracking password']}@{host}",
              "s3": {"endpoint_url": s3_server.endpoint_url, "region": "us-east-1",
                     "access_key_id": needles["s3.access_key_id"],
                     "secret_access_key": needles["s3.secret_access_key"],
                     "session_token": needles["s3.session_token"]}}
    ingest_config = tmp_path / "user" / "ingest.yaml"
    ingest_config.write_text(yaml.safe_dump(common))
    config = tmp_path / "user" / "pretrain.yaml"
    config.write_text(yaml.safe_dump({
        **common, "run_name": "secret-run", "experiment": "secrets",
        "data": {"subjects": [1, 2], "categories": False, "read_cpus": 0.25},
        "optim": {"epochs": 2, "batch_size": 32, "lr": 1e-3},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.25}, "deepspeed": {"zero_stage": 2},
        "checkpoint": {"storage_path": f"s3://nsd/{prefix}/runs"}}))

    outputs = []
    work.mkdir()
    ingest = run_main("ingest", "synthetic", "--config", str(ingest_config), "--summary",
                      str(work / "ingest.json"))
    outputs.append(ingest)
    assert ingest.returncode == 0, ingest.stderr
    pretrain = run_main("pretrain", "--config", str(config), "--summary", str(work / "pretrain.json"))
    outputs.append(pretrain)
    assert pretrain.returncode == 0, pretrain.stderr[-3000:]
    result = json.loads((work / "pretrain.json").read_text())
    assert result["metrics"]["retrieval.brain_to_image_top1"] > 1 / 30  # it trained, on S3, through the server
    assert "alice" not in pretrain.stdout and host in pretrain.stdout  # the URI is printed without its user

    # the registry package, as a sweep or dynadiff stage writes it (the driver holds the credentials)
    cfg = load_config(TrainConfig, str(config))
    tracking.configure(cfg)
    opened = open_store(cfg.store, cfg.s3)
    decision = tracking.register_run(result["mlflow_run_id"], result["artifacts"]["checkpoint"],
                                     "retrieval.brain_to_image_top1", "retrieval.image_to_brain_top1",
                                     opened.test_set_digest([1, 2]), opened.manifest_sha256(), s3=cfg.s3,
                                     name="secrets-check")
    assert decision.alias == "champion"

    # everything written: every object in the bucket (store, Ray Train checkpoints, MLflow artifacts and the
    # registered package), the MLflow server's database and log, the workdir, Ray's session directory (every
    # log of every worker) and Ray's actor and job tables; the output of the commands
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    blobs: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="nsd"):
        for obj in page.get("Contents", []):
            blobs[f"s3://nsd/{obj['Key']}"] = s3.get_object(Bucket="nsd", Key=obj["Key"])["Body"].read()
    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    for root in (mlflow_server.root, work, session_dir):
        blobs.update({str(p): p.read_bytes() for p in _files(root)})
    blobs["ray actor and job tables"] = _ray_state().encode()
    for out in outputs:
        blobs[" ".join(out.args[:3]) + " output"] = (out.stdout + out.stderr).encode()
    assert any(k.endswith("/package/config.json") or "package" in k for k in blobs if k.startswith("s3://")), \
        "the registered package was not found in the scan"
    assert any(k.startswith(f"s3://nsd/{prefix}/runs/") for k in blobs) and len(blobs) > 100
    hits = [(what, where) for where, data in blobs.items() for what, needle in needles.items()
            if needle.encode() in data]
    print(f"\nscanned {len(blobs)} files and records, {sum(map(len, blobs.values())) / 2**20:.1f} MB: "
          f"{len(hits)} credential(s) found")
    assert not hits, hits
