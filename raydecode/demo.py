"""`make demo`: the main job on embedded defaults (local Ray, local store, sqlite MLflow, synthetic NSD).

Stages so far: ingest a synthetic NSD, summarise and verify it, stream it through
the Ray Data pipeline the trainers use. Later stages (pretrain, sweep, dynadiff,
evaluate, promote) append themselves here.
"""

from __future__ import annotations

import os
import time

from raydecode.config import DemoConfig
from raydecode.report import StageResult, table


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray if neither is set."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=True, logging_level="warning")


def run_demo(cfg: DemoConfig) -> StageResult:
    from raydecode.data.info import describe, describe_problems
    from raydecode.data.ingest import run_ingest, synthetic_plan
    from raydecode.data.pipeline import DataSelection, trials_dataset
    from raydecode.data.store import open_store

    os.makedirs(cfg.workdir, exist_ok=True)
    steps: list[list] = []
    t0 = time.time()
    print(f"== 1. ingest synthetic NSD (preset {cfg.preset}, seed {cfg.seed}) -> {cfg.store}")
    res = run_ingest(synthetic_plan(cfg.preset, cfg.seed), cfg.store, cfg.s3)
    steps.append(["ingest", res.status, f"{res.written} shards written, {res.skipped} kept", f"{time.time() - t0:.1f}"])

    t1 = time.time()
    print("\n== 2. verify the store")
    store = open_store(cfg.store, cfg.s3)
    problems = store.verify()
    print(describe(store))
    print(describe_problems(problems, len(store.manifest.shards)))
    steps.append(["verify", "ok" if not problems else "failed", f"{len(problems)} problems", f"{time.time() - t1:.1f}"])

    t2 = time.time()
    print("\n== 3. stream it with Ray Data (train: session 1 of every subject; test: repetitions averaged)")
    init_ray()
    train = trials_dataset(store, "train", DataSelection(sessions=[1], images=True))
    n_train = 0
    for batch in train.dataset.iter_batches(batch_size=256):
        n_train += len(batch["betas"])
    test = trials_dataset(store, "test", DataSelection(sessions=None))
    n_test = sum(len(b["betas"]) for b in test.dataset.iter_batches(batch_size=256))
    secs = time.time() - t2
    steps.append(["stream", "ok", f"{n_train} train trials (1 session x {len(train.subjects)} subjects), "
                  f"{n_test} averaged test rows", f"{secs:.1f}"])

    print("\n" + table(["step", "status", "what", "seconds"], steps))
    return StageResult(
        stage="demo",
        status="ok" if not problems else "failed",
        metrics={"train_rows_session1": n_train, "test_rows_averaged": n_test, "problems": len(problems),
                 "seconds": round(time.time() - t0, 2)},
        artifacts={"store": store.uri},
    )
