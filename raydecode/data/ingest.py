"""Ingest: any source -> a complete store (shards first, manifest last).

A source describes the shards it would write (:class:`PlannedShard`, each with a
builder that makes its table on demand) and the manifest fields; this module
writes them through :class:`~raydecode.data.store.StoreWriter`, skipping
shards an interrupted run already wrote. Sources: ``synthetic`` here; raw NSD
and MindEye2's release plug in the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
from tqdm.auto import tqdm

from raydecode.data.schema import COCO_CATEGORIES, Manifest, SubjectInfo, subject_dir
from raydecode.data.store import StoreWriter
from raydecode.data.synthetic import PRESETS, SyntheticNSD
from raydecode.storage import S3Options, resolve


@dataclass
class PlannedShard:
    path: str
    kind: str
    build: Callable[[], pa.Table]
    subject: SubjectInfo | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Plan:
    source: str
    source_params: dict
    shards: list[PlannedShard]
    stimulus_ids: set[int]
    manifest_fields: dict


@dataclass
class IngestResult:
    manifest: Manifest
    status: str  # "written", "completed" (resumed a partial store) or "unchanged"
    written: int
    skipped: int
    seconds: float


def synthetic_plan(preset: str, seed: int, timeseries: bool = True, subjects: list[int] | None = None) -> Plan:
    world = SyntheticNSD(PRESETS[preset], seed)
    p = world.preset
    subjects = subjects or list(range(1, p.n_subjects + 1))
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


def run_ingest(plan: Plan, out: str, s3: S3Options | None = None, progress: bool = True) -> IngestResult:
    """Write ``plan`` to ``out``: a no-op over a complete store, a completion over a partial one."""
    t0 = time.time()
    writer = StoreWriter(resolve(out, s3), plan.source, plan.source_params)
    if writer.status == "complete":
        return IngestResult(writer.existing, "unchanged", 0, len(plan.shards), time.time() - t0)
    resumed = writer.status == "partial"
    written = skipped = 0
    bar = tqdm(plan.shards, desc=f"ingest {plan.source}", unit="shard", disable=not progress)
    for shard in bar:
        if writer.existing_shard(shard.path, shard.kind, **shard.meta) is not None:
            skipped += 1
            continue
        table = shard.build()
        writer.write_shard(
            shard.path, shard.kind, table, subject_info=shard.subject,
            stimulus_ids=plan.stimulus_ids if shard.kind == "trials" else None, **shard.meta,
        )
        written += 1
    manifest = writer.finalize(**plan.manifest_fields)
    return IngestResult(manifest, "completed" if resumed else "written", written, skipped, time.time() - t0)
