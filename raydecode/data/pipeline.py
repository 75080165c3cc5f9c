"""Ray Data pipeline: datasets from a store, for training (streaming split) and evaluation.

Files are selected from the manifest (subjects, sessions), never by listing a
bucket, then read through :class:`raydecode.data.source.ShardSource` (a Ray
datasource planned from the manifest) with the store's pyarrow filesystem, so
the same code streams a local directory or an S3 prefix.

Betas of subjects with different voxel counts share one dataset: each row
carries ``betas`` (float32, zero-padded to the widest selected subject) and
``n_voxels``; a model's per-subject ridge reads ``betas[:, :n_voxels]``.

Stimuli (images, categories) and frozen embeddings are joined by image id in
the read tasks (a ``map_batches`` fused with the read): each worker process
keeps one :class:`StimulusLookup` across tasks and epochs, reads only the
stimulus shards its batches point at (shards are sorted by image id and the
manifest holds their ranges) and keeps a bounded cache of them, so betas are
never shuffled across the cluster and no process holds the whole store.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydecode.config import DataSelection
from raydecode.data.schema import ShardInfo
from raydecode.data.shardcache import ShardCache
from raydecode.data.store import Store, open_store
from raydecode.errors import ConfigError, StoreError
from raydecode.storage import S3Options

TRIAL_COLUMNS = ("subject", "session", "run", "trial", "image_id", "repetition", "split", "betas")


def betas_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Values per row of a betas column (fixed-size or, after Ray unifies subjects' schemas, variable lists)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_list(arr.type):
        return np.full(len(arr), arr.type.list_size, np.int32)
    return pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int32)


def betas_matrix(col: pa.ChunkedArray | pa.Array, width: int | None = None) -> np.ndarray:
    """(rows, width) float32 from a betas list column, each row zero-padded to ``width``."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = betas_lengths(arr)
    flat = np.asarray(arr.flatten().to_numpy(zero_copy_only=False), np.float32)
    n = len(lengths)
    width = int(width if width is not None else (lengths.max() if n else 0))
    if n and (lengths == lengths[0]).all():
        out = flat.reshape(n, int(lengths[0]))
        return np.pad(out, ((0, 0), (0, width - out.shape[1]))) if width > out.shape[1] else out
    out = np.zeros((n, width), np.float32)
    rows = np.repeat(np.arange(n), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out[rows, np.arange(len(flat)) - np.repeat(starts, lengths)] = flat
    return out


def _decode_betas(batch: pa.Table, width: int) -> dict[str, np.ndarray]:
    """pyarrow batch -> numpy batch with float32, zero-padded betas and n_voxels."""
    out: dict[str, np.ndarray] = {}
    for name in batch.column_names:
        if name == "betas":
            out["betas"] = betas_matrix(batch["betas"], width)
            out["n_voxels"] = betas_lengths(batch["betas"])
        else:
            out[name] = batch[name].to_numpy(zero_copy_only=False)
    return out


REPEATS = 3  # NSD shows each shared image 3 times


def _average_repeats(group: dict[str, np.ndarray], keep_repeats: bool = False) -> dict[str, np.ndarray]:
    """One row per (subject, image): betas (or BOLD windows) averaged over repetitions (MindEye's test protocol).
    ``keep_repeats``: also ``betas_repeats`` (1, 3, width), the repetitions in acquisition order, an image seen
    fewer times repeating its own (MindEye2's reference: [a, a, a] / [a, b, a]), for a model that averages its
    outputs over them."""
    out = {}
    if keep_repeats and "betas" in group:
        order = np.lexsort(tuple(group[k] for k in ("trial", "run", "session") if k in group))
        out["betas_repeats"] = group["betas"][np.resize(order, REPEATS)][None].astype(np.float32)
    for name, values in group.items():
        if name in ("betas", "bold"):
            out[name] = values.mean(0, keepdims=True).astype(np.float32)
        elif name == "repetition":
            out[name] = np.array([len(values)], np.int8)
        else:
            out[name] = values[:1]
    return out


def pick_one_trial(group: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """One presentation of a (subject, image) group, drawn from (seed, subject, image): the same row whatever
    the order rows arrive in or how they are batched."""
    order = np.lexsort(tuple(group[k] for k in ("window_end_s", "trial", "run", "session") if k in group))
    rng = np.random.default_rng([seed, int(group["subject"][0]), int(group["image_id"][0])])
    i = order[rng.integers(len(order))]
    return {name: values[i: i + 1] for name, values in group.items()}


def test_grouping(sel: "DataSelection", split: str):
    """The per-(subject, image) reduction of the test split (``(fn, kwargs)``), or None: averaged repetitions
    (MindEye's protocol) or one drawn presentation (Dynadiff's single-trial protocol)."""
    if split != "test":
        return None
    if sel.average_test_repeats:
        return _average_repeats, {"keep_repeats": sel.keep_test_repeats}
    if sel.single_test_trial_seed is not None:
        return pick_one_trial, {"seed": sel.single_test_trial_seed}
    return None


def group_test(ds, sel: "DataSelection", split: str, n_subjects: int):
    """:func:`test_grouping` on a Ray dataset (call inside :func:`small_shuffles`)."""
    grouping = test_grouping(sel, split)
    if grouping is None:
        return ds
    fn, kwargs = grouping
    return ds.groupby(["subject", "image_id"], num_partitions=max(1, n_subjects)).map_groups(
        fn, fn_kwargs=kwargs, batch_format="numpy", num_cpus=sel.read_cpus)


def embedding_column(encoder: str, part: str) -> str:
    """Batch column of an encoder's joined embeddings (``part``: tokens or pooled), flattened float32."""
    return f"{part}.{encoder}"


def check_embeddings(store: Store, encoders: list[str]) -> None:
    """Refuse, before any reading, encoders the store has no embeddings for or whose shards do not match the manifest."""
    for e in encoders:
        if e not in store.manifest.embeddings or not store.manifest.shards_of("embeddings", encoder=e):
            have = ", ".join(store.manifest.embeddings) or "none"
            raise StoreError(f"store {store.uri} has no embeddings for encoder {e!r} (it has: {have}); "
                             f"run `raydecode embed --store {store.uri} --encoder {e}` first")
    if encoders:
        store.check_schemas(("embeddings",), encoders=list(encoders))


def _decode_images(table: pa.Table) -> list[np.ndarray]:
    """A stimulus table's encoded images as uint8 H x W x 3 arrays."""
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table["image"].to_pylist()]


class StimulusLookup:
    """Adds stimulus (and embedding) columns to batches by image id, reading shards on demand.

    Used as a Ray Data actor class: the store is opened once per actor; at most ``cache_shards`` decoded shards are
    kept (least recently used first out). With ``local_cache`` (``data.local_cache``: a directory on the node's own
    disk) images and embeddings are decoded once per node into memory-mapped files (:mod:`raydecode.data.shardcache`)
    and every shard stays mapped: rows are read from the page cache, shared by the node's processes."""

    def __init__(self, store_uri: str, s3: dict | None, images: bool, embeddings: list[str], cache_shards: int,
                 local_cache: str | None = None):
        self.store = open_store(store_uri, S3Options(**(s3 or {})), check=False)
        self.images = images
        self.embeddings = embeddings
        self.cache: OrderedDict[str, dict[int, dict[str, Any]]] = OrderedDict()
        self.mapped: dict[str, dict[int, dict[str, Any]]] = {}  # shards served from the local cache: never evicted
        self.cache_shards = cache_shards
        self.local = ShardCache(local_cache) if local_cache else None
        m = self.store.manifest
        self.stim_shards = m.shards_of("stimuli")
        self.emb_shards = {e: m.shards_of("embeddings", encoder=e) for e in embeddings}
        for e, shards in self.emb_shards.items():
            if not shards:
                raise StoreError(f"store {self.store.uri} has no embeddings for encoder {e!r}; run `raydecode embed` first")

    def _load(self, shard: ShardInfo, kind: str) -> dict[int, dict[str, Any]]:
        if shard.path in self.mapped:
            return self.mapped[shard.path]
        if shard.path in self.cache:
            self.cache.move_to_end(shard.path)
            return self.cache[shard.path]
        if self.local is not None:
            rows = self._stimuli_mapped(shard) if kind == "stimuli" else self._embeddings_mapped(shard)
            if rows is not None:
                self.mapped[shard.path] = rows
                return rows
        if kind == "stimuli":
            table = self.store.read_shard(shard, None if self.images else ["image_id", "categories", "caption"])
            images = _decode_images(table) if self.images else None
            rows = self._stimulus_rows(table, images)
        else:
            ids, tokens, pooled = self._embeddings(shard)
            rows = {i: {"tokens": tokens[n], "pooled": pooled[n]} for n, i in enumerate(ids.tolist())}
        self.cache[shard.path] = rows
        while len(self.cache) > self.cache_shards:
            self.cache.popitem(last=False)
        return rows

    @staticmethod
    def _stimulus_rows(table: pa.Table, images: np.ndarray | list | None) -> dict[int, dict[str, Any]]:
        ids = table["image_id"].to_pylist()
        cats = np.asarray(table["categories"].combine_chunks().flatten()).reshape(len(ids), -1)
        captions = table["caption"].to_pylist()
        rows: dict[int, dict[str, Any]] = {}
        for n, i in enumerate(ids):
            rows[i] = {"categories": cats[n], "caption": captions[n]}
            if images is not None:
                rows[i]["image"] = images[n]
        return rows

    def _stimuli_mapped(self, shard: ShardInfo) -> dict[int, dict[str, Any]] | None:
        """Categories and captions read from the shard (small columns), its decoded images mapped from the local
        cache (``None``: images of different sizes, which one array cannot hold)."""
        table = self.store.read_shard(shard, ["image_id", "categories", "caption"])
        images = None
        if self.images:
            def build() -> dict[str, np.ndarray] | None:
                decoded = _decode_images(self.store.read_shard(shard, ["image"]))
                return {"image": np.stack(decoded)} if len({a.shape for a in decoded}) == 1 else None

            mapped = self.local.columns(shard, ("image",), build)
            if mapped is None:
                return None
            images = mapped["image"]
        return self._stimulus_rows(table, images)

    def _embeddings_mapped(self, shard: ShardInfo) -> dict[int, dict[str, Any]]:
        def build() -> dict[str, np.ndarray]:
            ids, tokens, pooled = self._embeddings(shard)
            return {"image_id": ids, "tokens": tokens, "pooled": pooled}

        a = self.local.columns(shard, ("image_id", "tokens", "pooled"), build)
        return {i: {"tokens": a["tokens"][n], "pooled": a["pooled"][n]} for n, i in enumerate(a["image_id"].tolist())}

    def _embeddings(self, shard: ShardInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image ids, tokens, pooled) of an embedding shard. Tokens: the encoder's token array flattened row-major
        (a fixed-size list of float16), kept float16 (batches are cast on their device: half the bytes through the
        object store, and no 2.5 s conversion per 213 MB shard of ViT-bigG's tokens; benchmarks/bench_datapath.py)."""
        table = self.store.read_shard(shard)
        ids = table["image_id"].to_numpy().astype(np.int64)
        info = self.store.manifest.embeddings.get(shard.encoder or "")
        if info is None:
            raise StoreError(f"{self.store.location(shard).uri}: encoder {shard.encoder!r} is not in the manifest's 'embeddings'")
        out = []
        for name, width in (("tokens", int(np.prod(info.tokens_shape))), ("pooled", info.pooled_dim)):
            flat = table[name].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            if flat.size != len(ids) * width:
                raise StoreError(f"{self.store.location(shard).uri}: field '{name}' does not hold {width} values per image "
                                 f"(encoder {shard.encoder!r}); run `raydecode info --verify`")
            out.append(flat.reshape(len(ids), width))
        return ids, out[0], out[1]

    def _gather(self, shards: list[ShardInfo], kind: str, image_ids: np.ndarray, fields: tuple[str, ...]) -> dict:
        """``fields`` of the rows of ``image_ids``, in their order, as arrays (lists for captions). Each shard the ids
        fall in is loaded once per call and its rows copied out before the next: a batch in random trial order decodes
        each of its shards at most once, where a row-by-row walk through the LRU decoded a shard every few rows
        (paper-shaped store, 10 shards, LRU of 4: 0.6 decodes a row; ``benchmarks/bench_datapath.py``), and no
        decoded shard outlives its place in the LRU for a view into it."""
        ids = np.asarray(image_ids, dtype=np.int64)
        out: dict[str, Any] = {}
        found = np.zeros(len(ids), dtype=bool)
        for shard in shards:
            at = np.flatnonzero((ids >= shard.image_id_min) & (ids <= shard.image_id_max) & ~found)
            if not len(at) and (out or len(ids)):  # (an empty batch still takes its columns' shapes from a shard)
                continue
            rows = self._load(shard, kind)
            if not out and rows:  # the fields' shapes and dtypes from any row of the first shard loaded
                like = next(iter(rows.values()))
                out = {f: [None] * len(ids) if f == "caption" else
                       np.empty((len(ids), *np.shape(like[f])), dtype=np.asarray(like[f]).dtype) for f in fields}
            for n in at.tolist():
                row = rows.get(int(ids[n]))
                if row is not None:
                    found[n] = True
                    for f in fields:
                        out[f][n] = row[f]
        if not found.all():
            raise StoreError(f"image {int(ids[~found][0])} is missing from the {kind} of store {self.store.uri}")
        return out

    def captions(self, image_ids: np.ndarray) -> list[str]:
        """The stimuli's captions of ``image_ids`` (text-reading target encoders; batches carry no strings)."""
        return self._gather(self.stim_shards, "stimuli", image_ids, ("caption",))["caption"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["image_id"]
        batch.update(self._gather(self.stim_shards, "stimuli", ids, ("categories", "image") if self.images else
                                  ("categories",)))
        for e, shards in self.emb_shards.items():
            emb = self._gather(shards, "embeddings", ids, ("tokens", "pooled"))
            batch[embedding_column(e, "tokens")] = emb["tokens"]
            batch[embedding_column(e, "pooled")] = emb["pooled"]
        return batch


@contextmanager
def small_shuffles():
    """Datasets created inside use Ray Data's sort-based pull shuffle: for the averaged test split (a few thousand
    rows at most) it starts in ~2 s, where the default actor-based hash shuffle takes ~7 s on 2 cores."""
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    ctx = DataContext.get_current()
    old, ctx.shuffle_strategy = ctx.shuffle_strategy, ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = old


def deal_blocks(ds, n: int) -> list:
    """A materialized dataset as ``n`` materialized parts of equal row counts, the same on every call: its non-empty
    blocks dealt in turn (block i to part i mod n, in read order; ``streaming_split`` hands them out much like this,
    but per epoch and through a coordinator actor), then cut equal (``split(n, equal=True)`` moves the few rows the
    deal leaves uneven to the next part and drops at most n - 1). A plain ``split`` cuts the read order into n
    contiguous runs instead."""
    import ray.data

    rows = [m.num_rows for bundle in ds.iter_internal_ref_bundles() for m in bundle.metadata]
    refs = [ref for ref, k in zip(ds.to_arrow_refs(), rows, strict=True) if k]  # empty blocks (train_trials) dealt none
    dealt = [ref for k in range(n) for ref in refs[k::n]]
    parts = (ray.data.from_arrow_refs(dealt) if dealt else ds).split(n, equal=True)
    for part in parts:  # a new dataset snapshots the driver's context: keep the source's (no progress bars)
        part.context.enable_progress_bars = ds.context.enable_progress_bars
    return parts


def train_order(sel: DataSelection, split: str) -> int | None:
    """The seed of the train split's one random shard order (the same every epoch and after a restart; rows are
    mixed per epoch by the train loop's seeded local shuffle); None (store order) for other splits."""
    return sel.seed if sel.shuffle and split == "train" else None


def read_tasks(sel: DataSelection) -> dict:
    """The resources of the read tasks and of every map fused into them (Ray Data fuses only maps that share them):
    ``data.read_cpus`` each, at most ``data.read_concurrency`` at once."""
    return {"num_cpus": sel.read_cpus, "concurrency": sel.read_concurrency}


def only_split(ds, split: str, sel: DataSelection):
    """The rows of ``ds`` whose ``split`` column is ``split`` (fused into the read tasks)."""
    from ray.data.expressions import col

    return ds.filter(expr=col("split") == split, **read_tasks(sel))


@dataclass
class TrialsDataset:
    """A Ray dataset of trials and what a model needs to know about it."""

    dataset: Any  # ray.data.Dataset
    subjects: list[int]
    voxels: dict[int, int]
    width: int  # betas are zero-padded to this many values
    files: list[str] = field(default_factory=list)


def _select(store: Store | str, sel: DataSelection, s3: S3Options | None):
    """Open the store and check a selection against its manifest -> (store, subjects, voxels, trial shards)."""
    if isinstance(store, str):
        store = open_store(store, s3)
    subjects = store.check_subjects(sel.subjects, sel.hold_out)
    sessions = store.check_sessions(subjects, sel.sessions)
    check_embeddings(store, sel.embeddings)
    shards = store.manifest.shards_of("trials", subjects=subjects, sessions=sessions)
    return store, subjects, {s: store.manifest.subject(s).voxels for s in subjects}, shards


def trials_dataset(
    store: Store | str,
    split: str,
    selection: DataSelection | None = None,
    s3: S3Options | None = None,
) -> TrialsDataset:
    """Trials of one split as a Ray dataset (one row per trial, or per image with averaged test repeats)."""
    sel = selection or DataSelection()
    if split not in ("train", "test"):
        raise ConfigError(f"split {split!r}: allowed values: train, test")
    if test_grouping(sel, split) is not None:
        with small_shuffles():
            return _trials_dataset(store, split, sel, s3)
    return _trials_dataset(store, split, sel, s3)


def _trials_dataset(store: Store | str, split: str, sel: DataSelection, s3: S3Options | None) -> TrialsDataset:
    store, subjects, voxels, shards = _select(store, sel, s3)
    width = max(voxels.values())
    from raydecode.data.source import read_store_shards  # Ray is imported where it is used

    ds = read_store_shards(store.root, shards, list(TRIAL_COLUMNS), train_order(sel, split), **read_tasks(sel))
    ds = only_split(ds, split, sel)
    if split == "train" and sel.train_trials is not None:
        ds = ds.map_batches(_keep_first, fn_kwargs={"cutoffs": train_cutoffs(store, shards, sel.train_trials)},
                            batch_format="pyarrow", **read_tasks(sel))
    ds = ds.map_batches(_decode_betas, fn_kwargs={"width": width}, batch_format="pyarrow", **read_tasks(sel))
    ds = with_stimuli(group_test(ds, sel, split, len(subjects)), store, sel)
    return TrialsDataset(ds, subjects, voxels, width, [s.path for s in shards])


def _acquisition_key(table: pa.Table) -> np.ndarray:
    """(session, run, trial) packed in one int64 that sorts in acquisition order."""
    col = lambda name: table[name].to_numpy().astype(np.int64)  # noqa: E731
    return col("session") * 10**8 + col("run") * 10**4 + col("trial")


def train_cutoffs(store: Store, shards: list[ShardInfo], n: int) -> dict[int, int]:
    """Per subject, the acquisition key of its ``n``-th train trial among ``shards`` (read from the small columns
    only): keeping the keys up to it keeps the subject's first ``n`` train trials."""
    keys: dict[int, list[np.ndarray]] = {}
    for shard in shards:
        table = store.read_shard(shard, ["session", "run", "trial", "split"])
        keys.setdefault(shard.subject, []).append(_acquisition_key(table.filter(pc.equal(table["split"], "train"))))
    cutoffs = {}
    for subject, parts in sorted(keys.items()):
        ordered = np.sort(np.concatenate(parts))
        if len(ordered) < n:
            raise ConfigError(f"data.train_trials {n}: subject {subject} has {len(ordered)} train trials in the "
                              "selected sessions")
        cutoffs[subject] = int(ordered[n - 1])
    return cutoffs


def _keep_first(batch: pa.Table, cutoffs: dict[int, int]) -> pa.Table:
    subject = batch["subject"].to_numpy()
    limit = np.array([cutoffs[int(s)] for s in subject], dtype=np.int64)
    return batch.filter(pa.array(_acquisition_key(batch) <= limit))


def with_stimuli(ds, store: Store, sel: DataSelection):
    """The selection's stimulus columns (categories, images, embeddings) added by image id in the read tasks
    themselves (fused with the read: no actor pool to start again every epoch, no extra hop through the object
    store): each worker process keeps one :class:`StimulusLookup` across tasks and epochs (:func:`lookup_stimuli`);
    ``ds`` unchanged when the selection asks for none."""
    if not (sel.categories or sel.images or sel.embeddings):
        return ds
    args = (store.uri, store.s3.model_dump() if store.s3 else None, sel.images, list(sel.embeddings),
            sel.stimulus_cache_shards, sel.local_cache)
    return ds.map_batches(lookup_stimuli, fn_kwargs={"args": args}, batch_format="numpy", **read_tasks(sel))


_LOOKUP: tuple[str, StimulusLookup] | None = None  # this process's lookup, kept between Ray tasks


def lookup_stimuli(batch: dict[str, np.ndarray], args: tuple) -> dict[str, np.ndarray]:
    """``batch`` with its stimulus columns, through this process's :class:`StimulusLookup` for ``args`` (made on
    first use, replaced when ``args`` change: a worker process holds at most one lookup's cache). Ray reuses its
    worker processes across tasks and executions, so an epoch finds the shards the last one decoded (the actor pool
    this replaces started new processes every epoch: a demo epoch with categories took 3.5 s instead of 1.0 s,
    benchmarks/bench_data.py)."""
    global _LOOKUP
    key = repr(args)
    if _LOOKUP is None or _LOOKUP[0] != key:
        _LOOKUP = None  # the old cache goes before the new one fills
        _LOOKUP = (key, StimulusLookup(*args))
    return _LOOKUP[1](batch)


def train_datasets(store: Store | str, selection: DataSelection | None = None, s3: S3Options | None = None) -> dict:
    """``{"train": ..., "test": ...}`` for ``TorchTrainer(datasets=...)``; the train split is
    streamed and split across workers (Ray Train's default ``DataConfig``)."""
    return {
        "train": trials_dataset(store, "train", selection, s3).dataset,
        "test": trials_dataset(store, "test", selection, s3).dataset,
    }


def read_split(store: Store | str, split: str, selection: DataSelection | None = None,
               s3: S3Options | None = None) -> dict[str, np.ndarray]:
    """The same rows as :func:`trials_dataset`, read with pyarrow into memory (no Ray): for small
    evaluation sets, checkpoint checks in a fresh process and in-memory baselines."""
    sel = selection or DataSelection()
    store, subjects, voxels, shards = _select(store, sel, s3)
    width = max(voxels.values())
    tables = [store.read_shard(s, list(TRIAL_COLUMNS)) for s in shards]
    tables = [t.filter(pc.equal(t["split"], split)) for t in tables]
    parts = [_decode_betas(t, width) for t in tables if t.num_rows]
    batch = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]} if parts else {}
    return finish_in_memory(store, batch, split, sel)


def finish_in_memory(store: Store, batch: dict[str, np.ndarray], split: str, sel: DataSelection) -> dict:
    """In-memory rows (trials or windows) -> what the Ray pipeline would give: test repetitions averaged (or one
    drawn) per (subject, image) when selected, then the stimulus / embedding columns joined."""
    grouping = test_grouping(sel, split)
    if batch and grouping is not None:
        fn, kwargs = grouping
        keys = batch["subject"].astype(np.int64) * 10**7 + batch["image_id"]
        groups = [fn({n: v[keys == k] for n, v in batch.items()}, **kwargs) for k in np.unique(keys)]
        batch = {n: np.concatenate([g[n] for g in groups]) for n in groups[0]}
    if batch and (sel.categories or sel.images or sel.embeddings):
        lookup = StimulusLookup(store.uri, store.s3.model_dump() if store.s3 else None, sel.images,
                                sel.embeddings, sel.stimulus_cache_shards, sel.local_cache)
        batch = lookup(batch)
    return batch
