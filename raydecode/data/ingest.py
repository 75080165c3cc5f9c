"""Ingest: any source -> a complete store (shards first, manifest last).

A source describes the shards it would write (:class:`PlannedShard`, each with a
builder that makes its table on demand) and the manifest fields; this module
writes them through the store's writer, skipping shards an interrupted run
already wrote. Sources: ``synthetic`` (below), the raw NSD release
(:mod:`raydecode.data.nsd`) and MindEye2's preprocessed release
(:mod:`raydecode.data.mindeye2`).

A plan with :class:`TaskOptions` runs every shard as one Ray task (a cluster ingests all subjects and sessions side
by side, each task reading its files straight from the source bucket); without, the shards are built in this
process. Either way the driver shows the progress and writes the manifest last.

Shards of a release record the source files they were made from (path, bytes, sha256, modification time) in their
parquet metadata (:data:`NOTES_KEY`); a resumed ingest refuses to mix a shard with a source file that has changed
since, and the manifest lists every source file read (``source_files``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
from tqdm.auto import tqdm

from raydecode.data.schema import COCO_CATEGORIES, Manifest, SourceFile, SubjectInfo, subject_dir
from raydecode.data.store import StoreWriter, write_shard
from raydecode.data.synthetic import PRESETS, SyntheticNSD
from raydecode.errors import ConfigError, SourceError, user_error_in
from raydecode.runtime import cluster_shape
from raydecode.storage import Location, S3Options, resolve

NOTES_KEY = b"raydecode.ingest"  # parquet key-value metadata of a release shard: {"sources": {...}, "report": {...}}


@dataclass
class PlannedShard:
    path: str
    kind: str
    build: Callable[[], pa.Table]
    subject: SubjectInfo | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class TaskOptions:
    """Resources of the Ray task that builds and writes one shard."""

    num_cpus: float = 1.0
    memory_gb: float | None = None
    # how long to wait for a node that can run one (an autoscaler adding it) before saying none can
    wait_for_nodes_s: float = 600.0


@dataclass
class Plan:
    source: str
    source_params: dict
    shards: list[PlannedShard]
    stimulus_ids: set[int]
    manifest_fields: dict
    # source files read once by the planner (small files every shard depends on), by path under the source root
    source_files: dict[str, SourceFile] = field(default_factory=dict)
    # the source root, for re-checking a per-shard source file recorded by an interrupted run
    source_root: Location | None = None
    tasks: TaskOptions | None = None  # None: build the shards in this process
    # source files too large to read whole (e.g. NSD's 39 GB imgBrick, read image by image): shards record their
    # size and modification time; the driver hashes them for the manifest while the shards are being written
    large_files: list[str] = field(default_factory=list)
    # folds the shards' reports (e.g. the TR each time-series shard found) into manifest fields
    finish: Callable[[list[dict]], dict] | None = None


@dataclass
class IngestResult:
    manifest: Manifest
    status: str  # "written", "completed" (resumed a partial store) or "unchanged"
    written: int
    skipped: int
    seconds: float


# -- source files ------------------------------------------------------------------------------


def fingerprint(data: bytes, mtime_ns: int | None = None) -> dict:
    """What a shard records of one source file it read."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "mtime_ns": mtime_ns}


def with_notes(table: pa.Table, sources: dict[str, dict], report: dict | None = None) -> pa.Table:
    """``table`` carrying the source files it was made from (and a report for the planner) in its metadata."""
    notes = json.dumps({"sources": sources, "report": report or {}}, sort_keys=True).encode()
    return table.replace_schema_metadata({**(table.schema.metadata or {}), NOTES_KEY: notes})


def notes_of(kv: dict | None) -> dict:
    raw = (kv or {}).get(NOTES_KEY)
    return json.loads(raw) if raw else {"sources": {}, "report": {}}


def _hash_location(loc: Location, stop: threading.Event | None = None) -> str | None:
    """sha256 of a whole file, streamed; None if ``stop`` is set first (an ingest that failed does not wait for it)."""
    h = hashlib.sha256()
    with loc.open_input_file() as f:
        while chunk := f.read(16 << 20):
            if stop is not None and stop.is_set():
                return None
            h.update(chunk)
    return h.hexdigest()


def _check_unchanged(plan: Plan, shard_path: str, sources: dict[str, dict]) -> None:
    """An existing shard's source files must be the ones the source has now: a store never mixes two versions."""
    for rel, rec in sorted(sources.items()):
        now = plan.source_files.get(rel)
        if rec["sha256"] is None and plan.source_root is not None:  # a large file: its size and modification time
            info = plan.source_root.join(rel).info()
            same = info.size == rec["bytes"] and info.mtime_ns == rec.get("mtime_ns")
        elif now is not None:
            same = now.sha256 == rec["sha256"]
        elif plan.source_root is not None:
            loc = plan.source_root.join(rel)
            info = loc.info()
            if not loc.exists():
                raise SourceError(f"{loc.uri}: missing, but the partial store's {shard_path} was made from it")
            same = info.size == rec["bytes"] and (
                (rec.get("mtime_ns") is not None and info.mtime_ns == rec["mtime_ns"]) or _hash_location(loc) == rec["sha256"]
            )
        else:
            continue
        if not same:
            where = plan.source_root.join(rel).uri if plan.source_root is not None else rel
            raise SourceError(
                f"{where}: changed since the interrupted ingest wrote {shard_path} (sha256 was {rec['sha256'][:12]}); "
                "ingest into a new --out, or delete the partial store to start over"
            )


# -- writing --------------------------------------------------------------------------------


def _build_and_write(shard: PlannedShard, root: Location, stimulus_ids: set[int] | None):
    """Build one shard and write it (the body of a shard's Ray task, or of the in-process loop)."""
    table = shard.build()
    info = write_shard(root, shard.path, shard.kind, table, subject_info=shard.subject,
                       stimulus_ids=stimulus_ids if shard.kind == "trials" else None, **shard.meta)
    return info, notes_of(table.schema.metadata)


def _run_in_ray(plan: Plan, todo: list[PlannedShard], root: Location, bar) -> list[tuple]:
    import ray  # only plans with tasks need Ray (a synthetic ingest runs without it)

    opts: dict = {"num_cpus": plan.tasks.num_cpus}
    if plan.tasks.memory_gb:
        opts["memory"] = int(plan.tasks.memory_gb * 2**30)
    task = ray.remote(_build_and_write).options(**opts)
    ids = ray.put(plan.stimulus_ids)
    pending = {task.remote(s, root, ids): s for s in todo}
    out = []
    since = time.time()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=min(10.0, plan.tasks.wait_for_nodes_s))
            if not done:
                _check_schedulable(plan.tasks, time.time() - since)
                continue
            since = time.time()
            shard = pending.pop(done[0])
            try:
                out.append(ray.get(done[0]))
            except Exception as exc:
                err = user_error_in(exc)
                raise (err or SourceError(f"{shard.path}: building the shard failed ({exc})")) from exc
            bar.update()
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return out


def _check_schedulable(opts: TaskOptions, waited_s: float) -> None:
    """After ``wait_for_nodes_s`` without progress: refuse if no node the cluster can have (the autoscaler's node
    types, else the nodes alive now: :func:`raydecode.runtime.cluster_shape`) can run one task, instead of waiting
    forever on a task Ray can never place."""
    if waited_s < opts.wait_for_nodes_s:
        return
    shape = cluster_shape()
    nodes = shape.nodes
    memory = (opts.memory_gb or 0) * 2**30
    # an autoscaler node type that declares no memory is not refused for it (Ray learns it when the node starts)
    unknown = memory if shape.autoscaling else 0
    if any(r.get("CPU", 0) >= opts.num_cpus and r.get("memory", unknown) >= memory for r in nodes):
        return  # a node fits: the tasks are slow or queued, not unschedulable
    cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    mem = max((r.get("memory", 0) for r in nodes), default=0) / 2**30
    raise ConfigError(
        f"task_cpus {opts.num_cpus:g} / task_memory_gb {opts.memory_gb or 0:g}: no node of the cluster can run an "
        f"ingest task (the largest has {cpus:g} CPUs, {mem:.1f} GB) and none appeared in {waited_s:.0f} s; lower them "
        "or add nodes")


def run_ingest(plan: Plan, out: str, s3: S3Options | None = None, progress: bool = True) -> IngestResult:
    """Write ``plan`` to ``out``: a no-op over a complete store, a completion over a partial one.

    Nothing is visible to readers before every shard is written: on any error no manifest is written and a re-run
    keeps the shards already there."""
    t0 = time.time()
    root = resolve(out, s3)
    writer = StoreWriter(root, plan.source, plan.source_params)
    if writer.status == "complete":
        return IngestResult(writer.existing, "unchanged", 0, len(plan.shards), time.time() - t0)
    writer.begin()
    resumed = writer.status == "partial"
    notes: list[dict] = []
    todo: list[PlannedShard] = []
    kept: dict = {}

    def accept(path: str, metadata) -> bool:  # an interrupted run's shard: whole, and from the same source files
        kept[path] = notes_of(metadata.metadata)
        _check_unchanged(plan, path, kept[path]["sources"])
        return True

    for shard in plan.shards:
        check = functools.partial(accept, shard.path)
        if writer.existing_shard(shard.path, shard.kind, accept=check, **shard.meta) is not None:
            notes.append(kept[shard.path])
        else:
            todo.append(shard)
    skipped = len(plan.shards) - len(todo)
    bar = tqdm(total=len(plan.shards), initial=skipped, desc=f"ingest {plan.source}", unit="shard",
               disable=not progress)
    hashing, stop = ThreadPoolExecutor(max_workers=1), threading.Event()
    large = {rel: hashing.submit(_hash_location, plan.source_root.join(rel), stop)
             for rel in plan.large_files if plan.source_root is not None}
    ok = False
    try:
        if plan.tasks is not None and todo:
            results = _run_in_ray(plan, todo, root, bar)
        else:
            results = []
            for shard in todo:
                results.append(_build_and_write(shard, root, plan.stimulus_ids))
                bar.update()
        ok = True
    finally:
        bar.close()
        if not ok:
            stop.set()
        hashing.shutdown(wait=False, cancel_futures=True)
    for info, n in results:
        writer.add(info)
        notes.append(n)
    fields = dict(plan.manifest_fields)
    if plan.finish is not None:
        fields.update(plan.finish([n["report"] for n in notes]))
    files = dict(plan.source_files)
    for rel, future in large.items():
        loc = plan.source_root.join(rel)
        files[rel] = SourceFile(path=rel, bytes=loc.size(), sha256=future.result())
    for n in notes:
        for rel, rec in n["sources"].items():
            if rec["sha256"] is not None:
                files.setdefault(rel, SourceFile(path=rel, bytes=rec["bytes"], sha256=rec["sha256"]))
    if files:
        fields["source_files"] = sorted(files.values(), key=lambda f: f.path)
    manifest = writer.finalize(**fields)
    return IngestResult(manifest, "completed" if resumed else "written", len(todo), skipped, time.time() - t0)


# -- the synthetic source ---------------------------------------------------------------------


def synthetic_plan(preset: str, seed: int, timeseries: bool = True, subjects: list[int] | None = None) -> Plan:
    world = SyntheticNSD(PRESETS[preset], seed)
    p = world.preset
    subjects = subjects or list(range(1, p.n_subjects + 1))
    bad = [s for s in subjects if not 1 <= s <= p.n_subjects]
    if bad or len(set(subjects)) != len(subjects):
        what = f"subject {', '.join(map(str, bad))}:" if bad else f"subjects {subjects}: a subject listed twice;"
        raise SourceError(f"{what} the synthetic {preset} preset has subjects 1..{p.n_subjects}")
    shards: list[PlannedShard] = []
    for n, ids in enumerate(world.stimulus_shards()):
        shards.append(
            PlannedShard(
                f"stimuli/part-{n:05d}.parquet", "stimuli", (lambda ids=ids: world.stimuli_table(ids)),
                meta={"image_id_min": int(ids[0]), "image_id_max": int(ids[-1])},
            )
        )
    infos = []
    for s in subjects:
        info = world.subject_info(s)
        infos.append(info)
        cache: dict = {}

        def subj(s=s, cache=cache):  # build a subject's maps once, only if one of its shards is needed
            if "subj" not in cache:
                cache["subj"], cache["sched"] = world.subject(s), world.schedule(s)
            return cache["subj"], cache["sched"]

        sd = subject_dir(s)
        shards.append(PlannedShard(f"voxels/{sd}.parquet", "voxels", lambda s=s, subj=subj: world.voxels_table(s, subj()[0]), info, {"subject": s}))
        for sess in range(1, info.sessions + 1):
            meta = {"subject": s, "session": sess}
            shards.append(
                PlannedShard(f"trials/{sd}/part-{sess:05d}.parquet", "trials",
                             lambda s=s, sess=sess, subj=subj: world.trials_table(s, sess, *subj()), info, meta)
            )
            if timeseries:
                shards.append(
                    PlannedShard(f"timeseries/{sd}/part-{sess:05d}.parquet", "timeseries",
                                 lambda s=s, sess=sess, subj=subj: world.timeseries_table(s, sess, *subj()), info, meta)
                )
    return Plan(
        source="synthetic",
        source_params={"preset": preset, "seed": seed, "timeseries": timeseries, "subjects": subjects},
        shards=shards,
        stimulus_ids=set(range(p.n_images)),
        manifest_fields=dict(
            tr_s=p.tr_s,
            image_size=(p.image_size, p.image_size),
            n_images=p.n_images,
            categories=list(COCO_CATEGORIES),
            subjects=infos,
            shared_test_image_ids=[int(i) for i in world.shared_test_ids],
        ),
    )
