"""Data-path throughput, measured side by side in one run.

    python benchmarks/bench_data.py [--preset demo] [--store DIR]

Prints trials/s for (a) a plain single-process pyarrow read of the train shards, (b) the Ray Data
pipeline without joins (raydecode's manifest-planned read, ``ShardSource``), (c) the same through
``ray.data.read_parquet`` (its default reader, V2, lists the files again in every execution on new
footer-reading actor processes), (d) with categories, (e) with images, and the ratios to (a). Each
Ray Data row is one dataset executed once per epoch, as a training run streams it: the median epoch after the
first, so Ray's per-execution start-up is in it, its one-time set-up not.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext
from unittest import mock

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo", choices=["tiny", "demo"])
    ap.add_argument("--store", default=None)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs, after a first untimed one")
    args = ap.parse_args()
    store_uri = args.store or f"work/bench/{args.preset}"

    from ray.data import FileShuffleConfig

    from raydecode.config import DataSelection
    from raydecode.data.ingest import run_ingest, synthetic_plan
    from raydecode.data.pipeline import betas_matrix, trials_dataset
    from raydecode.data.store import open_store
    from raydecode.report import table
    from raydecode.runtime import init_ray

    t0 = time.time()
    run_ingest(synthetic_plan(args.preset, 0), store_uri, progress=False)
    ingest_s = time.time() - t0
    store = open_store(store_uri)

    def plain() -> int:
        n = 0
        for shard in store.manifest.shards_of("trials"):
            t = store.read_shard(shard, ["split", "betas", "image_id"])
            mask = t["split"].to_numpy(zero_copy_only=False) == "train"
            n += int(betas_matrix(t["betas"])[mask].shape[0])
        return n

    init_ray()

    def read_parquet(root, shards, columns, seed, **tasks):
        """What raydecode read with before ShardSource: Ray's Parquet reader, the files in one seeded order."""
        import ray.data

        order = FileShuffleConfig(seed=seed, reseed_after_execution=False) if seed is not None else None
        return ray.data.read_parquet([root.join(s.path).path for s in shards], filesystem=root.fs, columns=columns,
                                     partitioning=None, shuffle=order, **tasks)

    def ray_pipeline(sel: DataSelection, parquet: bool = False):
        made = []

        def run() -> int:
            if not made:  # one dataset, executed once per epoch
                with mock.patch("raydecode.data.source.read_store_shards", read_parquet) if parquet else nullcontext():
                    made.append(trials_dataset(store, "train", sel).dataset)
            return sum(len(b["betas"]) for b in made[0].iter_batches(batch_size=256))
        return run

    cases = [
        ("pyarrow, one process", plain),
        ("Ray Data, no joins", ray_pipeline(DataSelection(categories=False))),
        ("  ... through ray.data.read_parquet", ray_pipeline(DataSelection(categories=False), parquet=True)),
        ("Ray Data + categories", ray_pipeline(DataSelection())),
        ("Ray Data + images", ray_pipeline(DataSelection(images=True))),
    ]
    rows, base = [], None
    for name, fn in cases:
        times = []
        for _ in range(args.epochs + 1):
            t = time.time()
            n = fn()
            times.append(time.time() - t)
        times = times[1:]  # the first epoch makes the dataset (and warms the pyarrow row too)
        rate = n / float(np.median(times))
        base = base or rate
        rows.append([name, n, float(np.median(times)), rate, rate / base])
    print(f"store {store_uri} ({args.preset}; ingest {ingest_s:.1f} s, {os.cpu_count()} cores)")
    print(table(["path", "train trials", "seconds/epoch", "trials/s", "ratio to pyarrow"], rows))
    keys = ["pyarrow", "ray_data", "ray_data_read_parquet", "ray_data_categories", "ray_data_images"]
    print("RESULT bench_data " + " ".join(f"{k}={r[4]:.3f}" for k, r in zip(keys, rows)))


if __name__ == "__main__":
    main()
