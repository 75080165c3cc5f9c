"""URI -> (pyarrow FileSystem, path): the only module that knows about S3.

Every reader and writer in raydecode (ingest, the Ray Data pipeline, Ray Train's
``storage_path``, MLflow artifacts) resolves its location here, so a store on a
laptop disk and a store in a bucket go through the same code.

S3 settings come from :class:`S3Options` (the ``s3`` block of every stage
config) and fall back to the standard AWS variables. pyarrow ignores
``AWS_ENDPOINT_URL_S3``, so the endpoint is always passed explicitly as
``endpoint_override``.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from raydecode.errors import StorageError

# credentials: never serialised (excluded from every dump: payloads, checkpoints, MLflow params), shown as ***
_SECRET = dict(exclude=True, repr=False)


class S3Options(BaseModel):
    """How to reach S3. Unset fields fall back to the standard AWS environment variables. Credentials set here
    are never written anywhere: they are left out of every dump, so workers find them in their environment (a
    local Ray inherits the driver's, where :meth:`raydecode.config.StageConfig.export_credentials` puts them; a
    cluster's nodes have their own: instance profile, service-account role, a Kubernetes Secret)."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: str | None = Field(
        None, description="e.g. http://127.0.0.1:5000; default AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL"
    )
    region: str | None = Field(None, description="default AWS_REGION or AWS_DEFAULT_REGION")
    access_key_id: SecretStr | None = Field(None, description="default AWS_ACCESS_KEY_ID (or the instance profile)",
                                            **_SECRET)
    secret_access_key: SecretStr | None = Field(None, description="default AWS_SECRET_ACCESS_KEY", **_SECRET)
    session_token: SecretStr | None = Field(None, description="default AWS_SESSION_TOKEN", **_SECRET)
    anonymous: bool = False
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(8, ge=1, le=20, description="attempts per request on transient errors (throttling, "
                                                          "5xx, timeouts), with AWS's exponential backoff")

    def resolved(self) -> "S3Options":
        """These options with the AWS environment variables filled in where unset."""
        env = os.environ

        def secret(value: SecretStr | None, name: str) -> SecretStr | None:
            return value or (SecretStr(env[name]) if env.get(name) else None)

        return self.model_copy(
            update={
                "endpoint_url": self.endpoint_url
                or env.get("AWS_ENDPOINT_URL_S3")
                or env.get("AWS_ENDPOINT_URL"),
                "region": self.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
                "access_key_id": secret(self.access_key_id, "AWS_ACCESS_KEY_ID"),
                "secret_access_key": secret(self.secret_access_key, "AWS_SECRET_ACCESS_KEY"),
                "session_token": secret(self.session_token, "AWS_SESSION_TOKEN"),
            }
        )

    def env(self, secrets: bool = True) -> dict[str, str]:
        """The same settings as AWS environment variables, for tools that read only those (boto3 in MLflow's
        artifact store); ``secrets=False``: the endpoint and region alone (what may travel in a Ray runtime env)."""
        o = self.resolved()
        out = {
            "AWS_ENDPOINT_URL_S3": o.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": o.endpoint_url,
            "AWS_REGION": o.region,
            "AWS_DEFAULT_REGION": o.region,
            # boto3 (MLflow's artifact uploads) retries like pyarrow here: standard mode, the same attempts
            "AWS_RETRY_MODE": os.environ.get("AWS_RETRY_MODE", "standard"),
            "AWS_MAX_ATTEMPTS": os.environ.get("AWS_MAX_ATTEMPTS", str(o.max_attempts)),
        }
        if secrets:
            out.update({"AWS_ACCESS_KEY_ID": _reveal(o.access_key_id),
                        "AWS_SECRET_ACCESS_KEY": _reveal(o.secret_access_key),
                        "AWS_SESSION_TOKEN": _reveal(o.session_token)})
        return {k: v for k, v in out.items() if v}


def without_userinfo(uri: str) -> str:
    """``uri`` without ``user:password@``: what may be printed, logged or serialised."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def userinfo(uri: str) -> tuple[str | None, str | None]:
    """The ``(user, password)`` of ``uri`` (URL-decoded), or Nones."""
    parts = urlsplit(uri)
    return (unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None)


WHOLE_WRITE_ATTEMPTS = 5
_TRANSIENT = ("slow_down", "slowdown", "service_unavailable", "internal_failure", "throttl", "network_connection",
              "timeout", "request_time_too_skewed", "503", "500")


def _transient(message: str) -> bool:
    """An S3 error worth trying again: throttling, 5xx, a dropped or slow connection."""
    low = message.lower()
    return any(t in low for t in _TRANSIENT)


def _reveal(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps its retry strategy when pickled. pyarrow pickles an ``S3FileSystem`` by its
    constructor's arguments but leaves ``retry_strategy`` out, so the copy a Ray task, a Ray Data read task or a Ray
    Train worker receives fell back to pyarrow's default (AWS's "standard" strategy, 3 attempts and a retry quota):
    a read there failed on a throttled stretch that the driver rides out."""

    def __init__(self, attempts: int, **kwargs):
        # AWS's "default" strategy: exponential backoff (25 ms x 2^n) and no retry quota. The "standard" one shares a
        # quota of 500 tokens per client, 5 per retry, so after ~100 throttled requests (a long streaming read through
        # a SlowDown burst) it stops retrying at all and the read fails; a training job would rather wait. Its
        # argument counts retries, not attempts.
        super().__init__(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=attempts - 1), **kwargs)
        self.attempts = attempts

    def __reduce__(self):
        return _rebuild_s3, (self.attempts, pafs.S3FileSystem.__reduce__(self)[1][0])


def _rebuild_s3(attempts: int, kwargs: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(attempts, **kwargs)


def _s3_filesystem(opts: S3Options) -> pafs.S3FileSystem:
    o = opts.resolved()
    kwargs: dict = {
        "connect_timeout": o.connect_timeout_s,
        "request_timeout": o.request_timeout_s,
    }
    if o.endpoint_url:
        ep = urlparse(o.endpoint_url if "://" in o.endpoint_url else f"https://{o.endpoint_url}")
        if ep.scheme not in ("http", "https") or not ep.netloc:
            raise StorageError(f"s3.endpoint_url {o.endpoint_url!r} is not an http(s) URL")
        kwargs["endpoint_override"] = ep.netloc
        kwargs["scheme"] = ep.scheme
        # A custom endpoint has no region discovery: default to us-east-1 instead of a lookup.
        kwargs["region"] = o.region or "us-east-1"
    elif o.region:
        kwargs["region"] = o.region
    if o.anonymous:
        kwargs["anonymous"] = True
    elif o.access_key_id and o.secret_access_key:
        kwargs["access_key"] = _reveal(o.access_key_id)
        kwargs["secret_key"] = _reveal(o.secret_access_key)
        if o.session_token:
            kwargs["session_token"] = _reveal(o.session_token)
    return RetryingS3FileSystem(o.max_attempts, **kwargs)


@dataclass(frozen=True)
class Location:
    """A directory or file in a store: a pyarrow filesystem, the path inside it, and the URI a user wrote."""

    fs: pafs.FileSystem
    path: str
    uri: str
    endpoint: str | None = None

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        uri = self.uri.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)
        return Location(self.fs, path, uri, self.endpoint)

    # -- errors ---------------------------------------------------------------------------
    def _fail(self, action: str, exc: Exception) -> StorageError:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if self.is_s3:
            low = msg.lower()
            if any(s in low for s in ("connect", "curl", "timeout", "timed out", "resolve host", "network")):
                where = self.endpoint or "the default AWS endpoint"
                return StorageError(f"cannot reach S3 endpoint {where} to {action} {self.uri}: {msg}")
            if any(s in low for s in ("access denied", "forbidden", "invalidaccesskeyid", "signature")):
                return StorageError(f"S3 refused to {action} {self.uri} (check credentials): {msg}")
            if "nosuchbucket" in low or "bucket does not exist" in low:
                return StorageError(f"S3 bucket of {self.uri} does not exist")
        return StorageError(f"cannot {action} {self.uri}: {msg}")

    # -- reading --------------------------------------------------------------------------
    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except Exception as exc:  # pyarrow raises OSError subclasses with curl/AWS text
            raise self._fail("look up", exc) from exc

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def size(self) -> int:
        return self.info().size or 0

    def read_bytes(self) -> bytes:
        try:
            # compression=None: the file's own bytes (pyarrow would otherwise gunzip a .gz by its name)
            with self.fs.open_input_stream(self.path, compression=None) as f:
                return f.read()
        except FileNotFoundError as exc:
            raise StorageError(f"missing file {self.uri}") from exc
        except Exception as exc:
            raise self._fail("read", exc) from exc

    def open_input_file(self):
        """A random-access file (what pyarrow.parquet needs to read a footer without the whole file)."""
        try:
            return self.fs.open_input_file(self.path)
        except FileNotFoundError as exc:
            raise StorageError(f"missing file {self.uri}") from exc
        except Exception as exc:
            raise self._fail("read", exc) from exc

    def list_files(self, recursive: bool = True) -> Iterator["Location"]:
        """Files under this directory (none if it does not exist)."""
        try:
            sel = pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
            infos = self.fs.get_file_info(sel)
        except Exception as exc:
            raise self._fail("list", exc) from exc
        base = self.path.rstrip("/") + "/"
        for fi in sorted(infos, key=lambda x: x.path):
            if fi.type == pafs.FileType.File:
                yield self.join(fi.path[len(base):] if fi.path.startswith(base) else fi.path)

    # -- writing --------------------------------------------------------------------------
    def write_bytes_atomic(self, data: bytes) -> None:
        """Write a whole file so that readers see either nothing or all of it.

        Local: write a temporary sibling, then rename. S3: a single PUT (an object
        only becomes visible when its upload completes)."""
        try:
            parent = posixpath.dirname(self.path)
            if not self.is_s3:
                self.fs.create_dir(parent, recursive=True)
                tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(self.path)}")
                try:
                    with self.fs.open_output_stream(tmp) as f:
                        f.write(data)
                    self.fs.move(tmp, self.path)
                finally:
                    if self.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
                        self.fs.delete_file(tmp)
            else:
                for attempt in range(WHOLE_WRITE_ATTEMPTS):
                    try:
                        with self.fs.open_output_stream(self.path) as f:
                            f.write(data)
                        break
                    except OSError as exc:  # each request was retried by the SDK already; a multipart upload's
                        # completion error embedded in a 200 reply gets only Arrow's own two tries: the whole
                        # object again (the write is idempotent)
                        if attempt + 1 == WHOLE_WRITE_ATTEMPTS or not _transient(str(exc)):
                            raise
                        time.sleep(0.2 * 2**attempt)
        except StorageError:
            raise
        except Exception as exc:
            raise self._fail("write", exc) from exc

    def delete(self) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._fail("delete", exc) from exc


def resolve(uri: str, s3: S3Options | None = None) -> Location:
    """Turn a plain path, ``file://`` URI or ``s3://bucket/prefix`` into a :class:`Location`."""
    if not uri or not str(uri).strip():
        raise StorageError("empty store URI")
    uri = str(uri).strip()
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"S3 URI {uri!r} has no bucket (expected s3://bucket/prefix)")
        opts = (s3 or S3Options()).resolved()
        fs = _s3_filesystem(opts)
        path = (parsed.netloc + "/" + parsed.path.lstrip("/")).rstrip("/")
        return Location(fs, path, "s3://" + path, opts.endpoint_url or None)
    if parsed.scheme in ("", "file"):
        local = parsed.path if parsed.scheme == "file" else uri
        path = os.path.abspath(os.path.expanduser(local))
        return Location(pafs.LocalFileSystem(), path, path)
    raise StorageError(f"unsupported URI scheme {parsed.scheme!r} in {uri!r} (use a path, file:// or s3://)")


def train_storage(uri: str, s3: S3Options | None = None) -> tuple[str, pafs.FileSystem]:
    """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``."""
    loc = resolve(uri, s3)
    return loc.path, loc.fs
