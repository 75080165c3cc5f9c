"""`make demo`: the main job on embedded defaults (local Ray, local store, sqlite MLflow, synthetic NSD).

Ingest a synthetic NSD, summarise and verify it, stream it through the Ray Data pipeline the trainers use,
pretrain MindEye2 on 7 subjects (Ray Train + DeepSpeed ZeRO-2, 2 CPU workers) and fine-tune it on one session of
the 8th, a Duala sweep on subject 8, Dynadiff on subject 1's time series, MindLink (one model for subjects 1-3, no
per-subject parameters), CLIP-MUSED (semantic decoding of subjects 1-6), then evaluate and compare the subject-8 models. Each stage runs its ``jobs/<stage>.yaml``
on the demo's store, work dir and preset.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import yaml

from raydecode.config import (
    CompareConfig,
    DataSelection,
    DemoConfig,
    DiffusionDecodeConfig,
    EvaluateConfig,
    SweepConfig,
    TrainConfig,
    load_config,
)
from raydecode.data.info import describe, describe_problems
from raydecode.data.ingest import run_ingest, synthetic_plan
from raydecode.data.pipeline import trials_dataset
from raydecode.data.store import open_store
from raydecode.diffusion_decode import run_dynadiff
from raydecode.errors import ConfigError
from raydecode.evaluate.suite import run_compare, run_evaluate
from raydecode.report import StageResult, table
from raydecode.runtime import init_ray, ray_logs_dir
from raydecode.sweep import run_sweep
from raydecode.train.launch import run_training

C = TypeVar("C")


def run_demo(cfg: DemoConfig) -> StageResult:
    os.makedirs(cfg.workdir, exist_ok=True)
    steps: list[list] = []
    t0 = time.time()
    store, problems = _ingest_and_verify(cfg, steps)
    n_train, n_test = _stream(store, steps)
    pre, ft = _train(cfg, steps)
    sw, promoted = _sweep(cfg, pre.artifacts["checkpoint"], steps)
    dd = _dynadiff(cfg, steps, promoted)
    ml = _mindlink(cfg, steps)
    cm = _clip_mused(cfg, steps)
    refs, evals, cmp_ = _evaluate(cfg, ft.artifacts["checkpoint"], promoted, steps)

    print("\n" + table(["step", "status", "what", "seconds"], steps))
    if promoted:
        print("\npromoted models: " + "; ".join(f"{v}" for v in promoted.values()))
    print(f"\nMLflow: mlflow ui --backend-store-uri {cfg.resolved_tracking_uri()}")
    print(f"Ray's logs (Ray Data's progress in ray-data.log, every worker's output): {ray_logs_dir()}")
    pm, fm, dm = pre.metrics, ft.metrics, dd.metrics
    return StageResult(
        stage="demo",
        status="ok" if not problems else "failed",
        mlflow_run_id=ft.mlflow_run_id,
        metrics={"train_rows_session1": n_train, "test_rows_averaged": n_test, "problems": len(problems),
                 **{f"pretrain.{k}": v for k, v in pm.items() if k.startswith("retrieval.")},
                 **{f"finetune.{k}": v for k, v in fm.items() if k.startswith("retrieval.")},
                 **{f"sweep.{k}": v for k, v in sw.metrics.items() if k != "seconds"},
                 **{f"dynadiff.{k}": v for k, v in dm.items() if k.startswith("final.")},
                 **{f"mindlink.{k}": v for k, v in ml.metrics.items() if k.startswith("retrieval.")},
                 **{f"clip_mused.{k}": v for k, v in cm.metrics.items() if k.startswith("semantic.")},
                 **{f"evaluate.{r}.{k}": v for r, e in zip(refs, evals) for k, v in e.metrics.items()
                    if k.startswith(("retrieval.", "recon."))},
                 "seconds": round(time.time() - t0, 2)},
        artifacts={"store": store.uri, "pretrained": pre.artifacts["checkpoint"],
                   "finetuned": ft.artifacts["checkpoint"], "sweep_run": sw.artifacts["mlflow_run"],
                   "dynadiff": dd.artifacts["checkpoint"], "mindlink": ml.artifacts["checkpoint"],
                   "clip_mused": cm.artifacts["checkpoint"],
                   "comparison": cmp_.artifacts["table"], **promoted},
    )


@contextmanager
def _step(steps: list[list], name: str, title: str) -> Iterator[list]:
    """One row of the demo's summary: ``[name, status, what]`` filled in by the block, then its seconds."""
    print(f"\n== {len(steps) + 1}. {title}")
    t = time.time()
    row = [name, "ok", ""]
    yield row
    steps.append(row + [f"{time.time() - t:.1f}"])


def _ingest_and_verify(cfg: DemoConfig, steps: list[list]):
    with _step(steps, "ingest", f"ingest synthetic NSD (preset {cfg.preset}, seed {cfg.seed}) -> {cfg.store}") as row:
        res = run_ingest(synthetic_plan(cfg.preset, cfg.seed), cfg.store, cfg.s3)
        row[1:] = [res.status, f"{res.written} shards written, {res.skipped} kept"]
    with _step(steps, "verify", "verify the store") as row:
        store = open_store(cfg.store, cfg.s3)
        problems = store.verify()
        print(describe(store))
        print(describe_problems(problems, len(store.manifest.shards)))
        row[1:] = ["ok" if not problems else "failed", f"{len(problems)} problems"]
    return store, problems


def _stream(store, steps: list[list]) -> tuple[int, int]:
    with _step(steps, "stream", "stream it with Ray Data (train: session 1 of every subject; test: repetitions "
               "averaged)") as row:
        init_ray()
        train = trials_dataset(store, "train", DataSelection(sessions=[1], images=True))
        n_train = sum(len(batch["betas"]) for batch in train.dataset.iter_batches(batch_size=256))
        test = trials_dataset(store, "test", DataSelection(sessions=None))
        n_test = sum(len(b["betas"]) for b in test.dataset.iter_batches(batch_size=256))
        row[2] = (f"{n_train} train trials (1 session x {len(train.subjects)} subjects), "
                  f"{n_test} averaged test rows")
    return n_train, n_test


def _train(cfg: DemoConfig, steps: list[list]):
    with _step(steps, "pretrain", "pretrain MindEye2 on subjects 1-7 (Ray Train, DeepSpeed ZeRO-2, 2 CPU "
               "workers)") as row:
        pre = run_training(demo_train_config(cfg, "pretrain"), stage="pretrain")
        row[1:] = [pre.status, f"retrieval top-1 {_top1(pre.metrics)}"]
    with _step(steps, "finetune", "fine-tune on one session of subject 8 (MindEye2's 1-hour recipe)") as row:
        ft = run_training(demo_train_config(cfg, "finetune", init_from=pre.artifacts["checkpoint"]),
                          stage="finetune")
        row[1:] = [ft.status, f"subject 8, session 1: top-1 {_top1(ft.metrics)}"]
    return pre, ft


def _sweep(cfg: DemoConfig, pretrained: str, steps: list[list]):
    with _step(steps, "sweep", "Duala on subject 8: a Ray Tune sweep over the triplet margin, best trial registered "
               "and gated") as row:
        sw = run_sweep(demo_sweep_config(cfg, pretrained))
        promoted = {k: v for k, v in sw.artifacts.items() if k.startswith("raydecode-")}
        best = max((v for k, v in sw.metrics.items() if k.startswith("best.")), default=float("nan"))
        row[1:] = [sw.status, f"{int(sw.metrics['trials_ok'])}/{int(sw.metrics['trials'])} trials ok, best "
                   f"image->brain top-1 {best:.2f}; " + ", ".join(f"{k}: {v.split()[-1].strip('()')}"
                                                                  for k, v in promoted.items())]
    return sw, promoted


def _dynadiff(cfg: DemoConfig, steps: list[list], promoted: dict):
    with _step(steps, "dynadiff", "Dynadiff on subject 1: LoRA diffusion fine-tuning on BOLD time-series windows, "
               "test-set reconstructions, time-resolved decoding, registered and gated") as row:
        dd = run_dynadiff(demo_dynadiff_config(cfg))
        dm = dd.metrics
        row[1:] = [dd.status, f"subject 1: test diffusion loss {dm['final.test.diffusion_loss']:.3f} "
                   f"(null {dm['final.test.null_loss']:.3f}), PixCorr {dm['final.recon.pixcorr']:.3f}; grid "
                   f"{os.path.relpath(dd.artifacts['evaluation.reconstructions_averaged.png'])}"]
    if "model" in dd.artifacts:
        promoted[dd.artifacts["model"].split("/")[1]] = f"{dd.artifacts['model']} ({dd.artifacts['alias']})"
    return dd


def _mindlink(cfg: DemoConfig, steps: list[list]):
    with _step(steps, "mindlink", "MindLink on subjects 1-3: one model on a shared 3D patch frame, no subject-specific "
               "parameters (masked voxel modelling, subject adversary, token-level alignment)") as row:
        ml = run_training(demo_config(cfg, "mindlink", TrainConfig), stage="pretrain")
        row[1:] = [ml.status, f"retrieval top-1 {_top1(ml.metrics)}"]
    return ml


def _clip_mused(cfg: DemoConfig, steps: list[list]):
    with _step(steps, "clip-mused", "CLIP-MUSED on subjects 1-6: the 80 COCO categories from ROI tokens, a low- and "
               "a high-level token per subject, CLIP-guided RSA") as row:
        cm = run_training(demo_config(cfg, "clip-mused", TrainConfig), stage="pretrain")
        m = cm.metrics
        row[1:] = [cm.status, f"test mAP {m['semantic.map']:.3f} (chance {m['semantic.chance_map']:.3f}), AUC "
                   f"{m['semantic.auc']:.2f}, Hamming {m['semantic.hamming']:.3f}"]
    return cm


def _evaluate(cfg: DemoConfig, finetuned: str, promoted: dict, steps: list[list]):
    with _step(steps, "evaluate", "evaluate the subject-8 models (Duala's champion vs the MindEye2 fine-tune) and "
               "compare them") as row:
        refs = [r for r in ("models:/raydecode-duala-subj08@champion", finetuned)
                if not r.startswith("models:/") or "raydecode-duala-subj08" in promoted]
        evals = [run_evaluate(demo_evaluate_config(cfg, r)) for r in refs]
        cmp_ = run_compare(CompareConfig(store=cfg.store, workdir=cfg.workdir, tracking_uri=cfg.tracking_uri,
                                         s3=cfg.s3, models=refs))
        row[2] = f"{len(evals)} models, averaged + single trial; table {os.path.relpath(cmp_.artifacts['table'])}"
    return refs, evals, cmp_


def _top1(m: dict) -> str:
    return (f"{m['retrieval.brain_to_image_top1']:.2f} / {m['retrieval.image_to_brain_top1']:.2f} "
            f"(chance {m['retrieval.chance']:.3f})")


# the jobs/ files the demo runs, stage by stage what a user runs by hand (`raydecode pretrain --config ...`)
JOBS = Path(__file__).resolve().parents[2] / "jobs"


def demo_config(cfg: DemoConfig, job: str, schema: type[C], **flags) -> C:
    """``jobs/<job>.yaml`` on the demo's store, work dir, tracking URI, S3 settings and preset."""
    path = JOBS / f"{job}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: the demo runs the jobs/ configs of a raydecode checkout; clone the repository "
                          "and run `make demo` there")
    raw = yaml.safe_load(path.read_text())
    shared = {"store": cfg.store, "workdir": cfg.workdir, "tracking_uri": cfg.tracking_uri,
              "s3": cfg.s3.model_dump()}
    if "preset" in raw:
        shared["preset"] = cfg.preset
    if "decoder" in raw:  # the evaluation's image generator at the demo's scale
        shared["decoder"] = {**raw["decoder"], "preset": cfg.preset}
    return load_config(schema, str(path), **shared, **flags)


def demo_train_config(cfg: DemoConfig, which: str, init_from: str | None = None) -> TrainConfig:
    """jobs/pretrain.yaml or jobs/finetune.yaml (from ``init_from``)."""
    return demo_config(cfg, which, TrainConfig, **({"init_from": init_from} if which == "finetune" else {}))


def demo_sweep_config(cfg: DemoConfig, init_from: str) -> SweepConfig:
    """jobs/sweep.yaml: Duala on subject 8, session 1, margin 0.1 vs 0.3."""
    return demo_config(cfg, "sweep", SweepConfig, init_from=init_from)


def demo_dynadiff_config(cfg: DemoConfig) -> DiffusionDecodeConfig:
    return demo_config(cfg, "dynadiff", DiffusionDecodeConfig)


def demo_evaluate_config(cfg: DemoConfig, model: str | None) -> EvaluateConfig:
    return demo_config(cfg, "evaluate", EvaluateConfig, model=model)
