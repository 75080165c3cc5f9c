"""Data-path throughput, measured side by side in one run.

    python benchmarks/bench_data.py [--preset demo] [--store DIR]

Prints trials/s for (a) a plain single-process pyarrow read of the train shards, (b) the Ray Data
pipeline without joins, (c) the same with Ray Data's default 32 parquet footer-reading actors per read
(raydecode starts one per 10 shards: `raydecode.data.pipeline.read_shards`; on par here, where a warm local Ray
starts few of them before the listing ends; on a fresh cluster, where each is a new process of the job's
runtime_env, the 32 cost the cluster test's job 70 s instead of 9), (d) with categories, (e) with images, and the
ratios to (a). The Ray Data rows include Ray's per-execution start-up, which dominates on
small stores.
"""

from __future__ import annotations

import argparse
import os
import time
from unittest import mock

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="demo", choices=["tiny", "demo"])
    ap.add_argument("--store", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    store_uri = args.store or f"work/bench/{args.preset}"

    from raydecode.config import DataSelection
    from raydecode.data.ingest import run_ingest, synthetic_plan
    from raydecode.data.pipeline import FOOTER_ACTORS_ENV, betas_matrix, trials_dataset
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

    def ray_pipeline(sel: DataSelection, footer_actors: int | None = None):
        def run() -> int:
            # for this read only: patch.dict restores whatever the variable was
            with mock.patch.dict(os.environ, {FOOTER_ACTORS_ENV: str(footer_actors)} if footer_actors else {}):
                ds = trials_dataset(store, "train", sel).dataset
            return sum(len(b["betas"]) for b in ds.iter_batches(batch_size=256))
        return run

    cases = [
        ("pyarrow, one process", plain),
        ("Ray Data, no joins", ray_pipeline(DataSelection(categories=False))),
        ("  ... with Ray's 32 footer readers", ray_pipeline(DataSelection(categories=False), footer_actors=32)),
        ("Ray Data + categories", ray_pipeline(DataSelection())),
        ("Ray Data + images", ray_pipeline(DataSelection(images=True))),
    ]
    rows, base = [], None
    for name, fn in cases:
        times = []
        for _ in range(args.epochs):
            t = time.time()
            n = fn()
            times.append(time.time() - t)
        rate = n / float(np.median(times))
        base = base or rate
        rows.append([name, n, float(np.median(times)), rate, rate / base])
    print(f"store {store_uri} ({args.preset}; ingest {ingest_s:.1f} s, {os.cpu_count()} cores)")
    print(table(["path", "train trials", "seconds/epoch", "trials/s", "ratio to pyarrow"], rows))
    keys = ["pyarrow", "ray_data", "ray_data_32_footer_readers", "ray_data_categories", "ray_data_images"]
    print("RESULT bench_data " + " ".join(f"{k}={r[4]:.3f}" for k, r in zip(keys, rows)))


if __name__ == "__main__":
    main()
