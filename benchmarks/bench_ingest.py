"""Ingest throughput of `raydecode ingest nsd` on NSD-sized files: trials/s and MB/s, in one process and as Ray tasks.

Writes a release whose files have NSD's real sizes for the sessions it holds (subject 1's 81 x 104 x 83 grid with
15,724 nsdgeneral voxels, 750 trials a session in 12 runs of 63/62, int16 betas of 1.05 GB a session, the 73k
imgBrick with the ~750 images a session shows at 425 px; with --timeseries, 12 runs of 226 volumes), then ingests it
twice side by side: the shards built in this process, and as one Ray task per shard. Prints seconds, trials/s,
MB/s read from the release and written to the store, and the ratio of the two. The arithmetic for the whole
release is in the issue notes; this measures the per-session cost it scales.

    python benchmarks/bench_ingest.py [--sessions 2] [--timeseries] [--workdir work/bench-ingest]
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
from scipy.io import savemat

GRID = (81, 104, 83)  # subject 1, func1pt8mm
VOXELS = 15724
TR = 4 / 3


def write_release(root: Path, sessions: int, timeseries: bool, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    exp = root / "nsddata/experiments/nsd"
    exp.mkdir(parents=True, exist_ok=True)
    stimpattern = np.zeros((40, 12, 75), np.uint8)
    for s in range(40):
        for r in range(12):
            stimpattern[s, r, np.sort(rng.choice(75, 63 if r % 2 == 0 else 62, replace=False))] = 1
    order = rng.integers(1, 10001, 30000)
    subjectim = np.stack([rng.choice(np.arange(1, 73001), 10000, replace=False) for _ in range(8)])
    shared = subjectim[0, :1000]
    savemat(exp / "nsd_expdesign.mat", {"masterordering": order[None].astype(float), "subjectim": subjectim.astype(float),
                                        "sharedix": np.sort(shared)[None].astype(float),
                                        "stimpattern": stimpattern.astype(float)}, format="5")
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in GRID], indexing="ij")
    score = ((ii - 40) / 30.0) ** 2 + ((jj - 30) / 28.0) ** 2 + ((kk - 35) / 22.0) ** 2
    mask = np.zeros(GRID, np.int16)
    mask.ravel()[np.argsort(score.ravel(), kind="stable")[:VOXELS]] = 1
    roi = root / "nsddata/ppdata/subj01/func1pt8mm/roi"
    roi.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.8, 1.8, 1.8, 1])
    nib.save(nib.Nifti1Image(mask, affine), roi / "nsdgeneral.nii.gz")
    bdir = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR"
    bdir.mkdir(parents=True, exist_ok=True)
    for sess in range(1, sessions + 1):
        with h5py.File(bdir / f"betas_session{sess:02d}.hdf5", "w") as f:
            # NSD's chunks are [1 1 1 750] in MATLAB order: (750, 1, 1, 1) as h5py reads it
            d = f.create_dataset("betas", shape=(750, *GRID[::-1]), dtype=np.int16, chunks=(750, 1, 1, 1))
            for z in range(GRID[2]):
                d[:, z] = rng.integers(-900, 900, (750, GRID[1], GRID[0]), dtype=np.int16)
    used = np.unique(subjectim[0, order[: 750 * sessions] - 1] - 1)
    stim = root / "nsddata_stimuli/stimuli/nsd"
    stim.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:425, 0:425] / 425
    with h5py.File(stim / "nsd_stimuli.hdf5", "w") as f:
        d = f.create_dataset("imgBrick", shape=(73000, 425, 425, 3), dtype=np.uint8, chunks=(1, 425, 425, 3))
        for i in used.tolist():
            c = rng.random(6)
            img = np.stack([np.sin(6 * c[k] * xx + 5 * c[k + 3] * yy) for k in range(3)], -1)
            d[i] = ((img * 0.4 + 0.5) * 255).astype(np.uint8) + rng.integers(0, 20, (425, 425, 3), dtype=np.uint8)
    if timeseries:
        ts = root / "nsddata_timeseries/ppdata/subj01/func1pt8mm"
        (ts / "timeseries").mkdir(parents=True, exist_ok=True)
        (ts / "design").mkdir(parents=True, exist_ok=True)
        ids = subjectim[0, order - 1]
        g = 0
        for sess in range(1, sessions + 1):
            for run in range(1, 13):
                design = np.zeros(226, np.int64)
                for slot in np.flatnonzero(stimpattern[sess - 1, run - 1]):
                    design[min(int(round(slot * 3)), 225)] = ids[g]
                    g += 1
                bold = rng.integers(800, 1200, (*GRID, 226), dtype=np.int16)
                img = nib.Nifti1Image(bold, affine)
                img.header.set_xyzt_units("mm", "sec")
                img.header.set_zooms((1.8, 1.8, 1.8, TR))
                nib.save(img, ts / f"timeseries/timeseries_session{sess:02d}_run{run:02d}.nii.gz")
                (ts / f"design/design_session{sess:02d}_run{run:02d}.tsv").write_text("".join(f"{v}\n" for v in design))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--timeseries", action="store_true")
    ap.add_argument("--workdir", default="work/bench-ingest")
    args = ap.parse_args()

    from raydecode.data.ingest import TaskOptions, run_ingest
    from raydecode.data.nsd import nsd_plan
    from raydecode.runtime import init_ray

    work = Path(args.workdir)
    release = work / f"release-{args.sessions}{'-ts' if args.timeseries else ''}"
    if not (release / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5").exists():
        t = time.time()
        shutil.rmtree(release, ignore_errors=True)
        write_release(release, args.sessions, args.timeseries)
        print(f"wrote an NSD-sized release of {args.sessions} session(s) in {time.time() - t:.0f} s: {release}")
    read_mb = sum(p.stat().st_size for p in release.rglob("*") if p.is_file() and p.name != "nsd_stimuli.hdf5") / 2**20
    init_ray()
    rows = []
    for name, tasks in (("in process", None), ("Ray tasks", TaskOptions(num_cpus=1))):
        out = work / f"store-{name.replace(' ', '-')}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.time()
        plan = nsd_plan(str(release), timeseries=args.timeseries, tasks=tasks)
        res = run_ingest(plan, str(out), progress=False)
        secs = time.time() - t
        trials = sum(sum(s.trials.values()) for s in res.manifest.subjects)
        written = sum(s.bytes for s in res.manifest.shards) / 2**20
        rows.append((name, secs, trials / secs, read_mb / secs, written / secs))
    print(f"\n{os.cpu_count()} CPUs; {args.sessions} session(s) of subject 1 (750 trials x {VOXELS} voxels each), "
          f"{read_mb:,.0f} MB of betas/masks/design{'/time series' if args.timeseries else ''} read "
          "(+ the images from imgBrick)")
    print(f"{'':12} {'seconds':>8} {'trials/s':>9} {'MB/s read':>10} {'MB/s written':>13}")
    for name, secs, tps, rmb, wmb in rows:
        print(f"{name:12} {secs:8.1f} {tps:9.1f} {rmb:10.1f} {wmb:13.2f}")
    print(f"Ray tasks / in process: {rows[0][1] / rows[1][1]:.2f}x the speed")
    print(f"RESULT bench_ingest ray_tasks_speedup={rows[0][1] / rows[1][1]:.2f} mb_per_s_read={rows[1][3]:.1f}")


if __name__ == "__main__":
    main()
