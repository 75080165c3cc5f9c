"""`make demo`: the main job on embedded defaults (local Ray, local store, sqlite MLflow, synthetic NSD).

Stages so far: ingest a synthetic NSD, summarise and verify it, stream it through
the Ray Data pipeline the trainers use, pretrain MindEye2 on 7 subjects (Ray Train
+ DeepSpeed ZeRO-2, 2 CPU workers) and fine-tune it on one session of the 8th.
then a Duala sweep on subject 8 and Dynadiff on subject 1's time series.
Later stages (evaluate) append themselves here.
"""

from __future__ import annotations

import os
import time

from raydecode.config import DemoConfig
from raydecode.report import StageResult, table
from raydecode.runtime import init_ray, ray_logs_dir


def run_demo(cfg: DemoConfig) -> StageResult:
    from raydecode.config import DataSelection
    from raydecode.data.info import describe, describe_problems
    from raydecode.data.ingest import run_ingest, synthetic_plan
    from raydecode.data.pipeline import trials_dataset
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

    from raydecode.train.launch import run_training

    t3 = time.time()
    print("\n== 4. pretrain MindEye2 on subjects 1-7 (Ray Train, DeepSpeed ZeRO-2, 2 CPU workers)")
    pre = run_training(demo_train_config(cfg, "pretrain"), stage="pretrain")
    pm = pre.metrics
    steps.append(["pretrain", pre.status, f"retrieval top-1 {_top1(pm)}", f"{time.time() - t3:.1f}"])

    t4 = time.time()
    print("\n== 5. fine-tune on one session of subject 8 (MindEye2's 1-hour recipe)")
    ft = run_training(demo_train_config(cfg, "finetune", init_from=pre.artifacts["checkpoint"]), stage="finetune")
    fm = ft.metrics
    steps.append(["finetune", ft.status, f"subject 8, session 1: top-1 {_top1(fm)}", f"{time.time() - t4:.1f}"])

    t5 = time.time()
    print("\n== 6. Duala on subject 8: a Ray Tune sweep over the triplet margin, best trial registered and gated")
    from raydecode.sweep import run_sweep

    sw = run_sweep(demo_sweep_config(cfg, pre.artifacts["checkpoint"]))
    promoted = {k: v for k, v in sw.artifacts.items() if k.startswith("raydecode-")}
    best = max((v for k, v in sw.metrics.items() if k.startswith("best.")), default=float("nan"))
    steps.append(["sweep", sw.status, f"{int(sw.metrics['trials_ok'])}/{int(sw.metrics['trials'])} trials ok, best "
                  f"image->brain top-1 {best:.2f}; " + ", ".join(f"{k}: {v.split()[-1].strip('()')}"
                                                                 for k, v in promoted.items()),
                  f"{time.time() - t5:.1f}"])

    t6 = time.time()
    print("\n== 7. Dynadiff on subject 1: LoRA diffusion fine-tuning on BOLD time-series windows, test-set "
          "reconstructions, time-resolved decoding, registered and gated")
    from raydecode.reconstruct import run_dynadiff

    dd = run_dynadiff(demo_dynadiff_config(cfg))
    dm = dd.metrics
    steps.append(["dynadiff", dd.status, f"subject 1: test diffusion loss {dm['final.test.diffusion_loss']:.3f} "
                  f"(null {dm['final.test.null_loss']:.3f}), PixCorr {dm['final.recon.pixcorr']:.3f}; grid "
                  f"{os.path.relpath(dd.artifacts['reconstructions.reconstructions.png'])}", f"{time.time() - t6:.1f}"])
    if "model" in dd.artifacts:
        promoted[dd.artifacts["model"].split("/")[1]] = f"{dd.artifacts['model']} ({dd.artifacts['alias']})"

    t7 = time.time()
    print("\n== 8. evaluate the subject-8 models (Duala's champion vs the MindEye2 fine-tune) and compare them")
    from raydecode.config import CompareConfig
    from raydecode.evaluate.suite import run_compare, run_evaluate

    refs = [r for r in ("models:/raydecode-duala-subj08@champion", ft.artifacts["checkpoint"])
            if not r.startswith("models:/") or "raydecode-duala-subj08" in promoted]
    evals = [run_evaluate(demo_evaluate_config(cfg, r)) for r in refs]
    cmp_ = run_compare(CompareConfig(store=cfg.store, workdir=cfg.workdir, tracking_uri=cfg.tracking_uri,
                                     s3=cfg.s3, models=refs))
    steps.append(["evaluate", "ok", f"{len(evals)} models, averaged + single trial; table "
                  f"{os.path.relpath(cmp_.artifacts['table'])}", f"{time.time() - t7:.1f}"])

    print("\n" + table(["step", "status", "what", "seconds"], steps))
    if promoted:
        print("\npromoted models: " + "; ".join(f"{v}" for v in promoted.values()))
    print(f"\nMLflow: mlflow ui --backend-store-uri {cfg.resolved_tracking_uri()}")
    print(f"Ray's logs (Ray Data's progress in ray-data.log, every worker's output): {ray_logs_dir()}")
    return StageResult(
        stage="demo",
        status="ok" if not problems else "failed",
        mlflow_run_id=ft.mlflow_run_id,
        metrics={"train_rows_session1": n_train, "test_rows_averaged": n_test, "problems": len(problems),
                 **{f"pretrain.{k}": v for k, v in pm.items() if k.startswith("retrieval.")},
                 **{f"finetune.{k}": v for k, v in fm.items() if k.startswith("retrieval.")},
                 **{f"sweep.{k}": v for k, v in sw.metrics.items() if k != "seconds"},
                 **{f"dynadiff.{k}": v for k, v in dm.items() if k.startswith("final.")},
                 **{f"evaluate.{r}.{k}": v for r, e in zip(refs, evals) for k, v in e.metrics.items()
                    if k.startswith(("retrieval.", "recon."))},
                 "seconds": round(time.time() - t0, 2)},
        artifacts={"store": store.uri, "pretrained": pre.artifacts["checkpoint"],
                   "finetuned": ft.artifacts["checkpoint"], "sweep_run": sw.artifacts["mlflow_run"],
                   "dynadiff": dd.artifacts["checkpoint"], "comparison": cmp_.artifacts["table"], **promoted},
    )


def _top1(m: dict) -> str:
    return (f"{m['retrieval.brain_to_image_top1']:.2f} / {m['retrieval.image_to_brain_top1']:.2f} "
            f"(chance {m['retrieval.chance']:.3f})")


def demo_train_config(cfg: DemoConfig, which: str, init_from: str | None = None):
    """The embedded twins of jobs/pretrain.yaml and jobs/finetune.yaml, on the demo's store and work dir."""
    from raydecode.config import TrainConfig

    common = {
        "store": cfg.store, "workdir": cfg.workdir, "tracking_uri": cfg.tracking_uri, "s3": cfg.s3.model_dump(),
        "method": "mindeye2", "preset": cfg.preset,
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.25},
        "deepspeed": {"zero_stage": 2}, "checkpoint": {"max_failures": 1},
    }
    data = {"categories": False, "read_cpus": 0.25, "lookup_cpus": 0.25}
    if which == "pretrain":
        return TrainConfig.model_validate({
            **common, "run_name": "pretrain-demo", "data": {**data, "subjects": [1, 2, 3, 4, 5, 6, 7]},
            "optim": {"epochs": 5, "batch_size": 64, "lr": 1e-3}})
    return TrainConfig.model_validate({
        **common, "run_name": "finetune-demo-subj08", "init_from": init_from,
        "data": {**data, "subjects": [8], "sessions": [1]},
        "optim": {"epochs": 6, "batch_size": 16, "lr": 1e-3}, "checkpoint": {"max_failures": 1, "every_epochs": 3}})


def demo_sweep_config(cfg: DemoConfig, init_from: str):
    """The embedded twin of jobs/sweep.yaml: Duala on subject 8, session 1, margin 0.1 vs 0.3."""
    from raydecode.config import SweepConfig

    return SweepConfig.model_validate({
        "store": cfg.store, "workdir": cfg.workdir, "tracking_uri": cfg.tracking_uri, "s3": cfg.s3.model_dump(),
        "run_name": "sweep-demo", "method": "duala", "preset": cfg.preset, "init_from": init_from, "subjects": [8],
        "space": {"model.margin": {"grid": [0.1, 0.3]}, "model.lambda_rc": {"grid": [0.1]}},
        "data": {"sessions": [1], "read_cpus": 0.25, "lookup_cpus": 0.25},
        "optim": {"epochs": 4, "batch_size": 10, "lr": 1e-3},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.25}, "deepspeed": {"zero_stage": 0},
        "checkpoint": {"every_epochs": 4}})


def demo_dynadiff_config(cfg: DemoConfig):
    """The embedded twin of jobs/dynadiff.yaml."""
    from raydecode.config import DiffusionDecodeConfig

    return DiffusionDecodeConfig.model_validate({
        "store": cfg.store, "workdir": cfg.workdir, "tracking_uri": cfg.tracking_uri, "s3": cfg.s3.model_dump(),
        "run_name": "dynadiff-demo-subj01", "method": "dynadiff", "preset": cfg.preset,
        "model": {"eval_timesteps": 4},
        "data": {"subjects": [1], "categories": False, "read_cpus": 0.25, "lookup_cpus": 0.25},
        "optim": {"epochs": 3, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.01},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.25}, "deepspeed": {"zero_stage": 2},
        "checkpoint": {"every_epochs": 3},
        "reconstruct": {"steps": 20, "guidance": 3.0, "single_trial": False, "grid_images": 16,
                        "max_images": 16},
        "time_resolved": {"shifts": [-2, 0, 2], "specialized": []}})


def demo_evaluate_config(cfg: DemoConfig, model: str):
    """The embedded twin of jobs/evaluate.yaml."""
    from raydecode.config import EvaluateConfig
    from raydecode.evaluate.feature_metrics import SMALL_NETS

    nets = [n.model_dump(exclude_defaults=True) for n in SMALL_NETS]
    return EvaluateConfig.model_validate({
        "store": cfg.store, "workdir": cfg.workdir, "tracking_uri": cfg.tracking_uri, "s3": cfg.s3.model_dump(),
        "model": model, "protocols": ["averaged", "single"], "retrieval": {"candidates": 300, "draws": 30},
        "decoder": {"preset": cfg.preset, "blend": 0.5, "steps": 6},
        "reconstruct": {"max_images": 8, "grid_images": 8, "size": 425}, "metric_nets": nets,
        "actors": 1, "cpus_per_actor": 0.5, "data": {"read_cpus": 0.25, "lookup_cpus": 0.25}})
