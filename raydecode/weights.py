"""Pretrained weights from where labs keep them: a local path, an ``s3://`` prefix or a Hugging Face hub reference.

Every weights field (OpenCLIP image encoders, VAEs, diffusion UNet / unCLIP directories, metric networks) goes
through :func:`local_weights` on the node that loads it, which returns a local path:

- ``/path`` or ``file:///path``: used as it is (it must exist on that node: a shared volume, the node image);
- ``s3://bucket/prefix`` (a file or a directory): copied once per node into ``RAYDECODE_WEIGHTS_CACHE`` (default
  ``~/.cache/raydecode/weights``), under a key made of the URI and each object's size and ETag (its checksum), so
  a changed object is fetched again and an unchanged one never; one process per node downloads (a file lock),
  the others wait and reuse it. S3 settings come from the node's environment (``AWS_ENDPOINT_URL_S3``, the
  instance profile / service-account role), as everywhere else in raydecode;
- ``hf://ORG/REPO[@REVISION][/PATH]``: the Hugging Face hub's own reference form, resolved through the standard HF
  cache (``HF_HOME`` / ``HF_HUB_CACHE``); ``HF_HUB_OFFLINE=1`` is honoured, so a cache filled beforehand (the node
  image, a volume) works with no network.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path

from raydecode.errors import ConfigError, StorageError
from raydecode.storage import S3Options, resolve

HF_REF = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^/]+))?(?:/(?P<path>.+))?$")
COMPLETE = ".raydecode-complete.json"


def cache_root() -> Path:
    return Path(os.environ.get("RAYDECODE_WEIGHTS_CACHE") or Path.home() / ".cache" / "raydecode" / "weights")


def is_local(ref: str) -> bool:
    return not ref.startswith(("s3://", "hf://"))


def check_reference(ref: str, what: str) -> None:
    """Syntax only (the driver may not hold the weights its workers load): a malformed reference fails early."""
    if ref.startswith("hf://") and not HF_REF.match(ref):
        raise ConfigError(f"{what}: {ref!r} is not a Hugging Face reference (hf://ORG/REPO[@REVISION][/PATH])")
    if ref.startswith("s3://") and len(ref) <= len("s3://") + 1:
        raise ConfigError(f"{what}: {ref!r} names no bucket")


def local_weights(ref: str, what: str, include: tuple[str, ...] | None = None) -> Path:
    """A local path holding the weights ``ref`` names (fetched into this node's cache the first time). ``include``
    (glob patterns of paths under ``ref``, e.g. ``("*.json",)``) fetches only those files: a driver that builds a
    model on the meta device to count its parameters needs the configs, not gigabytes of weights."""
    check_reference(ref, what)
    if ref.startswith("s3://"):
        return _from_s3(ref, what, include)
    if ref.startswith("hf://"):
        return _from_hf(ref, what, include)
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
    if not path.exists():
        raise ConfigError(f"{what}: weights {ref!r} do not exist on this node (a local path must be on every node "
                          "that loads it; s3:// and hf:// references are fetched)")
    return path


def _from_s3(uri: str, what: str, include: tuple[str, ...] | None) -> Path:
    from pyarrow import fs as pafs

    loc = resolve(uri, S3Options())
    try:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            files = [info]
            base = posixpath.dirname(loc.path)
        elif info.type == pafs.FileType.Directory:
            files = [f for f in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
                     if f.type == pafs.FileType.File]
            base = loc.path
        else:
            files = []
    except OSError as exc:
        raise StorageError(f"{what}: cannot list {uri}: {str(exc).splitlines()[0]}") from None
    if not files:
        raise ConfigError(f"{what}: weights {uri} do not exist (no object at or under it)")
    if include is not None:
        files = [f for f in files if any(fnmatch.fnmatch(posixpath.relpath(f.path, base), g) for g in include)]
    try:
        listing = sorted((posixpath.relpath(f.path, base), f.size, _etag(loc.fs, f.path)) for f in files)
    except OSError as exc:
        raise StorageError(f"{what}: cannot read {uri}: {str(exc).splitlines()[0]}") from None
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:24]
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    target = root / key
    name = posixpath.basename(loc.path.rstrip("/"))
    result = target / name if info.type == pafs.FileType.File else target
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others wait here, then reuse it
        if (target / COMPLETE).exists():
            return result
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            for rel, size, _ in listing:
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with loc.fs.open_input_stream(posixpath.join(base, rel)) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out, length=8 << 20)
                if dest.stat().st_size != size:
                    raise StorageError(f"{what}: {uri}/{rel} arrived with {dest.stat().st_size} bytes, listed {size}")
            (tmp / COMPLETE).write_text(json.dumps({"uri": uri, "files": listing}))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"{what}: fetching {uri} failed: {str(exc).splitlines()[0]}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def _etag(fs, path: str) -> str:
    """The object's ETag (its checksum for a plain upload; a HEAD request, nothing is read)."""
    with fs.open_input_stream(path) as f:
        meta = f.metadata() or {}
        value = meta.get("ETag") or meta.get(b"ETag") or b""
        return (value.decode() if isinstance(value, bytes) else str(value)).strip('"')


def _from_hf(ref: str, what: str, include: tuple[str, ...] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    m = HF_REF.match(ref)
    assert m is not None  # check_reference
    repo, rev, sub = m["repo"], m["rev"], (m["path"] or "").strip("/")
    patterns = [sub, f"{sub}/*"] if sub else None
    if include is not None:
        patterns = [f"{sub}/{g}" if sub else g for g in include]
    try:
        snapshot = Path(snapshot_download(repo, revision=rev, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{what}: {ref} is not in the Hugging Face cache ({_hf_cache()})"
                          + ("; HF_HUB_OFFLINE is set, so nothing is downloaded: fill the cache first"
                             if offline else " and could not be downloaded")) from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ConfigError(f"{what}: {ref}: {str(exc).splitlines()[0]}") from None
    path = snapshot / sub if sub else snapshot
    if not path.exists():
        raise ConfigError(f"{what}: {ref}: the snapshot {snapshot} has no {sub!r}")
    return path


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
