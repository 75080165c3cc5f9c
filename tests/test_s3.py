"""The same commands against an S3 endpoint (moto's server on 127.0.0.1), configured only by
an endpoint and credentials."""

import json

import numpy as np
from conftest import run_main

from raydecode.config import DataSelection
from raydecode.data.pipeline import trials_dataset
from raydecode.data.store import open_store


def _aws_env(opts):
    return {
        "AWS_ENDPOINT_URL_S3": opts.endpoint_url,
        "AWS_ACCESS_KEY_ID": opts.access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": opts.secret_access_key.get_secret_value(),
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def test_ingest_info_verify_and_ray_data_over_s3(s3_server, tiny_store, ray_local, tmp_path):
    uri = "s3://nsd/stores/tiny"
    env = _aws_env(s3_server)
    summary = tmp_path / "ingest.json"
    r = run_main("ingest", "synthetic", "--preset", "tiny", "--out", uri, "--summary", str(summary), env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads(summary.read_text())
    assert s["stage"] == "ingest" and s["status"] == "written" and s["artifacts"]["store"] == uri
    assert s["metrics"]["shards_written"] > 0 and s["metrics"]["subjects"] == 8

    # byte-identical to the local ingest of the same seed
    local = {x.path: x.sha256 for x in open_store(tiny_store).manifest.shards}
    remote = open_store(uri, s3_server)
    assert {x.path: x.sha256 for x in remote.manifest.shards} == local

    r = run_main("info", uri, "--verify", env=env)
    assert r.returncode == 0, r.stderr
    assert "all 41 shards match the manifest" in r.stdout and "subject" in r.stdout

    # a re-run is a no-op
    r = run_main("ingest", "synthetic", "--preset", "tiny", "--out", uri, env=env)
    assert r.returncode == 0 and "store already complete" in r.stdout

    # Ray Data streams the S3 store, stimuli joined by image id
    td = trials_dataset(remote, "train", DataSelection(subjects=[5], sessions=[2], images=True))
    batches = list(td.dataset.iter_batches(batch_size=1000))
    betas = np.concatenate([b["betas"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert betas.shape[1] == remote.manifest.subject(5).voxels and len(betas) == len(images) > 50
    assert images.std() > 10


def test_s3_corruption_is_found(s3_server):
    import boto3

    uri = "s3://nsd/stores/corrupt"
    env = _aws_env(s3_server)
    assert run_main("ingest", "synthetic", "--out", uri, "--set", "subjects=[1]", "--set", "timeseries=false",
                   env=env).returncode == 0
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    key = "stores/corrupt/trials/subject=01/part-00002.parquet"
    body = client.get_object(Bucket="nsd", Key=key)["Body"].read()
    client.put_object(Bucket="nsd", Key=key, Body=body[:-100])
    r = run_main("info", uri, "--verify", env=env)
    assert r.returncode != 0 and f"s3://nsd/{key}" in r.stdout


def test_unreachable_endpoint_cli(tmp_path):
    env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    r = run_main("ingest", "synthetic", "--out", "s3://nsd/x", "--set", "s3.max_attempts=1",
                "--set", "s3.connect_timeout_s=1", env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach S3 endpoint http://127.0.0.1:9")


def test_empty_s3_prefix(s3_server):
    r = run_main("info", "s3://nsd/nothing/here", env=_aws_env(s3_server))
    assert r.returncode != 0 and "s3://nsd/nothing/here is empty" in r.stderr
