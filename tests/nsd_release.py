"""Miniature NSD and MindEye2 releases in the published formats, for the ingest tests.

Everything a reader sees is the real format: MAT v5 ``nsd_expdesign.mat`` (masterordering, subjectim, sharedix,
stimpattern, basiccnt), gzipped NIfTI-1 masks and time series with a non-identity affine and the TR in pixdim[4],
HDF5 betas (dataset ``betas``, int16 x 300, (trials, Z, Y, X)), HDF5 ``imgBrick`` (73000, 425, 425, 3) uint8 (only the
used images' chunks are stored), the stimulus-info CSV, design TSVs, COCO 2017 annotation JSON; MindEye2's
``betas_all_subjNN_fp32_renorm.hdf5``, webdataset tars of ``behav.npy`` (1, 17) per trial, ``shared1000.npy`` and
``coco_images_224_float16.hdf5``. Only the sizes are small: 3 sessions of 4 runs x 12 slots (10 trials each) instead
of 40 x 12 x 75, grids of ~10^3 voxels, 48 images.

The betas carry planted structure (a subject-specific linear map of a shared 6-d code of each image, which also
draws the image), so a store ingested from it can be trained on and retrieves above chance.

``python tests/nsd_release.py OUT`` writes the NSD release (and MindEye2's under OUT/mindeyev2).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from scipy.io import savemat

SUBJECT_GRIDS = {1: (9, 11, 7), 2: (10, 12, 8)}  # X, Y, Z of each subject's functional grid
N_SESSIONS, N_RUNS, N_SLOTS, PER_RUN = 3, 4, 12, 10
BETA_SESSIONS = (1, 2)  # betas written for these; session 3 is in the design only
TR = 4.0 / 3.0
SHARED_10K = np.arange(1, 9)  # a subject's first images are the shared ones (1-based into its 10k)
UNIQUE_10K = np.arange(1001, 1041)
COCO_IDS = {  # the 80 categories' COCO ids (a reader maps them by name)
    "person": 1, "bicycle": 2, "car": 3, "motorcycle": 4, "airplane": 5, "bus": 6, "train": 7, "truck": 8, "boat": 9,
    "traffic light": 10, "fire hydrant": 11, "stop sign": 13, "bench": 15, "bird": 16, "cat": 17, "dog": 18,
    "horse": 19, "sheep": 20, "cow": 21, "elephant": 22, "pizza": 59, "toothbrush": 90,
}


@dataclass
class MiniNSD:
    root: Path
    design: dict  # the expdesign arrays as written
    masks: dict  # subject -> (X, Y, Z) int mask as written (1 inside)
    betas: dict  # (subject, session) -> (trials, Z, Y, X) int16 as written
    codes: np.ndarray  # (73000-row sparse) image code, by 0-based 73k id

    def trial_image_ids(self, subject: int) -> np.ndarray:
        d = self.design
        return d["subjectim"][subject - 1, d["masterordering"][0] - 1] - 1


def _affine(seed: int) -> np.ndarray:
    a = np.diag([-1.8, 1.8, 1.8, 1.0])  # a flipped x axis, 1.8 mm voxels, and an offset
    a[:3, 3] = [80.0 + seed, -110.0, -70.0]
    return a


def _nifti(path: Path, data: np.ndarray, seed: int, tr: float | None = None) -> None:
    img = nib.Nifti1Image(data, _affine(seed))
    if tr is not None:
        img.header.set_xyzt_units("mm", "sec")
        zooms = list(img.header.get_zooms())
        img.header.set_zooms((*zooms[:3], tr))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _image(code: np.ndarray, size: int) -> np.ndarray:
    """An image drawn from a 6-d code: a colour gradient and a blob whose place and colour the code sets."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.25 * np.tanh(code[:3])
    img = np.ones((size, size, 3)) * base
    cx, cy = 0.5 + 0.3 * np.tanh(code[3]), 0.5 + 0.3 * np.tanh(code[4])
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.02)[..., None]
    img = img * (1 - blob) + blob * (0.5 + 0.5 * np.tanh(np.array([code[5], -code[5], code[0]])))
    img = img + 0.3 * (xx[..., None] - 0.5) * np.tanh(code[1])
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def write_nsd(root: Path, seed: int = 0, timeseries: bool = True, coco: bool = True) -> MiniNSD:
    rng = np.random.default_rng(seed)
    root = Path(root)
    # -- the design
    n_trials = N_SESSIONS * N_RUNS * PER_RUN
    stimpattern = np.zeros((N_SESSIONS, N_RUNS, N_SLOTS), np.uint8)
    for s in range(N_SESSIONS):
        for r in range(N_RUNS):
            stimpattern[s, r, np.sort(rng.choice(np.arange(1, N_SLOTS), PER_RUN, replace=False))] = 1
    pool = np.concatenate([SHARED_10K, UNIQUE_10K])
    order = np.repeat(pool, 3)
    order = order[rng.permutation(len(order))][:n_trials]
    subjectim = np.zeros((8, 10000), np.int64)
    shared73 = np.sort(rng.choice(np.arange(1, 73001), 1000, replace=False))  # 1-based
    rest = np.setdiff1d(np.arange(1, 73001), shared73)
    for s in range(8):
        subjectim[s, :1000] = rng.permutation(shared73)
        subjectim[s, 1000:] = rng.choice(rest, 9000, replace=False)
    subjectim[:, :1000] = subjectim[0, :1000]  # every subject's first 1000 are the same shared images
    design = {
        "masterordering": order[None].astype(np.float64),  # MATLAB doubles, as in the release
        "subjectim": subjectim.astype(np.float64),
        "sharedix": np.sort(shared73)[None].astype(np.float64),
        "stimpattern": stimpattern.astype(np.float64),
        "basiccnt": np.zeros((3, N_SESSIONS)),
    }
    exp = root / "nsddata/experiments/nsd"
    exp.mkdir(parents=True, exist_ok=True)
    savemat(str(exp / "nsd_expdesign.mat"), design, format="5")
    # -- images: a shared 6-d code per image draws it; betas are a linear map of the same code
    used = np.unique(np.concatenate([subjectim[s - 1, order - 1] - 1 for s in SUBJECT_GRIDS]))
    codes = {int(i): rng.standard_normal(6) for i in used}
    stim = root / "nsddata_stimuli/stimuli/nsd"
    stim.mkdir(parents=True, exist_ok=True)
    with h5py.File(stim / "nsd_stimuli.hdf5", "w") as f:
        brick = f.create_dataset("imgBrick", shape=(73000, 425, 425, 3), dtype=np.uint8, chunks=(1, 425, 425, 3),
                                 compression="gzip", compression_opts=1)
        for i in used.tolist():
            brick[i] = _image(codes[i], 425)
    # the stimulus info CSV: the used images (and a few more), NSD's columns
    cats = list(COCO_IDS)
    with open(exp / "nsd_stim_info_merged.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000"]
                   + [f"subject{s}" for s in range(1, 9)])
        for n, i in enumerate(sorted(set(used.tolist()) | {0, 1, 72999})):
            w.writerow([n, 100000 + i, "train2017" if i % 4 else "val2017", "(0, 0, 0.1, 0.1)", 0.0, i, False, False,
                        (i + 1) in set(shared73.tolist())] + [1] * 8)
    coco_categories = {}
    if coco:
        ann = root / "coco/annotations"
        ann.mkdir(parents=True, exist_ok=True)
        for split in ("train2017", "val2017"):
            ids = [i for i in used.tolist() if (split == "train2017") == bool(i % 4)]
            inst, caps = [], []
            for i in ids:
                picks = sorted({cats[i % len(cats)], cats[(i // 7) % len(cats)]})
                coco_categories[i] = picks
                for k, name in enumerate(picks):
                    inst.append({"id": 10 * i + k, "image_id": 100000 + i, "category_id": COCO_IDS[name],
                                 "bbox": [0, 0, 1, 1], "area": 1.0, "iscrowd": 0})
                caps.append({"id": 10 * i + 2, "image_id": 100000 + i, "caption": f"a photo of image {i} (second)"})
                caps.append({"id": 10 * i + 1, "image_id": 100000 + i, "caption": f"a photo of image {i}"})
            categories = [{"id": v, "name": k, "supercategory": "x"} for k, v in COCO_IDS.items()]
            images = [{"id": 100000 + i, "width": 640, "height": 480, "file_name": f"{100000 + i:012d}.jpg"} for i in ids]
            (ann / f"instances_{split}.json").write_text(json.dumps({"images": images, "annotations": inst,
                                                                     "categories": categories}))
            (ann / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": caps}))
    # -- subjects: masks, ROI labels, betas, time series
    masks, betas = {}, {}
    for s, grid in SUBJECT_GRIDS.items():
        ii, jj, kk = np.meshgrid(*[np.arange(n) for n in grid], indexing="ij")
        centre = np.array(grid) / 2
        inside = ((ii - centre[0]) / (grid[0] * 0.42)) ** 2 + ((jj - centre[1]) / (grid[1] * 0.42)) ** 2 \
            + ((kk - centre[2]) / (grid[2] * 0.42)) ** 2 < 1
        mask = np.where(inside, 1, np.where(rng.random(grid) < 0.5, 0, -1)).astype(np.int16)
        masks[s] = mask
        roi_dir = root / f"nsddata/ppdata/subj{s:02d}/func1pt8mm/roi"
        _nifti(roi_dir / "nsdgeneral.nii.gz", mask, s)
        prf = np.where(inside & (jj < grid[1] // 2), 1 + (ii % 7), 0).astype(np.int16)
        _nifti(roi_dir / "prf-visualrois.nii.gz", prf, s)
        coords = np.argwhere(mask > 0)
        loadings = rng.standard_normal((len(coords), 6)) / np.sqrt(6)
        all_ids = subjectim[s - 1, order - 1] - 1
        signal = np.stack([codes[int(i)] for i in all_ids]) @ loadings.T  # (trials, V)
        noisy = signal + 0.5 * rng.standard_normal(signal.shape)
        bdir = root / f"nsddata_betas/ppdata/subj{s:02d}/func1pt8mm/betas_fithrf_GLMdenoise_RR"
        bdir.mkdir(parents=True, exist_ok=True)
        per = N_RUNS * PER_RUN
        for sess in BETA_SESSIONS:
            vol = (rng.standard_normal((per, *grid[::-1])) * 300).astype(np.int16)  # (trials, Z, Y, X)
            rows = noisy[(sess - 1) * per: sess * per]
            vol[:, coords[:, 2], coords[:, 1], coords[:, 0]] = np.clip(np.round((1.5 + rows) * 300), -32768, 32767)
            betas[(s, sess)] = vol
            with h5py.File(bdir / f"betas_session{sess:02d}.hdf5", "w") as f:
                f.create_dataset("betas", data=vol, chunks=(per, 1, 1, 1))  # NSD's: one chunk per voxel
        if timeseries:
            ts_dir = root / f"nsddata_timeseries/ppdata/subj{s:02d}/func1pt8mm"
            for sess in BETA_SESSIONS:
                g0 = (sess - 1) * per
                runs = list(range(1, N_RUNS + 1))
                files = [None] + runs + [None] if sess == 2 else runs  # session 2 has rest runs first and last
                t_global = g0
                for file_run, run in enumerate(files, start=1):
                    n_vol = N_SLOTS * 3 + 6
                    design_col = np.zeros(n_vol, np.int64)
                    bold = 1000.0 + 20 * rng.standard_normal((*grid, n_vol))
                    if run is not None:
                        slots = np.flatnonzero(stimpattern[sess - 1, run - 1])
                        for slot in slots:
                            onset = int(slot * 3)
                            image = int(all_ids[t_global])
                            design_col[onset] = image + 1
                            resp = noisy[t_global]
                            for lag, h in zip(range(2, 6), (0.3, 1.0, 0.8, 0.3)):
                                if onset + lag < n_vol:
                                    bold[coords[:, 0], coords[:, 1], coords[:, 2], onset + lag] += 15 * h * resp
                            t_global += 1
                    _nifti(ts_dir / f"timeseries/timeseries_session{sess:02d}_run{file_run:02d}.nii.gz",
                           np.round(bold).astype(np.int16), s, tr=TR)
                    (ts_dir / "design").mkdir(parents=True, exist_ok=True)
                    (ts_dir / f"design/design_session{sess:02d}_run{file_run:02d}.tsv").write_text(
                        "".join(f"{v}\n" for v in design_col))
    code_arr = {i: codes[i] for i in codes}
    return MiniNSD(root, {k: np.asarray(v) for k, v in design.items()} | {
        "masterordering": order[None], "subjectim": subjectim, "sharedix": shared73[None]},
        masks, betas, code_arr)


# -- MindEye2's preprocessed release ---------------------------------------------------------------------------------


@dataclass
class MiniMindEye2:
    root: Path
    betas: dict  # subject -> (sessions x 750, V) float32 as written
    behav: dict  # subject -> (trials, 17) rows as written (every trial, presentation order; column 5: the betas row)
    images: dict  # 0-based 73k id -> (3, 224, 224) float16


def write_mindeye2(root: Path, nsd: MiniNSD, subjects=(1, 2), seed: int = 1) -> MiniMindEye2:
    """MindEye2's release of ``nsd``'s trials: z-scored betas of the nsdgeneral voxels (C order of the mask), one
    train tar per session (shared-image trials in ``new_test/0.tar``), 224 px float16 images in [0, 1]."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shared = np.zeros(73000, bool)
    shared[nsd.design["sharedix"][0] - 1] = True
    np.save(root / "shared1000.npy", shared)
    per = N_RUNS * PER_RUN
    out_betas, out_behav, images = {}, {}, {}
    for s in subjects:
        coords = np.argwhere(nsd.masks[s] > 0)
        rows = []
        for sess in BETA_SESSIONS:
            vol = nsd.betas[(s, sess)].astype(np.float32) / 300
            b = vol[:, coords[:, 2], coords[:, 1], coords[:, 0]]
            rows.append((b - b.mean(0)) / b.std(0))
        # rows are MindEye2's global trials, (session - 1) * 750 + trial: this release's sessions are shorter, so
        # the rows past a session's trials hold values no trial points at
        betas = rng.standard_normal((len(BETA_SESSIONS) * 750, coords.shape[0])).astype(np.float32)
        for n, b in enumerate(rows):
            betas[n * 750: n * 750 + per] = b
        out_betas[s] = betas
        with h5py.File(root / f"betas_all_subj{s:02d}_fp32_renorm.hdf5", "w") as f:
            f.create_dataset("betas", data=betas)
        ids = nsd.trial_image_ids(s)[: len(BETA_SESSIONS) * per]
        behav = -np.ones((len(ids), 17), np.float64)
        for g, i in enumerate(ids):
            sess, t = g // per + 1, g % per
            row = (sess - 1) * 750 + t
            behav[g, :7] = [i, s, sess, t // PER_RUN + 1, t % PER_RUN + 1, row, 737000.5 + g]
            behav[g, 16] = float(shared[i])
        out_behav[s] = behav
        test_members = []
        for sess in BETA_SESSIONS:
            members = []
            for g in range((sess - 1) * per, sess * per):
                (test_members if shared[int(ids[g])] else members).append(g)
            _tar(root / f"wds/subj{s:02d}/train/{sess - 1}.tar", behav, members, rng)
        _tar(root / f"wds/subj{s:02d}/new_test/0.tar", behav, test_members, rng)
        for i in np.unique(ids).tolist():
            images[i] = (_image(nsd.codes[i], 224).transpose(2, 0, 1) / 255).astype(np.float16)
    with h5py.File(root / "coco_images_224_float16.hdf5", "w") as f:
        d = f.create_dataset("images", shape=(73000, 3, 224, 224), dtype=np.float16, chunks=(1, 3, 224, 224),
                             compression="gzip", compression_opts=1)
        for i, img in sorted(images.items()):
            d[i] = img
    return MiniMindEye2(root, out_betas, out_behav, images)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _tar(path: Path, behav: np.ndarray, rows: list[int], rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for n, g in enumerate(rows):
            key = f"sample{n:09d}"
            for name, arr in (("behav.npy", behav[g][None]), ("past_behav.npy", -np.ones((15, 17))),
                              ("future_behav.npy", -np.ones((15, 17))), ("olds_behav.npy", -np.ones((3, 17)))):
                data = _npy(arr)
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "work/nsd-mini")
    mini = write_nsd(out)
    write_mindeye2(out / "mindeyev2", mini)
    print(f"miniature NSD release in {out} (COCO annotations in {out / 'coco'}), MindEye2's in {out / 'mindeyev2'}")
    os.sys.exit(0)
