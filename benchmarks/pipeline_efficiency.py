"""Pipeline efficiency: the real training job vs. a bare PyTorch loop, side by side in one run.

    .venv/bin/python benchmarks/pipeline_efficiency.py [--preset tiny|demo] [--epochs 4]

Real job: `raydecode pretrain` machinery (Ray Data streaming from the store, 2 Ray Train workers,
DeepSpeed ZeRO-2, frozen targets cached per worker), steady-state samples/s = median over epochs
after the first. Bare loop: the same model, optimizer and per-step batch size in one process over
tensors already in memory (targets precomputed). Prints both, their ratio and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time

import numpy as np
import torch


def bare_loop(store: str, preset: str, subjects: list[int], batch_size: int, steps: int) -> dict:
    from raydecode.nn.encoders import FrozenEncoder, TargetCache, encoder_config
    from raydecode.config import DataSelection
    from raydecode.data.pipeline import read_split
    from raydecode.data.store import open_store
    from raydecode.methods.spec import DatasetInfo, Progress, get_method
    from raydecode.data.batches import collate

    spec = get_method("mindeye2")
    cfg = spec.config(preset)
    st = open_store(store)
    info = DatasetInfo(subjects, {s: st.manifest.subject(s).voxels for s in subjects})
    data = collate(read_split(store, "train", DataSelection(subjects=subjects, images=True, categories=False)))
    encoders = {k: FrozenEncoder(encoder_config(v)) for k, v in spec.targets(cfg).items()}
    images = data.pop("image")
    data.update(TargetCache(encoders)(data["image_id"], images))
    augmented = {k: e for k, e in encoders.items() if e.augments}  # a fresh view per step, as the train loop
    torch.manual_seed(0)
    model = spec.build_model(cfg, info)
    opt = torch.optim.AdamW(spec.param_groups(model, cfg, 0.01), lr=1e-3)
    n = len(data["betas"])
    times = []
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,))
        batch = {k: v[idx] for k, v in data.items()}
        t0 = time.perf_counter()
        for k, enc in augmented.items():
            batch[f"{k}_aug_tokens"] = enc.encode_augmented(images[idx])
        loss, _ = spec.loss(model, batch, Progress(0, 1, step, steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    steady = times[len(times) // 4:]
    return {"samples_per_s": batch_size / statistics.median(steady),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "demo"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32, help="per worker")
    args = ap.parse_args()

    import ray
    from mlflow.tracking import MlflowClient

    from raydecode.config import TrainConfig
    from raydecode.data.ingest import run_ingest, synthetic_plan
    from raydecode.train.launch import run_training

    subjects = [1, 2, 3, 4, 5, 6, 7]
    with tempfile.TemporaryDirectory() as tmp:
        store = f"{tmp}/store"
        run_ingest(synthetic_plan(args.preset, 0, timeseries=False), store, progress=False)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
        cfg = TrainConfig.model_validate({
            "store": store, "workdir": tmp, "run_name": "bench", "preset": args.preset,
            "data": {"subjects": subjects, "categories": False, "read_cpus": 0.25, "lookup_cpus": 0.25},
            "optim": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": 1e-3},
            "scaling": {"num_workers": 2, "cpus_per_worker": 0.25}, "deepspeed": {"zero_stage": 2},
            "checkpoint": {"every_epochs": args.epochs}, "eval": {"every_epochs": args.epochs},
        })
        result = run_training(cfg, stage="bench")
        client = MlflowClient(cfg.resolved_tracking_uri())
        sps = [m.value for m in client.get_metric_history(result.mlflow_run_id, "train.samples_per_s")]
        rss = [m.value for m in client.get_metric_history(result.mlflow_run_id, "worker.peak_rss_mb")]
        ray.shutdown()
        real = statistics.median(sps[1:] if len(sps) > 1 else sps)
        steps = max(20, int(result.metrics["step"] / args.epochs))
        # the bare loop does the work of both workers: twice the per-worker batch, one process
        bare = bare_loop(store, args.preset, subjects, 2 * args.batch_size, steps)

    print(f"\npipeline efficiency ({args.preset} preset, {len(subjects)} subjects, batch {args.batch_size} x 2 workers)")
    print(f"  real job (Ray Data -> 2 workers, DeepSpeed ZeRO-2): {real:8.1f} samples/s   "
          f"(per-epoch {', '.join(f'{v:.0f}' for v in sps)}), worker peak RSS {max(rss):.0f} MB")
    print(f"  bare PyTorch loop, tensors in memory:              {bare['samples_per_s']:8.1f} samples/s   "
          f"peak RSS {bare['peak_rss_mb']:.0f} MB")
    print(f"  ratio real / bare: {real / bare['samples_per_s']:.3f}")


if __name__ == "__main__":
    main()
