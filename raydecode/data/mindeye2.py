"""MindEye2's preprocessed NSD release -> a store (``raydecode ingest mindeye2``).

The layout of the ``pscotti/mindeyev2`` dataset (MindEye2's README and loaders), relative to its root:

- ``betas_all_subjNN_fp32_renorm.hdf5``: dataset ``betas``, float32 (sessions x 750, voxels): the nsdgeneral
  voxels of every trial, z-scored per voxel; row = global trial ``(session - 1) * 750 + trial``.
- ``wds/subjNN/train/{0..S-1}.tar`` (one per session) and ``wds/subjNN/new_test/0.tar`` (the shared images'
  trials): webdataset samples whose ``behav.npy`` is a (1, 17) float array; columns 0: the 0-based 73k image id,
  1: subject, 2: session, 3: run, 4: trial in the run, 5: the global trial (the row of the betas file); -1 is NaN.
- ``shared1000.npy``: bool (73000,), the shared images (the test split).
- ``coco_images_224_float16.hdf5``: dataset ``images``, (73000, 3, 224, 224) float16 in [0, 1].

The release has no voxel coordinates: with ``nsd`` (an NSD release root holding
``nsddata/ppdata/subjNN/func1pt8mm/roi/nsdgeneral.nii.gz``) each voxel gets the mask's (i, j, k), in the mask's C
order, and its ROI labels; without, the voxels lie on a (voxels, 1, 1) line and the manifest lists
"voxel coordinates" under ``absent``. Categories and captions come from COCO's annotations (``coco``) through the
NSD release's ``nsd_stim_info_merged.csv``.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raydecode.data.ingest import Plan, PlannedShard, TaskOptions, with_notes
from raydecode.data.nsd import (
    ROI_FILES,
    SUBJECTS,
    Annotations,
    Layout,
    Release,
    VoxelsShard,
    image_size,
    open_hdf5,
    read_coco,
    read_layout,
    read_stim_info,
    source_file,
    stimuli_shards,
)
from raydecode.data.schema import COCO_CATEGORIES, SubjectInfo, repetitions, subject_dir, trials_schema
from raydecode.errors import SourceError
from raydecode.storage import S3Options, resolve

IMAGES = "coco_images_224_float16.hdf5"
SHARED = "shared1000.npy"
TRIALS_PER_SESSION = 750
BEHAV_COLUMNS = 17
IMAGE, SUBJECT, SESSION, RUN, TRIAL_IN_RUN, GLOBAL_TRIAL = range(6)


def betas_path(subject: int) -> str:
    return f"betas_all_subj{subject:02d}_fp32_renorm.hdf5"


def wds_dir(subject: int) -> str:
    return f"wds/subj{subject:02d}"


def read_behav(release: Release, subject: int, sources: dict) -> np.ndarray:
    """Every trial's ``behav`` row (train tars and ``new_test``), sorted by global trial."""
    folder = wds_dir(subject)
    tars = [f"{folder}/train/{n}" for n in release.names(f"{folder}/train") if n.endswith(".tar")]
    tars += [f"{folder}/new_test/{n}" for n in release.names(f"{folder}/new_test") if n.endswith(".tar")]
    if not tars:
        raise SourceError(f"{release.loc(folder).uri}: no train/*.tar or new_test/*.tar (MindEye2's webdataset "
                          f"shards of subject {subject})")
    rows = []
    for rel in tars:
        data, fp = release.read(rel, "a webdataset shard")
        sources[rel] = fp
        uri = release.loc(rel).uri
        try:
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for member in tar:
                    if not member.name.endswith(".behav.npy") or posixpath.basename(member.name).count(".") != 2:
                        continue
                    arr = np.load(io.BytesIO(tar.extractfile(member).read()))
                    if arr.shape != (1, BEHAV_COLUMNS):
                        raise SourceError(f"{uri}: {member.name} has shape {arr.shape}, expected (1, {BEHAV_COLUMNS})")
                    rows.append(arr[0])
        except (tarfile.TarError, ValueError, EOFError) as exc:
            raise SourceError(f"{uri}: not a readable webdataset tar ({exc})") from exc
    if not rows:
        raise SourceError(f"{release.loc(folder).uri}: the tars hold no behav.npy samples")
    behav = np.stack(rows).astype(np.int64)
    behav = behav[np.argsort(behav[:, GLOBAL_TRIAL], kind="stable")]
    g = behav[:, GLOBAL_TRIAL]
    where = release.loc(folder).uri
    if (behav[:, SUBJECT] != subject).any():
        raise SourceError(f"{where}: behav column 1 (subject) holds other subjects than {subject}")
    if (np.diff(g) == 0).any():
        raise SourceError(f"{where}: global trial {int(g[np.flatnonzero(np.diff(g) == 0)[0]])} appears twice")
    if (behav[:, IMAGE] < 0).any() or (behav[:, IMAGE] >= 73000).any() or (g < 0).any():
        raise SourceError(f"{where}: behav columns 0 (73k id) or 5 (global trial) hold values out of range")
    if ((g // TRIALS_PER_SESSION + 1) != behav[:, SESSION]).any():
        raise SourceError(f"{where}: behav column 2 (session) disagrees with column 5 (global trial // 750 + 1)")
    return behav


@dataclass
class MindEye2TrialsShard:
    """One session of one subject: the betas rows its trials point at, read from the subject's betas file."""

    release: Release
    subject: int
    session: int
    behav: np.ndarray  # this session's rows, sorted by global trial
    repetition: np.ndarray
    split: list[str]
    voxels: int
    sources: dict

    def __call__(self) -> pa.Table:
        rel = betas_path(self.subject)
        loc = self.release.loc(rel)
        rows = self.behav[:, GLOBAL_TRIAL]
        with loc.open_input_file() as fobj:
            f, d = open_hdf5(fobj, loc.uri, "betas", 2)
            with f:
                if d.shape[1] != self.voxels or d.shape[0] <= rows.max():
                    raise SourceError(f"{loc.uri}: dataset 'betas' has shape {tuple(d.shape)}, expected "
                                      f"(>{int(rows.max())} trials, {self.voxels} voxels)")
                lo, hi = int(rows.min()), int(rows.max()) + 1
                betas = np.asarray(d[lo:hi], np.float32)[rows - lo]  # one contiguous read per session
        n, v = len(rows), betas.shape[1]
        table = pa.Table.from_pydict(
            {
                "subject": pa.array(np.full(n, self.subject), pa.int16()),
                "session": pa.array(np.full(n, self.session), pa.int16()),
                "run": pa.array(self.behav[:, RUN], pa.int16()),
                "trial": pa.array(rows - (self.session - 1) * TRIALS_PER_SESSION + 1, pa.int32()),
                "image_id": pa.array(self.behav[:, IMAGE], pa.int32()),
                "repetition": pa.array(self.repetition, pa.int8()),
                "split": self.split,
                "onset_s": pa.array(np.full(n, np.nan), pa.float32()),  # the release has no onsets
                "betas": pa.FixedSizeListArray.from_arrays(pa.array(betas.astype(np.float16).ravel(), pa.float16()), v),
            },
            schema=trials_schema(v),
        )
        return with_notes(table, self.sources)


def _shared_images(release: Release, sources: dict) -> set[int]:
    """The shared (test) images from ``shared1000.npy``: a boolean mask over NSD's 73k ids."""
    data, fp = release.read(SHARED, "the shared-image mask")
    sources[SHARED] = fp
    try:
        shared_mask = np.load(io.BytesIO(data))
    except ValueError as exc:
        raise SourceError(f"{release.loc(SHARED).uri}: not a .npy file ({exc})") from exc
    if shared_mask.shape != (73000,) or shared_mask.dtype != bool:
        raise SourceError(f"{release.loc(SHARED).uri}: {shared_mask.dtype} {shared_mask.shape}, expected bool (73000,)")
    return set(np.flatnonzero(shared_mask).tolist())


def _subject_layout(nsd_release: Release | None, s: int, v: int, betas_uri: str, roi_files: tuple[str, ...],
                    sources: dict) -> tuple[Layout, dict]:
    """Voxel coordinates and ROI labels from NSD's nsdgeneral mask (its voxel count must match the betas'), or the
    release's voxel order on a (V, 1, 1) line without one."""
    if nsd_release is None:
        return Layout((v, 1, 1), np.stack([np.arange(v), np.zeros(v, int), np.zeros(v, int)], 1),
                      ["nsdgeneral"] * v), {}
    layout_sources: dict = {}
    layout = read_layout(nsd_release, s, roi_files, layout_sources)
    if len(layout.coords) != v:
        raise SourceError(f"{nsd_release.loc(f'nsddata/ppdata/subj{s:02d}/func1pt8mm/roi/nsdgeneral.nii.gz').uri}: "
                          f"{len(layout.coords)} voxels, but {betas_uri} has {v}")
    layout_sources = {f"nsd/{k}": x for k, x in layout_sources.items()}
    sources.update(layout_sources)
    return layout, layout_sources


def _subject_shards(release: Release, nsd_release: Release | None, s: int, shared: set[int],
                    roi_files: tuple[str, ...], sources: dict):
    """Subject ``s``'s voxel table and one trials shard per session from its betas file and behav records;
    returns its :class:`SubjectInfo`, the shards and the image ids its trials show."""
    rel = betas_path(s)
    loc = release.loc(rel)
    if not loc.exists():
        raise SourceError(f"{loc.uri}: missing (subject {s}'s betas)")
    with loc.open_input_file() as fobj:
        f, d = open_hdf5(fobj, loc.uri, "betas", 2)
        with f:
            n_rows, v = (int(x) for x in d.shape)
    behav_sources: dict = {}
    behav = read_behav(release, s, behav_sources)
    sources.update(behav_sources)
    if behav[:, GLOBAL_TRIAL].max() >= n_rows:
        raise SourceError(f"{loc.uri}: {n_rows} rows, but behav points at row {int(behav[:, GLOBAL_TRIAL].max())}")
    layout, layout_sources = _subject_layout(nsd_release, s, v, loc.uri, roi_files, sources)
    ids = behav[:, IMAGE]
    rep = repetitions(ids)
    split = np.array(["test" if i in shared else "train" for i in ids.tolist()])
    sessions = sorted(set(behav[:, SESSION].tolist()))
    info = SubjectInfo(
        subject=s, voxels=v, grid_shape=layout.grid_shape, sessions=len(sessions),
        runs=len({(a, b) for a, b in behav[:, [SESSION, RUN]].tolist()}),
        trials={sp: int((split == sp).sum()) for sp in ("train", "test")},
        images={sp: len(set(ids[split == sp].tolist())) for sp in ("train", "test")},
    )
    sd = subject_dir(s)
    shards = [PlannedShard(f"voxels/{sd}.parquet", "voxels", VoxelsShard(layout, layout_sources), info,
                           {"subject": s})]
    stat = release.stat(rel, f"subject {s}'s betas")
    for sess in sessions:
        sel = behav[:, SESSION] == sess
        shards.append(PlannedShard(
            f"trials/{sd}/part-{sess:05d}.parquet", "trials",
            MindEye2TrialsShard(release, s, sess, behav[sel], rep[sel], split[sel].tolist(), v,
                                {**behav_sources, rel: stat}),
            info, {"subject": s, "session": sess}))
    return info, shards, set(ids.tolist())


def mindeye2_plan(
    source: str,
    source_s3: S3Options | None = None,
    subjects: list[int] | None = None,
    nsd: str | None = None,
    coco: str | None = None,
    roi_files: tuple[str, ...] = ROI_FILES,
    images_per_shard: int = 500,
    tasks: TaskOptions | None = None,
) -> Plan:
    release = Release(resolve(source, source_s3))
    nsd_release = Release(resolve(nsd, source_s3)) if nsd else None
    subjects = list(subjects) if subjects else [s for s in SUBJECTS if release.exists(betas_path(s))]
    if not subjects:
        raise SourceError(f"{release.root.uri}: no betas_all_subjNN_fp32_renorm.hdf5 (is this MindEye2's release?)")
    bad = [s for s in subjects if s not in SUBJECTS]
    if bad:
        raise SourceError(f"subject {', '.join(map(str, bad))}: NSD has subjects 1..8")
    if len(set(subjects)) != len(subjects):
        raise SourceError(f"subjects {subjects}: a subject listed twice")
    sources: dict[str, dict] = {}
    shared = _shared_images(release, sources)
    absent = ["timeseries", "trial onsets"]
    shards: list[PlannedShard] = []
    infos: list[SubjectInfo] = []
    seen: set[int] = set()
    large = []
    for s in subjects:
        info, planned, ids = _subject_shards(release, nsd_release, s, shared, tuple(roi_files), sources)
        infos.append(info)
        shards += planned
        seen |= ids
        large.append(betas_path(s))
    if nsd_release is None:
        absent.append("voxel coordinates")
    all_ids = np.array(sorted(seen), np.int64)
    stim_sources: dict = {}
    if coco:
        if nsd_release is None:
            raise SourceError("coco: the COCO annotations are matched through NSD's nsd_stim_info_merged.csv; "
                              "also give nsd (an NSD release root)")
        info_csv = read_stim_info(nsd_release, stim_sources)
        ann = read_coco(coco, source_s3, all_ids, info_csv, stim_sources)
        stim_sources = {k if k.startswith("coco/") else f"nsd/{k}": x for k, x in stim_sources.items()}
    else:
        ann = Annotations()
        absent += ["categories", "captions"]
    sources.update(stim_sources)
    hw = image_size(release, IMAGES, "images", channels_first=True)
    shards += stimuli_shards(release, all_ids, shared, ann, {**stim_sources, IMAGES: release.stat(IMAGES, "images")},
                             images_per_shard, path=IMAGES, dataset="images", channels_first=True)
    return Plan(
        source="mindeye2",
        source_params={"release": release.root.uri, "subjects": subjects, "nsd": nsd_release.root.uri if nsd_release
                       else None, "coco": bool(coco), "roi_files": list(roi_files) if nsd_release else [],
                       "betas": "betas_all_subjNN_fp32_renorm (z-scored per voxel by MindEye2)",
                       "voxel_order": "C order of the nsdgeneral mask's (i, j, k)" if nsd_release else "release"},
        shards=shards,
        stimulus_ids=set(all_ids.tolist()),
        manifest_fields=dict(
            tr_s=None, image_size=hw, n_images=len(all_ids), categories=list(COCO_CATEGORIES), subjects=infos,
            shared_test_image_ids=sorted(int(i) for i in all_ids if int(i) in shared), absent=absent,
        ),
        source_files={rel: source_file(rel, rec) for rel, rec in sources.items()},
        source_root=release.root,
        tasks=tasks,
        large_files=large + [IMAGES],
    )
