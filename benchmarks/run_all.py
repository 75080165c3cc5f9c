"""``make bench``: every benchmark, one after another (never side by side: they time the same two cores), each one's
full output in ``work/bench/<name>.log``, then one table of the ratios they measured.

    .venv/bin/python benchmarks/run_all.py [--only bench_step bench_framework ...]

Each benchmark prints a last ``RESULT <name> key=value ...`` line; a benchmark that fails is listed as failed and
the others still run (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# (script, its arguments, {result key: (what the ratio is, the target or what 1.0 means)})
BENCHMARKS = [
    ("bench_step", ["--preset", "demo", "--repeats", "5", "--steps", "20"], {
        "deepspeed": ("MindEye2 step in DeepSpeed's engine / bare torch (demo, 1 process)", "<= 1.10"),
        "deepspeed_loop": ("... plus the train loop's per-step checks", "<= 1.10"),
    }),
    ("bench_framework", ["--preset", "demo", "--subjects", "3", "--repeats", "2", "--epochs", "3", "--arms",
                         "job-stream", "job-materialized"], {
        "p1": ("P1 data tax: job streaming / materialized, samples/s (world 1, demo preset, 3 subjects: 12 s epochs)",
               ">= 0.95"),
    }),
    ("bench_framework", ["--preset", "tiny", "--repeats", "2", "--sweep", "4", "--arms", "job-materialized", "bare"], {
        "p2": ("P2 framework tax: bare loop / Ray Train + DeepSpeed job, samples/s (world 1)", "<= 1.10"),
        "sweep_speedup": ("sweep of 4 trials 2 at a time: speed-up over back to back", "2.0 = ideal"),
        "sweep_efficiency": ("... its slot efficiency", "1.0 = ideal"),
    }),
    ("bench_framework", ["--preset", "tiny", "--repeats", "1", "--world", "2"], {
        "p1": ("P1 data tax at world 2 (2 Ray Train workers; tiny preset, 1 s epochs: Ray Data's ~0.2 s start of "
               "an epoch shows)", ">= 0.95"),
        "p2": ("P2 framework tax at world 2: DDP over gloo / the job (ZeRO-0)", "<= 1.10"),
    }),
    ("bench_peer", ["--prior-deps", "work/bench/peer-site", "--repeats", "3", "--steps", "2"], {
        "bimixco": ("peer: our MindEye2 step / the MindEyeV2 reference's, same sizes and inputs (BiMixCo phase; "
                    "needs MINDEYEV2_REPO)", "<= 1.0"),
        "softclip": ("... SoftCLIP phase", "<= 1.0"),
        "prior": ("... with the reference's diffusion prior (dalle2-pytorch, installed into work/bench/peer-site)",
                  "yes"),
    }),
    ("bench_data", ["--preset", "demo"], {
        "ray_data": ("Ray Data read of the train split, per epoch / pyarrow in one process (demo store; ShardSource)",
                     "1.0 = par"),
        "ray_data_read_parquet": ("... through ray.data.read_parquet (lists and reads footers every epoch)",
                                  "1.0 = par"),
        "ray_data_categories": ("... with the categories joined (in the read tasks)", "1.0 = par"),
        "ray_data_images": ("... with the images joined", "1.0 = par"),
    }),
    ("bench_datapath", [], {
        "local.betas+tokens": ("paper-shaped store, local disk, bigG tokens joined uncached (NSD: ~300x the decodes): "
                               "delivered per worker / one GPU's need at 40 % MFU", "> 1: GPU fed"),
        "local.tokens+cache": ("... the same through data.local_cache (node-local memory-mapped copies)", "> 1: GPU fed"),
        "s3.betas+tokens": ("... from S3 (moto on 127.0.0.1), uncached", "> 1: GPU fed"),
        "s3.tokens+cache": ("... from S3 through data.local_cache (jobs/pretrain-nsd.yaml's choice)", "> 1: GPU fed"),
        "local.betas+images": ("... images for bigG on the GPU, uncached", "> 1: GPU fed"),
        "s3.images+cache": ("... images from S3 through data.local_cache", "> 1: GPU fed"),
        "s3.betas": ("... betas alone from S3", "> 1: GPU fed"),
    }),
    ("bench_memory", ["--batch", "256"], {
        "mindeye2": ("measured peak RSS / model-info --memory's estimate, MindEye2 (demo)", "1 +- 0.2"),
        "duala": ("... Duala", "1 +- 0.2"),
        "dynadiff": ("... Dynadiff", "1 +- 0.2"),
    }),
    ("bench_gpu", ["--plan"], {
        "mindeye2_mfu": ("one GPU, bf16: MindEye2 paper preset (jobs/pretrain-nsd.yaml), model FLOPs utilisation",
                         "0.40"),
        "mindeye2_samples_s": ("... samples/s", "-"),
        "dynadiff_mfu": ("... Dynadiff paper preset (jobs/dynadiff-nsd.yaml), MFU", "0.40"),
        "dynadiff_samples_s": ("... samples/s", "-"),
    }),
    ("bench_ingest", ["--sessions", "1"], {
        "ray_tasks_speedup": ("NSD-sized ingest: Ray tasks / one process, speed", "~ cores used"),
    }),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None)
    ap.add_argument("--logs", default="work/bench")
    args = ap.parse_args()
    os.makedirs(args.logs, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows, failed, t_all = [], [], time.time()
    for i, (name, argv, keys) in enumerate(BENCHMARKS):
        if args.only and name not in args.only:
            continue
        log = os.path.join(args.logs, f"{name}-{i}.log")
        cmd = [sys.executable, os.path.join(HERE, f"{name}.py"), *argv]
        print(f"[bench] {' '.join([name, *argv])} (log {log})", flush=True)
        t0 = time.time()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        secs = time.time() - t0
        results = {}
        for line in open(log):
            if line.startswith(f"RESULT {name} "):
                results = dict(kv.split("=", 1) for kv in line.split()[2:])
        if proc.returncode != 0 or not results:
            failed.append(name)
            print(f"[bench] {name} FAILED (exit {proc.returncode}) after {secs:.0f} s: see {log}", flush=True)
            continue
        print(f"[bench] {name}: {secs:.0f} s", flush=True)
        for key, (what, target) in keys.items():
            rows.append((name, what, results.get(key) or ("skipped" if "skipped" in results else "-"), target))
    width = max((len(r[1]) for r in rows), default=10)
    print(f"\nraydecode benchmarks at {commit}, {os.cpu_count()} CPUs, {time.time() - t_all:.0f} s in all")
    print(f"{'benchmark':16s} {'ratio':{width}s} {'value':>8s}  target")
    for name, what, value, target in rows:
        print(f"{name:16s} {what:{width}s} {value:>8s}  {target}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
