import time

import pyarrow.fs as pafs
import pytest

from raydecode.errors import StorageError
from raydecode.storage import S3Options, resolve


def test_local_and_file_uris(tmp_path):
    a = resolve(str(tmp_path))
    b = resolve(f"file://{tmp_path}")
    assert isinstance(a.fs, pafs.LocalFileSystem) and a.path == b.path == str(tmp_path)
    f = a.join("x", "y.bin")
    f.write_bytes_atomic(b"hello")
    assert f.read_bytes() == b"hello" and f.size() == 5
    assert [p.uri for p in a.list_files()] == [f.uri]  # no temporary files left behind


def test_s3_uri_uses_explicit_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9999")
    loc = resolve("s3://bucket/some/prefix")
    assert loc.is_s3 and loc.path == "bucket/some/prefix" and loc.endpoint == "http://127.0.0.1:9999"
    # config wins over the environment
    loc = resolve("s3://bucket/p", S3Options(endpoint_url="http://127.0.0.1:1234"))
    assert loc.endpoint == "http://127.0.0.1:1234"


def test_bad_uris():
    with pytest.raises(StorageError, match="unsupported URI scheme 'gs'"):
        resolve("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        resolve("s3:///x")
    with pytest.raises(StorageError, match="empty store URI"):
        resolve("")


def test_unreachable_s3_endpoint_is_a_clear_error():
    port_nobody_listens_on = "http://127.0.0.1:9"
    loc = resolve("s3://nsd/store", S3Options(endpoint_url=port_nobody_listens_on, access_key_id="a",
                                              secret_access_key="b", max_attempts=1, connect_timeout_s=1))
    t0 = time.time()
    with pytest.raises(StorageError) as e:
        loc.join("manifest.json").exists()
    assert "cannot reach S3 endpoint http://127.0.0.1:9" in str(e.value)
    assert time.time() - t0 < 30


def test_s3_round_trip(s3_server):
    loc = resolve("s3://nsd/roundtrip", s3_server)
    f = loc.join("a/b.bin")
    f.write_bytes_atomic(b"\x00" * 1000)
    assert f.exists() and f.read_bytes() == b"\x00" * 1000
    assert [x.uri for x in loc.list_files()] == ["s3://nsd/roundtrip/a/b.bin"]


def test_s3_options_as_environment_for_mlflow_and_workers(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    env = S3Options(endpoint_url="http://127.0.0.1:5000", region="eu-west-1").env()
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:5000"
    assert env["AWS_ACCESS_KEY_ID"] == "from-env" and env["AWS_DEFAULT_REGION"] == "eu-west-1"
