"""A node-local cache of the stores' heavy per-image columns (decoded stimulus images, embedding tokens), as
memory-mapped ``.npy`` files.

The stimulus lookup joins images and frozen embeddings to trials by image id. Without this cache every read process
(and every train worker that draws augmented views) decodes whole shards into memory and keeps a few (an LRU of
``data.stimulus_cache_shards``); a block of trials decodes each shard it falls in once, and at NSD's scale a
session's 750 trials in random order fall in nearly all of its 146 shards of 500 images (~100 images decoded a
trial), while the decode itself is slow (a ViT-bigG token shard: 8.6 s per 213 MB of parquet float16;
``benchmarks/bench_datapath.py``). With ``data.local_cache`` set to a directory on each node's local disk,
a shard is decoded once per node into ``<dir>/<the shard's sha256>/<column>.npy``; every process of the node maps
those files (the page cache holds one copy, shared) and reads the rows it needs. The files are named by content:
a changed store never reads a stale copy, and two stores with the same shard share it.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections.abc import Callable

import numpy as np

from raydecode.data.schema import ShardInfo
from raydecode.errors import StoreError


class ShardCache:
    """Memory-mapped columns of shards under ``root``, built once per node by whichever process needs them first
    (the others wait on a file lock, then map the files it wrote)."""

    def __init__(self, root: str):
        self.root = root

    def columns(self, shard: ShardInfo, names: tuple[str, ...],
                build: Callable[[], dict[str, np.ndarray] | None]) -> dict[str, np.ndarray] | None:
        """``shard``'s arrays ``names`` (first axis: its rows), mapped read-only; ``build()`` makes them when the cache
        has none (or a copy of another length). ``None`` when ``build`` finds the shard not cacheable."""
        folder = os.path.join(self.root, shard.sha256)
        arrays = self._mapped(folder, names, shard.rows)
        if arrays is not None:
            return arrays
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, ".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # one decode per node; the rest wait for its files
                arrays = self._mapped(folder, names, shard.rows)
                if arrays is not None:
                    return arrays
                built = build()
                if built is None:
                    return None
                for name in names:
                    path = os.path.join(folder, f"{name}.npy")
                    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                    with open(tmp, "wb") as f:
                        np.save(f, np.ascontiguousarray(built[name]))
                    os.replace(tmp, path)  # readers see a whole file or none
        except OSError as exc:
            raise StoreError(f"data.local_cache {self.root}: cannot write the copy of {shard.path} ({exc.strerror or exc}); "
                             "free space there or unset data.local_cache") from None
        arrays = self._mapped(folder, names, shard.rows)
        if arrays is None:
            raise StoreError(f"data.local_cache {folder}: the copy of {shard.path} just written does not read back "
                             f"as {shard.rows} rows")
        return arrays

    @staticmethod
    def _mapped(folder: str, names: tuple[str, ...], rows: int) -> dict[str, np.ndarray] | None:
        try:
            arrays = {n: np.load(os.path.join(folder, f"{n}.npy"), mmap_mode="r") for n in names}
        except (OSError, ValueError):  # missing, or cut short: built again
            return None
        return arrays if all(len(a) == rows for a in arrays.values()) else None
