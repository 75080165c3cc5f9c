"""Time windows of the BOLD time series (Dynadiff's input): W(image, t, d) for every trial.

A window starts ``start_s`` seconds after the image's onset and lasts ``duration_s``
seconds: ``round(duration_s / TR)`` fMRI volumes (Dynadiff: t = 3 s, d = 8 s, 6 TRs
at TR 1.3 s). Each run is cleaned first, as in the paper (Sec. 2.3): a cosine-drift
model (the DCT basis below ``high_pass_hz``, nilearn's ``cosine`` drift) is fitted to
every voxel and subtracted, then every voxel is z-scored over the run.

Rows carry ``bold`` (T x width float32, voxels zero-padded to the widest selected
subject, like betas), ``n_voxels``, and the trial's ids; single trials for training,
and for the test split either single trials or the repetitions of an image averaged.
``shift`` moves every window by whole TRs (time-resolved decoding: W(t + k*TR, d)).
Windows that would leave their run are skipped (and counted by :func:`count_windows`).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from raydecode.config import DataSelection, WindowConfig
from raydecode.data.pipeline import (
    TrialsDataset,
    finish_in_memory,
    group_test,
    read_tasks,
    small_shuffles,
    test_grouping,
    train_order,
    with_stimuli,
)
from raydecode.data.store import Store, open_store
from raydecode.errors import ConfigError, StoreError
from raydecode.storage import S3Options

RUN_COLUMNS = ("subject", "session", "run", "tr_s", "n_voxels", "n_tr", "bold", "trial", "trial_onset_s",
               "trial_image_id")
LAYOUT_COLUMNS = ("subject", "session", "run", "tr_s", "n_tr", "trial_onset_s", "trial_image_id")


def cosine_drift(n_tr: int, tr_s: float, high_pass_hz: float) -> np.ndarray:
    """(n_tr, K + 1) design: a constant and the K DCT-II cosines slower than ``high_pass_hz``."""
    order = min(n_tr - 1, int(math.floor(2 * n_tr * high_pass_hz * tr_s)))
    t = np.arange(n_tr)
    basis = [np.cos(np.pi * k * (2 * t + 1) / (2 * n_tr)) for k in range(1, order + 1)]
    return np.stack([np.ones(n_tr), *basis], 1)


def clean_run(bold: np.ndarray, tr_s: float, cfg: WindowConfig) -> np.ndarray:
    """``bold`` (T, V) -> drift removed and z-scored per voxel (float32)."""
    x = np.asarray(bold, np.float64)
    if cfg.detrend == "cosine":
        design = cosine_drift(x.shape[0], tr_s, cfg.high_pass_hz)
        coef, *_ = np.linalg.lstsq(design, x, rcond=None)
        x = x - design @ coef
    if cfg.zscore:
        x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    return x.astype(np.float32)


def _run_bold(table: pa.Table, r: int) -> tuple[np.ndarray, float]:
    v, n_tr, tr = int(table["n_voxels"][r].as_py()), int(table["n_tr"][r].as_py()), float(table["tr_s"][r].as_py())
    flat = np.asarray(table["bold"][r].values.to_numpy(zero_copy_only=False), np.float32)
    if flat.size != v * n_tr:
        raise StoreError(f"time series of subject {table['subject'][r].as_py()} session {table['session'][r].as_py()} "
                         f"run {table['run'][r].as_py()}: field 'bold' holds {flat.size} values, not n_voxels x n_tr "
                         f"= {v} x {n_tr}")
    return flat.reshape(v, n_tr).T, tr


def windows_of_runs(table: pa.Table, window: dict, split: str, test_ids: np.ndarray, width: int,
                    shift: int = 0) -> dict[str, np.ndarray]:
    """A batch of runs (rows of a timeseries shard) -> one row per trial of ``split`` whose window fits its run."""
    cfg = WindowConfig(**window)
    cols: dict[str, list] = {k: [] for k in ("subject", "session", "run", "trial", "image_id", "bold", "n_voxels",
                                             "window_end_s")}
    for r in range(table.num_rows):
        ids = np.asarray(table["trial_image_id"][r].values.to_numpy(zero_copy_only=False), np.int64)
        keep = np.isin(ids, test_ids) == (split == "test")
        if not keep.any():
            continue
        bold, tr = _run_bold(table, r)
        n = cfg.n_samples(tr)
        first = cfg.first_index(table["trial_onset_s"][r].values.to_numpy(zero_copy_only=False), tr, shift)
        fits = keep & (first >= 0) & (first + n <= bold.shape[0])
        if not fits.any():
            continue
        clean = clean_run(bold, tr, cfg)
        trials = np.asarray(table["trial"][r].values.to_numpy(zero_copy_only=False), np.int64)
        for j in np.flatnonzero(fits):
            w = clean[first[j]: first[j] + n]
            cols["bold"].append(np.pad(w, ((0, 0), (0, width - w.shape[1]))) if width > w.shape[1] else w)
            cols["trial"].append(trials[j])
            cols["image_id"].append(ids[j])
        k = int(fits.sum())
        for name in ("subject", "session", "run"):
            cols[name].extend([table[name][r].as_py()] * k)
        cols["n_voxels"].extend([bold.shape[1]] * k)
        cols["window_end_s"].extend([cfg.end_s(tr, shift)] * k)
    dtypes = {"subject": np.int16, "session": np.int16, "run": np.int16, "trial": np.int32, "image_id": np.int32,
              "n_voxels": np.int32, "window_end_s": np.float32}
    out = {k: np.asarray(v, dtypes[k]) for k, v in cols.items() if k != "bold"}
    n = WindowConfig(**window).n_samples(float(table["tr_s"][0].as_py())) if table.num_rows else 1
    out["bold"] = np.stack(cols["bold"]).astype(np.float32) if cols["bold"] else np.zeros((0, n, width), np.float32)
    out["split"] = np.asarray([split] * len(out["subject"]), dtype=object)
    return out


def _check(store: Store, subjects: list[int], sessions: list[int] | None) -> list:
    shards = store.manifest.shards_of("timeseries", subjects=subjects, sessions=sessions)
    have = {s.subject for s in shards}
    missing = [s for s in subjects if s not in have]
    if missing or not store.manifest.tr_s:
        raise StoreError(f"store {store.uri} has no time series for subject(s) {missing or subjects} (its manifest "
                         "lists no 'timeseries' shards for them); ingest with timeseries: true")
    return shards


def count_windows(store: Store, subjects: list[int], sessions: list[int] | None, window: WindowConfig,
                  split: str = "train", shift: int = 0) -> int:
    """Windows of ``split`` that fit their run, from the shards' trial layout only (no BOLD is read)."""
    test_ids = np.asarray(store.manifest.shared_test_image_ids, np.int64)
    total = 0
    for shard in _check(store, subjects, sessions):
        t = store.read_shard(shard, list(LAYOUT_COLUMNS))
        for r in range(t.num_rows):
            tr, n_tr = float(t["tr_s"][r].as_py()), int(t["n_tr"][r].as_py())
            ids = np.asarray(t["trial_image_id"][r].values.to_numpy(zero_copy_only=False), np.int64)
            first = window.first_index(t["trial_onset_s"][r].values.to_numpy(zero_copy_only=False), tr, shift)
            ok = (np.isin(ids, test_ids) == (split == "test")) & (first >= 0) & (first + window.n_samples(tr) <= n_tr)
            total += int(ok.sum())
    return total


def windows_dataset(store: Store | str, split: str, window: WindowConfig, selection=None,
                    s3: S3Options | None = None, shift: int = 0):
    """Windows of one split as a Ray dataset (the time-series counterpart of ``trials_dataset``)."""
    sel = selection or DataSelection()
    if split not in ("train", "test"):
        raise ConfigError(f"split {split!r}: allowed values: train, test")

    if test_grouping(sel, split) is not None:
        with small_shuffles():
            return _windows_dataset(store, split, window, sel, s3, shift)
    return _windows_dataset(store, split, window, sel, s3, shift)


def _windows_dataset(store, split: str, window: WindowConfig, sel, s3, shift: int):
    if isinstance(store, str):
        store = open_store(store, s3)
    subjects = store.check_subjects(sel.subjects, sel.hold_out)
    sessions = store.check_sessions(subjects, sel.sessions)
    shards = _check(store, subjects, sessions)
    voxels = {s: store.manifest.subject(s).voxels for s in subjects}
    width = max(voxels.values())
    test_ids = np.asarray(store.manifest.shared_test_image_ids, np.int64)
    from raydecode.data.source import read_store_shards  # Ray is imported where it is used

    ds = read_store_shards(store.root, shards, list(RUN_COLUMNS), train_order(sel, split), **read_tasks(sel))
    ds = ds.map_batches(windows_of_runs, batch_format="pyarrow", batch_size=1, **read_tasks(sel),
                        fn_kwargs={"window": window.model_dump(), "split": split, "test_ids": test_ids,
                                   "width": width, "shift": shift})
    ds = with_stimuli(group_test(ds, sel, split, len(subjects)), store, sel)
    return TrialsDataset(ds, subjects, voxels, width, [s.path for s in shards])


def read_windows(store: Store | str, split: str, window: WindowConfig, selection=None, s3: S3Options | None = None,
                 shift: int = 0) -> dict[str, np.ndarray]:
    """The rows of :func:`windows_dataset` read with pyarrow into memory (no Ray): evaluation of test windows."""
    sel = selection or DataSelection()
    if isinstance(store, str):
        store = open_store(store, s3)
    subjects = store.check_subjects(sel.subjects, sel.hold_out)
    sessions = store.check_sessions(subjects, sel.sessions)
    width = max(store.manifest.subject(s).voxels for s in subjects)
    test_ids = np.asarray(store.manifest.shared_test_image_ids, np.int64)
    parts = [windows_of_runs(store.read_shard(s, list(RUN_COLUMNS)), window.model_dump(), split, test_ids, width, shift)
             for s in _check(store, subjects, sessions)]
    parts = [p for p in parts if len(p["subject"])]
    if not parts:
        return {}
    batch = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
    return finish_in_memory(store, batch, split, sel)
