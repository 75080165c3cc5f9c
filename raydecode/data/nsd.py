"""The Natural Scenes Dataset as released -> a store (``raydecode ingest nsd``).

Reads the release's own layout under a local directory or an ``s3://`` prefix (the public bucket reads
anonymously: ``source_s3.anonymous: true``). Paths, relative to the release root:

- ``nsddata/experiments/nsd/nsd_expdesign.mat`` (MAT v5): ``masterordering`` (1 x trials, 1-based index into a
  subject's 10,000 images, one per trial in presentation order), ``subjectim`` (8 x 10,000, 1-based 73k ids),
  ``sharedix`` (1 x 1,000, 1-based 73k ids of the shared images), ``stimpattern`` (sessions x runs x trial slots,
  1 where a slot shows an image: 750 trials a session, 63 in odd runs and 62 in even ones).
- ``nsddata/experiments/nsd/nsd_stim_info_merged.csv``: ``nsdId`` (0-based 73k id), ``cocoId``, ``cocoSplit``,
  ``shared1000``.
- ``nsddata/ppdata/subjNN/func1pt8mm/roi/nsdgeneral.nii.gz``: 1 inside the ROI; the voxels' (i, j, k) and their
  order (C order over the NIfTI's axes). Optional ROI volumes of the same grid (``prf-visualrois``,
  ``Kastner2015``, ``streams``) label them.
- ``nsddata_betas/ppdata/subjNN/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_sessionSS.hdf5``: dataset ``betas``,
  int16 percent signal change x 300, (trials, Z, Y, X) as h5py reads MATLAB's X x Y x Z x trials.
- ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5``: dataset ``imgBrick``, (73,000, 425, 425, 3) uint8.
- with time series: ``nsddata_timeseries/ppdata/subjNN/func1pt8mm/timeseries/timeseries_sessionSS_runRR.nii.gz``
  (X, Y, Z, volumes; the TR is the header's) and ``.../design/design_sessionSS_runRR.tsv`` (one integer per
  volume: the 1-based 73k id of the image whose trial starts there, 0 for none). Sessions with rest runs have 14
  runs; runs without stimuli are skipped, the others numbered 1..12 as in ``stimpattern``.
- optional COCO 2017 annotations (``--coco DIR``: ``instances_{train,val}2017.json``,
  ``captions_{train,val}2017.json``) give the 80 categories and a caption per image.

Store ids are NSD's 0-based 73k ids (``nsdId``, the row of ``imgBrick``, MindEye2's ``behav[:, 0]``). A trial's
image is ``subjectim[subject - 1, masterordering[t] - 1] - 1``; images in ``sharedix`` are the test split.
"""

from __future__ import annotations

import gzip
import io
import json
import posixpath
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pyarrow as pa
from PIL import Image

from raydecode.data.ingest import Plan, PlannedShard, TaskOptions, fingerprint, with_notes
from raydecode.data.schema import (
    COCO_CATEGORIES,
    N_CATEGORIES,
    SourceFile,
    SubjectInfo,
    repetitions,
    stimuli_schema,
    subject_dir,
    timeseries_schema,
    trials_schema,
    voxels_schema,
)
from raydecode.errors import SourceError, StorageError
from raydecode.storage import Location, S3Options, resolve

EXPDESIGN = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
STIMULI = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
BETA_SCALE = 300.0  # NSD stores betas as int16 percent signal change x 300
TRIAL_S = 4.0  # a trial slot: 3 s image + 1 s gap
N_IMAGES = 73_000
SUBJECTS = tuple(range(1, 9))
NORMALIZE = ("session-zscore", "none")
ROI_FILES = ("prf-visualrois", "Kastner2015", "streams")
# label tables of NSD's ROI volumes (nsddata/freesurfer/subjNN/label/<name>.mgz.ctab; a ctab in the release wins)
ROI_LABELS = {
    "prf-visualrois": ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"),
    "Kastner2015": ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4", "VO1", "VO2", "PHC1", "PHC2", "TO2", "TO1",
                    "LO2", "LO1", "V3B", "V3A", "IPS0", "IPS1", "IPS2", "IPS3", "IPS4", "IPS5", "SPL1", "FEF"),
    "streams": ("early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"),
}


def roi_path(subject: int, name: str) -> str:
    return f"nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi/{name}.nii.gz"


def ctab_path(subject: int, name: str) -> str:
    return f"nsddata/freesurfer/subj{subject:02d}/label/{name}.mgz.ctab"


def betas_dir(subject: int) -> str:
    return f"nsddata_betas/ppdata/subj{subject:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"


def betas_path(subject: int, session: int) -> str:
    return f"{betas_dir(subject)}/betas_session{session:02d}.hdf5"


def timeseries_path(subject: int, session: int, run: int) -> str:
    return f"nsddata_timeseries/ppdata/subj{subject:02d}/func1pt8mm/timeseries/timeseries_session{session:02d}_run{run:02d}.nii.gz"


def design_path(subject: int, session: int, run: int) -> str:
    return f"nsddata_timeseries/ppdata/subj{subject:02d}/func1pt8mm/design/design_session{session:02d}_run{run:02d}.tsv"


# -- reading release files ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """A release root (local or S3); every read is fingerprinted for the shard or the manifest."""

    root: Location

    def loc(self, rel: str) -> Location:
        return self.root.join(rel)

    def exists(self, rel: str) -> bool:
        return self.loc(rel).exists()

    def read(self, rel: str, what: str) -> tuple[bytes, dict]:
        """The bytes of ``rel`` and its fingerprint; a missing file is an error naming it and what it is."""
        loc = self.loc(rel)
        try:
            info = loc.info()
            data = loc.read_bytes()
        except StorageError as exc:
            if "missing file" in str(exc):
                raise SourceError(f"{loc.uri}: missing ({what})") from exc
            raise
        return data, fingerprint(data, info.mtime_ns)

    def stat(self, rel: str, what: str) -> dict:
        loc = self.loc(rel)
        info = loc.info()
        if not loc.exists():
            raise SourceError(f"{loc.uri}: missing ({what})")
        return {"bytes": int(info.size), "sha256": None, "mtime_ns": info.mtime_ns}

    def names(self, rel_dir: str) -> list[str]:
        base = self.loc(rel_dir)
        return sorted(posixpath.basename(f.path) for f in base.list_files(recursive=False))


def source_file(rel: str, rec: dict) -> SourceFile:
    return SourceFile(path=rel, bytes=rec["bytes"], sha256=rec["sha256"])


def read_nifti(data: bytes, uri: str):
    """A NIfTI-1 image from the bytes of a .nii or .nii.gz file."""
    import nibabel as nib

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        return nib.Nifti1Image.from_bytes(raw)
    except Exception as exc:
        raise SourceError(f"{uri}: not a readable NIfTI-1 file ({exc})") from exc


def open_hdf5(data_or_file, uri: str, dataset: str, ndim: int):
    """(file, dataset) of an HDF5 source; a missing dataset or wrong rank is an error naming both."""
    import h5py

    try:
        f = h5py.File(io.BytesIO(data_or_file) if isinstance(data_or_file, bytes) else data_or_file, "r")
    except Exception as exc:
        raise SourceError(f"{uri}: not a readable HDF5 file ({exc})") from exc
    if dataset not in f:
        names = ", ".join(sorted(f.keys())) or "none"
        f.close()
        raise SourceError(f"{uri}: no dataset '{dataset}' (datasets: {names})")
    d = f[dataset]
    if d.ndim != ndim:
        f.close()
        raise SourceError(f"{uri}: dataset '{dataset}' has shape {d.shape}, expected {ndim} axes")
    return f, d


# -- the experiment design -----------------------------------------------------------------------------------------


@dataclass
class ExpDesign:
    """``nsd_expdesign.mat`` in the terms a store needs."""

    masterordering: np.ndarray  # (trials,) 1-based into a subject's 10k images
    subjectim: np.ndarray  # (8, 10000) 1-based 73k ids
    shared: np.ndarray  # sorted 0-based 73k ids of the shared images
    stimpattern: np.ndarray  # (sessions, runs, slots) bool

    @classmethod
    def parse(cls, data: bytes, uri: str) -> "ExpDesign":
        from scipy.io import loadmat

        try:
            mat = loadmat(io.BytesIO(data))
        except Exception as exc:
            raise SourceError(f"{uri}: not a readable MATLAB file ({exc})") from exc
        for key in ("masterordering", "subjectim", "sharedix", "stimpattern"):
            if key not in mat:
                raise SourceError(f"{uri}: no variable '{key}' (is this nsd_expdesign.mat?)")
        order = np.asarray(mat["masterordering"]).astype(np.int64).ravel()
        subjectim = np.asarray(mat["subjectim"]).astype(np.int64)
        shared = np.asarray(mat["sharedix"]).astype(np.int64).ravel()
        pattern = np.asarray(mat["stimpattern"])
        if subjectim.ndim != 2 or subjectim.shape[0] != len(SUBJECTS):
            raise SourceError(f"{uri}: variable 'subjectim' has shape {subjectim.shape}, expected (8, images per subject)")
        if order.min() < 1 or order.max() > subjectim.shape[1]:
            raise SourceError(f"{uri}: variable 'masterordering' holds values outside 1..{subjectim.shape[1]}")
        if subjectim.min() < 1 or subjectim.max() > N_IMAGES or shared.min() < 1 or shared.max() > N_IMAGES:
            raise SourceError(f"{uri}: variable 'subjectim' or 'sharedix' holds ids outside 1..{N_IMAGES}")
        if pattern.ndim != 3 or int((pattern > 0).sum()) != len(order):
            raise SourceError(f"{uri}: variable 'stimpattern' (shape {pattern.shape}) does not mark one slot per trial "
                              f"of 'masterordering' ({len(order)} trials)")
        return cls(order, subjectim, np.unique(shared - 1), pattern > 0)

    @property
    def n_sessions(self) -> int:
        return self.stimpattern.shape[0]

    def session_trials(self, session: int) -> np.ndarray:
        """Global (0-based) trial indices of a session, in presentation order."""
        counts = self.stimpattern.sum(axis=(1, 2))
        start = int(counts[: session - 1].sum())
        return np.arange(start, start + int(counts[session - 1]))

    def run_and_slot(self, session: int) -> tuple[np.ndarray, np.ndarray]:
        """For each trial of a session: its run (1-based) and its slot within the run (0-based)."""
        runs, slots = np.nonzero(self.stimpattern[session - 1])
        return runs + 1, slots

    def image_ids(self, subject: int) -> np.ndarray:
        """0-based 73k id of every trial of ``subject`` (all sessions, presentation order)."""
        return self.subjectim[subject - 1, self.masterordering - 1] - 1

    def repetitions(self, subject: int) -> np.ndarray:
        """1-based showing of each trial's image, counted over all of the subject's trials."""
        return repetitions(self.image_ids(subject))


@dataclass
class Layout:
    """A subject's voxels: the nsdgeneral mask's (i, j, k) in C order and their ROI labels."""

    grid_shape: tuple[int, int, int]
    coords: np.ndarray  # (V, 3)
    roi: list[str]

    @property
    def box(self) -> tuple[slice, slice, slice]:
        lo, hi = self.coords.min(0), self.coords.max(0) + 1
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _ctab(data: bytes) -> dict[int, str]:
    out = {}
    for line in data.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].lstrip("-").isdigit():
            out[int(parts[0])] = parts[1]
    return out


def read_layout(release: Release, subject: int, roi_files: tuple[str, ...], sources: dict) -> Layout:
    rel = roi_path(subject, "nsdgeneral")
    data, fp = release.read(rel, f"subject {subject}'s nsdgeneral mask")
    sources[rel] = fp
    img = read_nifti(data, release.loc(rel).uri)
    mask = np.asarray(img.dataobj)
    if mask.ndim != 3:
        raise SourceError(f"{release.loc(rel).uri}: shape {mask.shape}, expected a 3D volume")
    inside = mask > 0.5
    if not inside.any():
        raise SourceError(f"{release.loc(rel).uri}: no voxel is 1 (an empty nsdgeneral mask)")
    coords = np.argwhere(inside)  # C order over (i, j, k), as NSD's loaders index the mask
    labels = np.array([""] * len(coords), dtype=object)
    for name in roi_files:
        path = roi_path(subject, name)
        if not release.exists(path):
            continue
        rdata, rfp = release.read(path, f"subject {subject}'s {name} ROIs")
        sources[path] = rfp
        vol = np.asarray(read_nifti(rdata, release.loc(path).uri).dataobj)
        if vol.shape != mask.shape:
            raise SourceError(f"{release.loc(path).uri}: shape {vol.shape} differs from nsdgeneral's {mask.shape}")
        table = dict(enumerate(ROI_LABELS.get(name, ()), start=1))
        ctab = ctab_path(subject, name)
        if release.exists(ctab):
            cdata, cfp = release.read(ctab, f"{name} label table")
            sources[ctab] = cfp
            table = _ctab(cdata)
        values = np.rint(vol[inside]).astype(np.int64)
        for n in np.unique(values[values > 0]):
            sel = (values == n) & (labels == "")
            labels[sel] = table.get(int(n), f"{name}:{int(n)}")
    labels[labels == ""] = "nsdgeneral"
    return Layout(tuple(int(x) for x in mask.shape), coords, labels.tolist())


# -- shard builders (picklable: each runs in its own Ray task) ------------------------------------------------------


@dataclass
class VoxelsShard:
    layout: Layout
    sources: dict

    def __call__(self) -> pa.Table:
        c = self.layout.coords
        table = pa.Table.from_pydict(
            {"voxel": pa.array(np.arange(len(c)), pa.int32()), "i": pa.array(c[:, 0], pa.int16()),
             "j": pa.array(c[:, 1], pa.int16()), "k": pa.array(c[:, 2], pa.int16()), "roi": self.layout.roi},
            schema=voxels_schema().with_metadata({"grid_shape": ",".join(map(str, self.layout.grid_shape))}),
        )
        return with_notes(table, self.sources)


@dataclass
class TrialsShard:
    """One session of one subject: the betas of the nsdgeneral voxels, one row per trial."""

    release: Release
    subject: int
    session: int
    layout: Layout
    image_id: np.ndarray
    repetition: np.ndarray
    run: np.ndarray
    slot: np.ndarray
    split: list[str]
    normalize: str
    shared_sources: dict

    def __call__(self) -> pa.Table:
        rel = betas_path(self.subject, self.session)
        uri = self.release.loc(rel).uri
        data, fp = self.release.read(rel, f"subject {self.subject} session {self.session} betas")
        f, d = open_hdf5(data, uri, "betas", 4)
        with f:
            n = len(self.image_id)
            expected = (n, *self.layout.grid_shape[::-1])
            if tuple(d.shape) != expected:
                raise SourceError(
                    f"{uri}: dataset 'betas' has shape {tuple(d.shape)}, expected {expected} (trials x Z x Y x X of "
                    f"the nsdgeneral mask's grid {self.layout.grid_shape})")
            betas = read_masked_betas(d, self.layout.coords).astype(np.float32) / BETA_SCALE
        if self.normalize == "session-zscore":  # per voxel over the session's trials, as MindEye2's release does
            sd = betas.std(axis=0)
            betas = (betas - betas.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
        v = betas.shape[1]
        table = pa.Table.from_pydict(
            {
                "subject": pa.array(np.full(n, self.subject), pa.int16()),
                "session": pa.array(np.full(n, self.session), pa.int16()),
                "run": pa.array(self.run, pa.int16()),
                "trial": pa.array(np.arange(1, n + 1), pa.int32()),
                "image_id": pa.array(self.image_id, pa.int32()),
                "repetition": pa.array(self.repetition, pa.int8()),
                "split": self.split,
                "onset_s": pa.array(self.slot * TRIAL_S, pa.float32()),
                "betas": pa.FixedSizeListArray.from_arrays(pa.array(betas.astype(np.float16).ravel(), pa.float16()), v),
            },
            schema=trials_schema(v),
        )
        return with_notes(table, {**self.shared_sources, rel: fp})


def read_masked_betas(d, coords: np.ndarray) -> np.ndarray:
    """(trials, voxels) of an HDF5 (trials, Z, Y, X) dataset at ``coords`` (i, j, k = X, Y, Z).

    NSD writes one chunk per voxel ([1 1 1 750] in MATLAB's order): reading each mask voxel's chunk as it is stored
    takes 0.2 s a session where a hyperslab over the mask's bounding box walks ~300k chunks (12 s). Other layouts
    (contiguous, compressed, other chunks) read the bounding box."""
    n = d.shape[0]
    if d.chunks == (n, 1, 1, 1) and d.compression is None and not d.id.get_create_plist().get_nfilters():
        out = np.empty((n, len(coords)), d.dtype)
        read = d.id.read_direct_chunk
        for v, (i, j, k) in enumerate(coords.tolist()):
            out[:, v] = np.frombuffer(read((0, k, j, i))[1], dtype=d.dtype, count=n)
        return out
    lo, hi = coords.min(0), coords.max(0) + 1
    block = d[:, lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]  # (trials, z, y, x) over the mask's bounding box
    c = coords - lo
    return block[:, c[:, 2], c[:, 1], c[:, 0]]


@dataclass
class TimeseriesShard:
    """One session of one subject: a row per stimulus run, the nsdgeneral voxels' BOLD in percent signal change
    of the run's mean (float16 keeps it exactly enough; Dynadiff's windows detrend and z-score it per run)."""

    release: Release
    subject: int
    session: int
    layout: Layout
    image_id: np.ndarray  # the session's trials, in order
    run: np.ndarray
    shared_sources: dict

    def __call__(self) -> pa.Table:
        sources = dict(self.shared_sources)
        folder = posixpath.dirname(timeseries_path(self.subject, self.session, 1))
        prefix = f"timeseries_session{self.session:02d}_run"
        files = [n for n in self.release.names(folder) if n.startswith(prefix) and n.endswith(".nii.gz")]
        if not files:
            raise SourceError(f"{self.release.loc(folder).uri}: no {prefix}RR.nii.gz (time series of subject "
                              f"{self.subject} session {self.session})")
        file_runs = sorted(int(n[len(prefix):-len(".nii.gz")]) for n in files)
        rows: dict[str, list] = {k: [] for k in timeseries_schema().names}
        trials = np.arange(1, len(self.image_id) + 1)
        stim_run = 0
        trs = []
        for file_run in file_runs:
            drel = design_path(self.subject, self.session, file_run)
            ddata, dfp = self.release.read(drel, "the run's design")
            sources[drel] = dfp
            design = np.loadtxt(io.StringIO(ddata.decode()), dtype=np.int64, ndmin=1)
            onsets = np.flatnonzero(design)
            if not len(onsets):
                continue  # a rest run
            stim_run += 1
            in_run = self.run == stim_run
            duri = self.release.loc(drel).uri
            if len(onsets) != in_run.sum() or not np.array_equal(design[onsets] - 1, self.image_id[in_run]):
                raise SourceError(f"{duri}: its {len(onsets)} onsets do not match run {stim_run}'s "
                                  f"{int(in_run.sum())} trials of nsd_expdesign.mat")
            trel = timeseries_path(self.subject, self.session, file_run)
            tdata, tfp = self.release.read(trel, "the run's time series")
            sources[trel] = tfp
            turi = self.release.loc(trel).uri
            img = read_nifti(tdata, turi)
            shape = img.shape
            if len(shape) != 4 or tuple(shape[:3]) != self.layout.grid_shape:
                raise SourceError(f"{turi}: shape {shape}, expected {self.layout.grid_shape} x volumes "
                                  "(the nsdgeneral mask's grid)")
            if shape[3] != len(design):
                raise SourceError(f"{duri}: {len(design)} rows, but the time series has {shape[3]} volumes")
            tr = float(img.header.get_zooms()[3])
            if img.header.get_xyzt_units()[1] == "msec":
                tr /= 1000.0
            if not tr > 0:
                raise SourceError(f"{turi}: the header gives no TR (pixdim[4] = {tr})")
            trs.append(tr)
            bi, bj, bk = self.layout.box
            block = np.asarray(img.dataobj[bi, bj, bk, :], dtype=np.float32)
            c = self.layout.coords - np.array([bi.start, bj.start, bk.start])
            bold = block[c[:, 0], c[:, 1], c[:, 2], :]  # (V, T)
            mean = bold.mean(axis=1, keepdims=True)
            bold = np.where(mean > 0, 100.0 * (bold / np.where(mean > 0, mean, 1.0) - 1.0), 0.0)
            store_design = np.full(len(design), -1, np.int32)
            store_design[onsets] = design[onsets] - 1
            rows["subject"].append(self.subject)
            rows["session"].append(self.session)
            rows["run"].append(stim_run)
            rows["tr_s"].append(tr)
            rows["n_voxels"].append(bold.shape[0])
            rows["n_tr"].append(bold.shape[1])
            rows["bold"].append(pa.array(bold.astype(np.float16).ravel(), pa.float16()))
            rows["design"].append(store_design)
            rows["trial"].append(trials[in_run].astype(np.int32))
            rows["trial_onset_s"].append((onsets * tr).astype(np.float32))
            rows["trial_image_id"].append(self.image_id[in_run].astype(np.int32))
        if stim_run != int(self.run.max()):
            raise SourceError(f"{self.release.loc(folder).uri}: session {self.session} has {stim_run} runs with "
                              f"stimuli, nsd_expdesign.mat has {int(self.run.max())}")
        table = pa.Table.from_pydict(rows, schema=timeseries_schema())
        return with_notes(table, sources, {"tr_s": trs})


@dataclass
class StimuliShard:
    """Images of a release's HDF5 array (NSD's ``imgBrick``: (73000, H, W, 3) uint8; MindEye2's ``images``:
    (73000, 3, H, W) float in [0, 1]) as PNGs, with their categories, captions and shared flag."""

    release: Release
    image_ids: np.ndarray  # sorted 0-based 73k ids
    shared: set
    categories: dict  # image id -> list of category indices
    captions: dict  # image id -> caption
    shared_sources: dict
    path: str = STIMULI
    dataset: str = "imgBrick"
    channels_first: bool = False  # MindEye2's float images are (3, H, W) in [0, 1]

    def __call__(self) -> pa.Table:
        loc = self.release.loc(self.path)
        with loc.open_input_file() as fobj:
            f, d = open_hdf5(fobj, loc.uri, self.dataset, 4)
            with f:
                check_images(d, loc.uri, self.dataset, self.channels_first)
                # one row at a time: h5py's list indexing is a point selection, ~40x slower for 425 px images
                images = np.empty((len(self.image_ids), *d.shape[1:]), d.dtype)
                for n, i in enumerate(self.image_ids.tolist()):
                    d.read_direct(images, np.s_[i], np.s_[n])
        if self.channels_first:
            images = (np.clip(images.astype(np.float32), 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
        pngs = []
        for img in images:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG", compress_level=1)
            pngs.append(buf.getvalue())
        cats = np.zeros((len(self.image_ids), N_CATEGORIES), np.uint8)
        for row, i in enumerate(self.image_ids.tolist()):
            cats[row, self.categories.get(i, [])] = 1
        n = len(self.image_ids)
        table = pa.Table.from_pydict(
            {
                "image_id": pa.array(self.image_ids, pa.int32()),
                "image": pa.array(pngs, pa.binary()),
                "height": pa.array(np.full(n, images.shape[1]), pa.int16()),
                "width": pa.array(np.full(n, images.shape[2]), pa.int16()),
                "categories": pa.FixedSizeListArray.from_arrays(pa.array(cats.ravel(), pa.uint8()), N_CATEGORIES),
                "caption": [self.captions.get(i, "") for i in self.image_ids.tolist()],
                "shared": [i in self.shared for i in self.image_ids.tolist()],
            },
            schema=stimuli_schema(),
        )
        return with_notes(table, self.shared_sources)


def check_images(d, uri: str, dataset: str, channels_first: bool) -> tuple[int, int]:
    """(height, width) of a 73k image array; its shape and dtype are checked against the release's."""
    shape = tuple(d.shape)
    if channels_first:
        ok = shape[0] == N_IMAGES and shape[1] == 3 and d.dtype.kind == "f"
        expected = f"float ({N_IMAGES}, 3, H, W)"
    else:
        ok = shape[0] == N_IMAGES and shape[3] == 3 and d.dtype == np.uint8
        expected = f"uint8 ({N_IMAGES}, H, W, 3)"
    if not ok:
        raise SourceError(f"{uri}: dataset '{dataset}' is {d.dtype} {shape}, expected {expected}")
    return (shape[2], shape[3]) if channels_first else (shape[1], shape[2])


def image_size(release: Release, path: str = STIMULI, dataset: str = "imgBrick",
               channels_first: bool = False) -> tuple[int, int]:
    loc = release.loc(path)
    if not loc.exists():
        raise SourceError(f"{loc.uri}: missing (the release's images)")
    with loc.open_input_file() as fobj:
        f, d = open_hdf5(fobj, loc.uri, dataset, 4)
        with f:
            return check_images(d, loc.uri, dataset, channels_first)


def stimuli_shards(release: Release, ids: np.ndarray, shared: set, ann: "Annotations", sources: dict,
                   per_shard: int, **where) -> list[PlannedShard]:
    """The stimuli shards of ``ids`` (sorted), ``per_shard`` images each."""
    out = []
    for n, start in enumerate(range(0, len(ids), per_shard)):
        chunk = ids[start:start + per_shard]
        out.append(PlannedShard(
            f"stimuli/part-{n:05d}.parquet", "stimuli",
            StimuliShard(release, chunk, shared, {i: ann.categories.get(i, []) for i in chunk.tolist()},
                         {i: ann.captions.get(i, "") for i in chunk.tolist()}, sources, **where),
            meta={"image_id_min": int(chunk[0]), "image_id_max": int(chunk[-1])}))
    return out


# -- COCO annotations ------------------------------------------------------------------------------------------------


@dataclass
class Annotations:
    categories: dict = field(default_factory=dict)  # 73k id -> category indices (COCO_CATEGORIES order)
    captions: dict = field(default_factory=dict)  # 73k id -> first caption


def read_stim_info(release: Release, sources: dict) -> dict[int, tuple[int, str]]:
    """nsdId -> (cocoId, cocoSplit) from nsd_stim_info_merged.csv."""
    import pyarrow.csv as pacsv

    data, fp = release.read(STIM_INFO, "NSD's stimulus info")
    sources[STIM_INFO] = fp
    uri = release.loc(STIM_INFO).uri
    try:
        t = pacsv.read_csv(io.BytesIO(data))
    except Exception as exc:
        raise SourceError(f"{uri}: not a readable CSV ({exc})") from exc
    for col in ("nsdId", "cocoId", "cocoSplit"):
        if col not in t.column_names:
            raise SourceError(f"{uri}: no column '{col}' (columns: {', '.join(t.column_names[:12])} ...)")
    return {int(n): (int(c), str(s)) for n, c, s in zip(t["nsdId"].to_pylist(), t["cocoId"].to_pylist(),
                                                         t["cocoSplit"].to_pylist())}


def read_coco(coco_dir: str, s3: S3Options | None, ids: np.ndarray, info: dict[int, tuple[int, str]],
              sources: dict) -> Annotations:
    """Categories and the first caption of each of ``ids`` from COCO 2017's annotation files."""
    root = resolve(coco_dir, s3)
    if root.join("annotations").exists():
        root = root.join("annotations")
    coco = Release(root)
    need: dict[str, dict[int, int]] = {}  # split -> coco id -> 73k id
    for i in ids.tolist():
        if i not in info:
            raise SourceError(f"nsd_stim_info_merged.csv has no row for image {i} (nsdId), so its COCO annotations "
                              "cannot be found")
        cid, split = info[i]
        need.setdefault(split, {})[cid] = i
    out = Annotations()
    index = {name: n for n, name in enumerate(COCO_CATEGORIES)}
    for split, wanted in sorted(need.items()):
        for kind in ("instances", "captions"):
            name = f"{kind}_{split}.json"
            data, fp = coco.read(name, f"COCO {kind} of {split}")
            sources[f"coco/{name}"] = fp
            try:
                doc = json.loads(data)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{coco.loc(name).uri}: not valid JSON ({exc})") from exc
            if kind == "instances":
                names = {c["id"]: c["name"] for c in doc.get("categories", [])}
                for a in doc.get("annotations", []):
                    i = wanted.get(a.get("image_id"))
                    if i is not None and names.get(a["category_id"]) in index:
                        out.categories.setdefault(i, set()).add(index[names[a["category_id"]]])
            else:
                for a in sorted(doc.get("annotations", []), key=lambda a: a.get("id", 0)):
                    i = wanted.get(a.get("image_id"))
                    if i is not None and i not in out.captions:
                        out.captions[i] = str(a.get("caption", "")).strip()
    out.categories = {i: sorted(c) for i, c in out.categories.items()}
    return out


# -- the plan ------------------------------------------------------------------------------------------------------


def available_sessions(release: Release, subject: int, n_sessions: int) -> list[int]:
    names = set(release.names(betas_dir(subject)))
    return [s for s in range(1, n_sessions + 1) if f"betas_session{s:02d}.hdf5" in names]


def _subjects(release: Release, subjects: list[int] | None) -> list[int]:
    """The subjects asked for (NSD's 1..8), or every subject whose nsdgeneral mask the release holds."""
    subjects = list(subjects) if subjects else [s for s in SUBJECTS if release.exists(roi_path(s, "nsdgeneral"))]
    if not subjects:
        raise SourceError(f"{release.root.uri}: no subject has {roi_path(1, 'nsdgeneral').replace('01', 'NN')}")
    bad = [s for s in subjects if s not in SUBJECTS]
    if bad:
        raise SourceError(f"subject {', '.join(map(str, bad))}: NSD has subjects 1..8")
    if len(set(subjects)) != len(subjects):
        raise SourceError(f"subjects {subjects}: a subject listed twice")
    return subjects


def _sessions(release: Release, s: int, sessions: list[int] | None, n_sessions: int) -> list[int]:
    """The sessions of subject ``s`` to ingest: those asked for (each must be in the release), else all it has."""
    have = available_sessions(release, s, n_sessions)
    take = have
    if sessions:
        missing = [x for x in sessions if x not in have]
        if missing:
            held = f"sessions {have[0]}..{have[-1]}" if have else "no sessions"
            raise SourceError(f"{release.loc(betas_dir(s)).uri}: subject {s} has no session "
                              f"{', '.join(map(str, missing))} in this release ({held})")
        take = sorted(set(sessions))
    if not take:
        raise SourceError(f"{release.loc(betas_dir(s)).uri}: no betas_sessionSS.hdf5 for subject {s}")
    return take


def _subject_shards(release: Release, design: ExpDesign, s: int, take: list[int], shared: set[int],
                    roi_files: tuple[str, ...], normalize: str, timeseries: bool, sources: dict):
    """Subject ``s``'s voxel table and per-session trials (and time-series) shards; returns its
    :class:`SubjectInfo`, the shards and the image ids its trials show (``sources`` gains the files read)."""
    layout_sources: dict = {}
    layout = read_layout(release, s, roi_files, layout_sources)
    sources.update(layout_sources)
    ids, reps = design.image_ids(s), design.repetitions(s)
    trials = {"train": 0, "test": 0}
    images: dict[str, set] = {"train": set(), "test": set()}
    seen: set[int] = set()
    info_rows = []
    runs_total = 0
    for sess in take:
        g = design.session_trials(sess)
        run, slot = design.run_and_slot(sess)
        split = ["test" if i in shared else "train" for i in ids[g].tolist()]
        for sp, i in zip(split, ids[g].tolist()):
            trials[sp] += 1
            images[sp].add(i)
        seen.update(ids[g].tolist())
        runs_total += int(run.max())
        info_rows.append((sess, g, run, slot, split))
    info = SubjectInfo(subject=s, voxels=len(layout.coords), grid_shape=layout.grid_shape, sessions=len(take),
                       runs=runs_total, trials=trials, images={k: len(v) for k, v in images.items()})
    sd = subject_dir(s)
    common = {k: v for k, v in sources.items() if k == EXPDESIGN or k in layout_sources}
    shards = [PlannedShard(f"voxels/{sd}.parquet", "voxels", VoxelsShard(layout, layout_sources), info,
                           {"subject": s})]
    for sess, g, run, slot, split in info_rows:
        meta = {"subject": s, "session": sess}
        shards.append(PlannedShard(
            f"trials/{sd}/part-{sess:05d}.parquet", "trials",
            TrialsShard(release, s, sess, layout, ids[g], reps[g], run, slot, split, normalize, common), info, meta))
        if timeseries:
            shards.append(PlannedShard(
                f"timeseries/{sd}/part-{sess:05d}.parquet", "timeseries",
                TimeseriesShard(release, s, sess, layout, ids[g], run, common), info, meta))
    return info, shards, seen


def _one_tr(release_uri: str, reports: list[dict]) -> dict:
    """The manifest's TR from the time-series shards' reports: one value across runs, or an error."""
    trs = [tr for r in reports for tr in r.get("tr_s", [])]
    if not trs:
        return {}
    if max(trs) - min(trs) > 1e-3:
        raise SourceError(f"{release_uri}: the time series have different TRs ({min(trs):g}..{max(trs):g} s)")
    return {"tr_s": round(float(np.median(trs)), 6)}


def nsd_plan(
    source: str,
    source_s3: S3Options | None = None,
    subjects: list[int] | None = None,
    sessions: list[int] | None = None,
    timeseries: bool = False,
    normalize: str = "session-zscore",
    coco: str | None = None,
    roi_files: tuple[str, ...] = ROI_FILES,
    images_per_shard: int = 500,
    tasks: TaskOptions | None = None,
) -> Plan:
    """The shards of an NSD ingest: a voxel table per subject, a trials (and time-series) shard per session, the
    images the selected trials show. Reads only the small files here; each shard reads its own when it is built:
    in a Ray task of ``tasks``' resources, or in the ingesting process when ``tasks`` is None."""
    if normalize not in NORMALIZE:
        raise SourceError(f"normalize {normalize!r}: choose one of {', '.join(NORMALIZE)}")
    release = Release(resolve(source, source_s3))
    sources: dict[str, dict] = {}
    data, fp = release.read(EXPDESIGN, "NSD's experiment design")
    sources[EXPDESIGN] = fp
    design = ExpDesign.parse(data, release.loc(EXPDESIGN).uri)
    subjects = _subjects(release, subjects)
    shared = set(design.shared.tolist())
    shards: list[PlannedShard] = []
    infos: list[SubjectInfo] = []
    chosen: dict[int, list[int]] = {}
    seen_ids: set[int] = set()
    for s in subjects:
        chosen[s] = _sessions(release, s, sessions, design.n_sessions)
        info, planned, ids = _subject_shards(release, design, s, chosen[s], shared, tuple(roi_files), normalize,
                                             timeseries, sources)
        infos.append(info)
        shards += planned
        seen_ids |= ids
    all_ids = np.array(sorted(seen_ids), np.int64)
    absent = []
    stim_sources: dict = {}
    if coco:
        info_csv = read_stim_info(release, stim_sources)
        ann = read_coco(coco, source_s3, all_ids, info_csv, stim_sources)
    else:
        ann = Annotations()
        absent += ["categories", "captions"]
    sources.update(stim_sources)
    image_hw = image_size(release)
    brick = release.stat(STIMULI, "NSD's images (imgBrick)")
    shards += stimuli_shards(release, all_ids, shared, ann, {**stim_sources, STIMULI: brick}, images_per_shard)
    if not timeseries:
        absent.append("timeseries")

    return Plan(
        source="nsd",
        source_params={
            "release": release.root.uri, "subjects": subjects, "sessions": {str(s): v for s, v in chosen.items()},
            "timeseries": timeseries, "normalize": normalize, "coco": bool(coco), "roi_files": list(roi_files),
            "betas": "betas_fithrf_GLMdenoise_RR", "trial_onsets": "nominal (stimpattern slot x 4 s)",
        },
        shards=shards,
        stimulus_ids=set(all_ids.tolist()),
        manifest_fields=dict(
            tr_s=None, image_size=image_hw, n_images=len(all_ids), categories=list(COCO_CATEGORIES),
            subjects=infos, shared_test_image_ids=sorted(int(i) for i in all_ids if int(i) in shared), absent=absent,
        ),
        source_files={rel: source_file(rel, rec) for rel, rec in sources.items()},
        source_root=release.root,
        tasks=tasks,
        finish=partial(_one_tr, release.root.uri),
        large_files=[STIMULI],
    )
