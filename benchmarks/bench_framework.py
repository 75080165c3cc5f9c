"""The data tax and the framework tax of a training job, and a sweep's efficiency, measured side by side in one run.

    .venv/bin/python benchmarks/bench_framework.py [--preset tiny|demo] [--world 1|2] [--epochs 4] [--repeats 2]
        [--subjects 7] [--read-cpus 1.0] [--read-concurrency N]

Every arm trains MindEye2 (the preset's model, all its losses, the ConvNeXt target's fresh augmented view per step)
on the same subjects with the same per-worker batch, AdamW and clipping, and the same torch threads per process
(``--threads``, default 1: with two threads on two cores a Ray worker's own threads contend with OpenMP's and a tiny
step gets slower than with one, 40 vs 36 ms, while a plain process gains 8 %). The job arms are ``raydecode pretrain``'s own ``run_training`` (1 or 2 Ray Train workers, DeepSpeed
ZeRO-0 unless ``--zero``, gloo), in interleaved repeats:

- ``job-stream``: Ray Data streaming from the store every epoch (``data.materialize: false``);
- ``job-materialized``: the same job on the train split materialized once in the object store;
- ``bare``: a plain torch loop on the same rows, read with pyarrow and held in memory, targets precomputed (the job
  caches them per image during its first epoch, which is left out of its rate); ``--world 2``: the same loop in two
  processes under ``DistributedDataParallel`` over gloo, each with its half of the rows.

The job arms read with raydecode's default ``data.read_cpus: 1`` (``--read-cpus``): with quarter-CPU read tasks a
streamed epoch runs more of them at once than Ray keeps worker processes, and Ray starts 2-4 new ones an epoch
(~2 CPU-s each, their stimulus lookups cold) beside the training thread (P1 0.83-0.96 against 0.99 at 1 CPU, demo,
3 subjects; ``--read-concurrency 2`` caps them: 0.97 in one run).

Throughput is the steady state: the median over epochs after the first of samples per second (the job's
``train.samples_per_s``, which includes each epoch's iterator start-up; the bare loop's timed the same way).
Ratios: P1 (data tax) = stream / materialized; P2 (framework tax) = bare / materialized (time per sample of the
job over the bare loop's; 1.10 means 10 % slower). The fixed cost of a run (processes, imports, datasets, MLflow,
the last evaluation and checkpoint) is its wall time minus its epochs at the steady rate.

``--sweep N`` adds (d): N trials of a grid (``optim.lr``), two at a time on Ray Tune, against one single run of the
same config: efficiency = N x single / (2 x sweep) (1.0: two slots used fully), speed-up = N x single / sweep.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import numpy as np
import torch

SUBJECTS = [1, 2, 3, 4, 5, 6, 7]
THREADS = 1  # torch threads per process (--threads)
READ = {"read_cpus": 1.0, "read_concurrency": None}  # the job arms' read tasks (--read-cpus, --read-concurrency)
ZERO = 0  # the job's ZeRO stage (--zero); 0 is DDP's all-reduce
PARTS = ("data_wait", "prepare", "step")  # an epoch's seconds: waiting for batches, their targets, the update


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_worker(rank: int, world: int, store: str, preset: str, batch: int, epochs: int, port: int,
                out: dict) -> None:
    """One process of the bare loop (DDP over gloo when ``world`` > 1); rank 0 writes its epoch times to ``out``."""
    import torch.distributed as dist

    from raydecode.config import DataSelection
    from raydecode.data.batches import collate
    from raydecode.data.pipeline import read_split
    from raydecode.data.store import open_store
    from raydecode.methods.spec import DatasetInfo, Progress, get_method
    from raydecode.nn.encoders import FrozenEncoder, TargetCache, encoder_config

    torch.set_num_threads(THREADS)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    spec = get_method("mindeye2")
    cfg = spec.config(preset)
    st = open_store(store)
    info = DatasetInfo(SUBJECTS, {s: st.manifest.subject(s).voxels for s in SUBJECTS}, len(st.manifest.categories),
                       st.manifest.tr_s)
    data = collate(read_split(store, "train", DataSelection(subjects=SUBJECTS, images=True, categories=False)))
    n = len(data["betas"]) // world
    data = {k: v[rank::world][:n] for k, v in data.items()}  # the rank's shard, as Ray Train's split
    encoders = {k: FrozenEncoder(encoder_config(v)) for k, v in spec.targets(cfg).items()}
    images = data.pop("image")
    data.update(TargetCache(encoders)(data["image_id"], images))
    augmented = {k: e for k, e in encoders.items() if e.augments}
    torch.manual_seed(0)
    model = spec.build_model(cfg, info)
    opt = torch.optim.AdamW(spec.param_groups(model, cfg, 0.01), lr=1e-3)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)  # MindEye2 uses every parameter each step
    params = [p for p in model.parameters() if p.requires_grad]
    steps = n // batch
    times, parts = [], []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        part = dict.fromkeys(PARTS, 0.0)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(steps):
            t = time.perf_counter()
            idx = perm[i * batch:(i + 1) * batch]
            b = {k: v[idx] for k, v in data.items()}
            t1 = time.perf_counter()
            for k, enc in augmented.items():
                b[f"{k}_aug_tokens"] = enc.encode_augmented(images[idx])
            t2 = time.perf_counter()
            loss, _ = spec.loss(model, b, Progress(epoch, epochs, epoch * steps + i, epochs * steps))
            if not torch.isfinite(loss.detach()).all():
                raise RuntimeError("diverged")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            part["data_wait"] += t1 - t
            part["prepare"] += t2 - t1
            part["step"] += time.perf_counter() - t2
        times.append(time.perf_counter() - t0)
        parts.append(part)
    if rank == 0:
        out.update(times=times, parts=parts, samples=steps * batch * world)
    if world > 1:
        dist.destroy_process_group()


def _bare_entry(rank, world, store, preset, batch, epochs, port, threads, subjects, queue):
    global THREADS, SUBJECTS
    THREADS, SUBJECTS = threads, subjects  # a spawned process: the module's defaults again
    out: dict = {}
    bare_worker(rank, world, store, preset, batch, epochs, port, out)
    if rank == 0:
        queue.put(out)


def bare(store: str, preset: str, world: int, batch: int, epochs: int) -> dict:
    import torch.multiprocessing as mp

    t0 = time.time()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_bare_entry, args=(r, world, store, preset, batch, epochs, port, THREADS, SUBJECTS,
                                                      queue))
             for r in range(world)]
    for p in procs:
        p.start()
    out = queue.get()
    for p in procs:
        p.join()
    rates = [out["samples"] / t for t in out["times"]]
    return {"rate": statistics.median(rates[1:]), "epochs": rates, "wall": time.time() - t0,
            "epoch_s": statistics.median(out["times"][1:]),
            **{k: statistics.median(p[k] for p in out["parts"][1:]) for k in PARTS}}


def job(store: str, workdir: str, preset: str, world: int, batch: int, epochs: int, materialize: bool,
        name: str) -> dict:
    from mlflow.tracking import MlflowClient

    from raydecode.config import TrainConfig
    from raydecode.train.launch import run_training

    cfg = TrainConfig.model_validate({
        "store": store, "workdir": workdir, "run_name": name, "preset": preset,
        "data": {"subjects": SUBJECTS, "categories": False, **READ, "materialize": materialize},
        "optim": {"epochs": epochs, "batch_size": batch, "lr": 1e-3},
        "scaling": {"num_workers": world, "cpus_per_worker": THREADS},  # Ray gives the worker as many threads
        "deepspeed": {"zero_stage": ZERO},
        "checkpoint": {"every_epochs": epochs}, "eval": {"every_epochs": epochs},
    })
    t0 = time.time()
    result = run_training(cfg, stage="bench")
    wall = time.time() - t0
    client = MlflowClient(cfg.resolved_tracking_uri())
    hist = lambda k: [m.value for m in sorted(client.get_metric_history(result.mlflow_run_id, k),  # noqa: E731
                                                key=lambda m: m.step)]
    rates, secs = hist("train.samples_per_s"), hist("epoch_seconds")
    parts = {k: statistics.median(hist(f"time.{k}_s")[1:]) for k in PARTS}
    return {"rate": statistics.median(rates[1:]), "epochs": rates, "wall": wall,
            "epoch_s": statistics.median(secs[1:]), "rss_mb": max(hist("worker.peak_rss_mb")), **parts}


def sweep(store: str, workdir: str, preset: str, batch: int, epochs: int, n: int) -> dict:
    """(d): ``n`` trials two at a time vs one single run of the same config (each a one-worker run)."""
    from raydecode.config import SweepConfig
    from raydecode.sweep import run_sweep

    base = {"store": store, "workdir": workdir, "method": "mindeye2", "preset": preset,
            "data": {"categories": False, "read_cpus": 0.25},
            "optim": {"epochs": epochs, "batch_size": batch, "lr": 1e-3},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.25}, "deepspeed": {"zero_stage": 0},
            "checkpoint": {"every_epochs": epochs}, "eval": {"every_epochs": epochs}}
    lrs = [float(x) for x in np.geomspace(5e-4, 2e-3, n)]
    cfg = SweepConfig.model_validate({**base, "run_name": "bench-sweep", "subjects": [1], "promote": False,
                                      "space": {"optim.lr": {"grid": lrs}}, "max_concurrent_trials": 2})
    t0 = time.time()
    run_sweep(cfg)
    sweep_s = time.time() - t0
    single = SweepConfig.model_validate({**base, "run_name": "bench-single", "subjects": [1], "promote": False,
                                         "space": {"optim.lr": {"grid": lrs[:1]}}, "max_concurrent_trials": 1})
    t0 = time.time()
    run_sweep(single)
    single_s = time.time() - t0
    return {"trials": n, "sweep_s": sweep_s, "single_s": single_s,
            "speedup": n * single_s / sweep_s, "efficiency": n * single_s / (2 * sweep_s)}


def main() -> None:
    global THREADS, ZERO, SUBJECTS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "demo"])
    ap.add_argument("--world", type=int, default=1, choices=[1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32, help="per worker")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each arm")
    ap.add_argument("--sweep", type=int, default=0, help="(d): trials of a sweep, two at a time (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--subjects", type=int, default=len(SUBJECTS), help="train on subjects 1..N (the epoch's length)")
    ap.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="the job's ZeRO stage")
    ap.add_argument("--read-cpus", type=float, default=1.0, help="the job arms' data.read_cpus (raydecode's default)")
    ap.add_argument("--read-concurrency", type=int, default=None, help="the job arms' data.read_concurrency")
    ap.add_argument("--arms", nargs="+", default=["job-stream", "job-materialized", "bare"],
                    choices=["job-stream", "job-materialized", "bare"], help="the arms to run (ratios need theirs)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    THREADS, ZERO, SUBJECTS = args.threads, args.zero, list(range(1, args.subjects + 1))
    READ.update(read_cpus=args.read_cpus, read_concurrency=args.read_concurrency)
    os.environ.setdefault("RAY_AUTH_MODE", "token")

    import ray

    from raydecode.data.ingest import run_ingest, synthetic_plan
    from raydecode.runtime import local_system_config, require_token_auth

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        store = f"{tmp}/store"
        run_ingest(synthetic_plan(args.preset, 0, timeseries=False), store, progress=False)
        require_token_auth()
        # 4 logical CPUs on the 2 cores: a worker holds 2 // world of them (its torch threads), beside the room the
        # job reserves for Ray Data's tasks
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="error",
                 _system_config=local_system_config())
        arms: dict[str, list[dict]] = {arm: [] for arm in args.arms}
        for r in range(args.repeats):
            for arm in arms:
                if arm == "bare":
                    res = bare(store, args.preset, args.world, args.batch_size, args.epochs)
                else:
                    res = job(store, tmp, args.preset, args.world, args.batch_size, args.epochs,
                              arm == "job-materialized", f"{arm}-{r}")
                arms[arm].append(res)
                print(f"[bench] {arm} repeat {r}: {res['rate']:.1f} samples/s (epochs "
                      f"{', '.join(f'{v:.0f}' for v in res['epochs'])}), {res['wall']:.1f} s", flush=True)
        sw = sweep(store, tmp, args.preset, args.batch_size, args.epochs, args.sweep) if args.sweep else None
        ray.shutdown()

    med = {arm: statistics.median(r["rate"] for r in rs) for arm, rs in arms.items()}
    print(f"\nMindEye2 ({args.preset}), subjects {SUBJECTS}, world {args.world}, batch {args.batch_size} per worker, "
          f"{args.epochs} epochs, ZeRO-{ZERO}, {THREADS} torch threads per process, {args.repeats} interleaved repeats, "
          f"data.read_cpus {READ['read_cpus']}, read_concurrency {READ['read_concurrency']}")
    print(f"{'arm':18s} {'samples/s':>10s} {'min':>8s} {'max':>8s} {'epoch s':>8s} = {'wait':>6s} + {'prep':>6s} + "
          f"{'step':>6s} + {'other':>6s} {'wall s':>7s} {'fixed s':>8s} {'RSS MB':>7s}")
    for arm, rs in arms.items():
        rates = [r["rate"] for r in rs]
        epoch_s = statistics.median(r["epoch_s"] for r in rs)
        p = {k: statistics.median(r[k] for r in rs) for k in PARTS}
        wall = statistics.median(r["wall"] for r in rs)
        rss = max((r.get("rss_mb", 0) for r in rs), default=0)
        print(f"{arm:18s} {med[arm]:10.1f} {min(rates):8.1f} {max(rates):8.1f} {epoch_s:8.2f} = "
              f"{p['data_wait']:6.2f} + {p['prepare']:6.2f} + {p['step']:6.2f} + {epoch_s - sum(p.values()):6.2f} "
              f"{wall:7.1f} {wall - args.epochs * epoch_s:8.1f} {rss or float('nan'):7.0f}")
    results = []
    if {"job-stream", "job-materialized"} <= set(arms):
        p1 = med["job-stream"] / med["job-materialized"]
        print(f"\nP1 data tax  (stream / materialized samples/s): {p1:.3f}   (target >= 0.95)")
        results.append(f"p1={p1:.3f}")
    if {"bare", "job-materialized"} <= set(arms):
        p2 = med["bare"] / med["job-materialized"]
        print(f"P2 framework tax (bare / job samples/s, time per sample): {p2:.3f}   (target <= 1.10)")
        results.append(f"p2={p2:.3f}")
    if sw:
        print(f"sweep: {sw['trials']} trials 2 at a time {sw['sweep_s']:.1f} s, one single trial {sw['single_s']:.1f} s: "
              f"speed-up {sw['speedup']:.2f}x over back to back, slot efficiency {sw['efficiency']:.2f}")
        results += [f"sweep_speedup={sw['speedup']:.2f}", f"sweep_efficiency={sw['efficiency']:.2f}"]
    print("RESULT bench_framework " + " ".join(results or ["none=" + ",".join(arms)]))

if __name__ == "__main__":
    main()
