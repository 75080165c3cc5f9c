"""The diffusion-decoding stage (``raydecode dynadiff``): train, evaluate with the suite, specialized models, register.

1. train the method on Ray Train + DeepSpeed (:func:`raydecode.train.launch.run_training`; the "general"
   model at the configured window);
2. evaluate the consolidated checkpoint with the evaluation suite (:func:`raydecode.evaluate.suite.run_evaluate`,
   an evaluation run in MLflow like ``raydecode evaluate``'s) under the protocols ``averaged``, ``single``
   (``reconstruct.single_trial``) and ``shift+k`` for every ``time_resolved.shifts`` (windows W(t + k*TR, d)):
   seeded reconstructions, PixCorr / SSIM (and the metric networks ``evaluate`` names), the test losses and the
   time-resolved curve. The evaluation's files are logged to the training run as well (``evaluation/``), its
   metrics as ``final.*``;
3. optionally "specialized" models: a sweep (:mod:`raydecode.sweep`) over ``model.window.start_s``, one model per
   shift and subject, its run a child of the training run; each is scored by the suite at its own window and
   drawn beside the general model's curve (``time_resolved_specialized.png``);
4. register the model (``raydecode-<method>-subjNN``; the package holds the method's export, e.g. the LoRA in the
   diffusers format) and apply the champion gate.

``raydecode dynadiff reconstruct`` runs step 2 alone for an existing checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from pydantic import ValidationError

from raydecode import tracking
from raydecode.checkpoint import CONFIG_FILE, read_json
from raydecode.config import (
    DiffusionDecodeConfig,
    EvaluateConfig,
    SweepConfig,
    TrainConfig,
    format_validation_error,
    set_dotted,
)
from raydecode.data.store import open_store
from raydecode.errors import ConfigError
from raydecode.evaluate.images import time_curve_png
from raydecode.evaluate.protocols import curve_metric, time_resolved_table
from raydecode.evaluate.suite import run_evaluate
from raydecode.methods.spec import Reconstructs, RowMetrics, get_method
from raydecode.report import StageResult
from raydecode.runtime import absolute_paths
from raydecode.storage import resolve
from raydecode.sweep import run_sweep
from raydecode.train.launch import run_training


def train_part(cfg: DiffusionDecodeConfig) -> TrainConfig:
    """The stage's training run: its ``pretrain`` keys, as the loop validates them."""

    return TrainConfig.model_validate(cfg.model_dump(include=set(TrainConfig.model_fields)))


def evaluation_config(cfg: DiffusionDecodeConfig, checkpoint: str | None, shifts: list[int] | None = None,
                      reconstruct: bool = True) -> EvaluateConfig:
    """The suite's config for this stage: its protocols (``shifts``: default ``time_resolved.shifts``), the
    ``reconstruct`` options, PixCorr / SSIM only unless ``evaluate`` names metric networks; then ``evaluate``'s
    keys on top."""
    r, tr = cfg.reconstruct, cfg.time_resolved
    shifts = tr.shifts if shifts is None else shifts
    protocols = ["averaged"] + (["single"] if r.single_trial and reconstruct else []) + [
        f"shift{k:+d}" for k in shifts if k]
    base = {"store": cfg.store, "workdir": cfg.workdir, "tracking_uri": cfg.tracking_uri, "s3": cfg.s3.model_dump(),
            "ray_address": cfg.ray_address, "model": checkpoint, "run_name": f"{cfg.run_name}-evaluate",
            "subjects": cfg.data.subjects, "protocols": protocols, "metric_nets": [], "tsne": False,
            "reconstruct": {**r.model_dump(exclude={"single_trial"}), "enabled": reconstruct,
                            "shifted": tr.reconstruct},
            "batch_size": r.batch_size, "use_gpu": cfg.scaling.use_gpu, "cpus_per_actor": cfg.scaling.cpus_per_worker,
            "data": {"read_cpus": cfg.data.read_cpus}}
    for key, value in cfg.evaluate.items():
        set_dotted(base, key, value, "evaluate", merge=True)
    try:
        return EvaluateConfig.model_validate(base)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(EvaluateConfig, exc, "evaluate (the dynadiff stage's "
                                                                       "evaluation)")) from None


def specialized_sweep(cfg: DiffusionDecodeConfig, tr_s: float, subjects: list[int]) -> SweepConfig:
    """Dynadiff's "specialized" models: a sweep over ``model.window.start_s`` (one start per shift k in
    ``time_resolved.specialized``, W(t + k*TR, d)) for every subject, nothing registered."""
    spec = get_method(cfg.method)
    start = spec.window(spec.config(cfg.preset, cfg.model)).start_s
    rows = spec.get(RowMetrics)
    if rows is None or rows.headline is None:
        raise ConfigError(f"time_resolved.specialized: method {cfg.method!r} names no headline test value to rank "
                          "specialized models by (RowMetrics.headline)")
    metric = f"test.{rows.headline}"
    return SweepConfig.model_validate({
        **cfg.model_dump(mode="json", include=set(TrainConfig.model_fields)),
        "run_name": f"{cfg.run_name}-specialized", "subjects": subjects, "promote": False,
        "space": {"model.window.start_s": {"grid": [round(start + k * tr_s, 6) for k in cfg.time_resolved.specialized]}},
        "metric": metric, "tie_break": metric})


def _specialized(cfg: DiffusionDecodeConfig, run_id: str, tr_s: float, subjects: list[int]) -> list[dict]:
    """Train the specialized models (a sweep, child of the general run) and score each with the suite at its own
    window: one point per shift (``test.*`` / ``recon.*`` averaged over subjects)."""
    from mlflow.tracking import MlflowClient

    sweep = specialized_sweep(cfg, tr_s, subjects)
    print(f"\n[dynadiff] specialized models for shifts {cfg.time_resolved.specialized} TR: sweep {sweep.run_name}")
    parent = run_sweep(sweep, parent_run_id=run_id).mlflow_run_id
    spec = get_method(cfg.method)
    start = spec.window(spec.config(cfg.preset, cfg.model)).start_s
    client = MlflowClient()
    trials = client.search_runs([client.get_run(run_id).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{parent}' and status = 'FINISHED'")
    by_shift: dict[int, list[dict]] = {}
    for trial in sorted(trials, key=lambda t: t.info.run_name):
        ckpt = trial.data.tags["raydecode.checkpoint_uri"]
        saved = read_json(ckpt, CONFIG_FILE, cfg.s3)
        k = round((saved["model"]["window"]["start_s"] - start) / tr_s)
        ev = run_evaluate(evaluation_config(cfg, ckpt, shifts=[0], reconstruct=cfg.time_resolved.reconstruct)
                          .model_copy(update={"run_name": f"{trial.info.run_name}-evaluate",
                                              "subjects": saved["info"]["subjects"]}))
        by_shift.setdefault(k, []).append(ev.metrics)
    return [{"shift": k, **{m: sum(p[m] for p in ps) / len(ps) for m in ps[0]
                            if m.startswith(("test.", "recon.")) and all(m in p for p in ps)}}
            for k, ps in sorted(by_shift.items())]


def _log_to_training_run(run_id: str, ev: StageResult, curve: list[dict], key: str | None,
                         specialized: list[dict]) -> None:
    """The evaluation on the model's own run: ``final.*`` metrics, the curve's history, the evaluation's files
    (``evaluation/``), and the specialized models beside the general one."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"final.{k}": float(v) for k, v in ev.metrics.items() if v == v})
        for i, point in enumerate(curve):
            mlflow.log_metrics({f"time_resolved.{k}": float(v) for k, v in point.items()
                                if k.startswith(("test.", "recon.")) and v == v}, step=i)
        mlflow.log_artifacts(ev.artifacts["outputs"], "evaluation")
        if specialized and key:
            with tempfile.TemporaryDirectory() as tmp:
                time_curve_png({"general model": [(p["window_end_s"], p[key]) for p in curve],
                                "specialized models": [(_end(curve, p["shift"]), p[key]) for p in specialized
                                                       if key in p and _end(curve, p["shift"]) is not None]},
                               key, os.path.join(tmp, "time_resolved_specialized.png"))
                with open(os.path.join(tmp, "time_resolved_specialized.json"), "w") as f:
                    json.dump(specialized, f, indent=1)
                mlflow.log_artifacts(tmp, "evaluation")


def _end(curve: list[dict], shift: int) -> float | None:
    return next((p["window_end_s"] for p in curve if p["shift"] == shift), None)


def _curve(ev: StageResult) -> list[dict]:
    path = ev.artifacts.get("time_resolved.json")
    if not path:
        return []
    with open(path) as f:
        return json.load(f)


def _register(cfg: DiffusionDecodeConfig, run_id: str, ckpt: str, metrics: dict) -> dict[str, str]:
    """The champion gate on ``cfg.metric``, over the test set this evaluation used."""
    if cfg.metric not in metrics:
        raise ConfigError(f"metric {cfg.metric!r}: not measured; measured: {', '.join(sorted(metrics))}")
    store = open_store(cfg.store, cfg.s3)
    subjects = cfg.data.subjects or store.manifest.subject_ids
    spec = get_method(cfg.method)
    window = spec.window(spec.config(cfg.preset, cfg.model))
    test_set = (f"{store.test_set_digest(subjects)}/windows {window.start_s:g}s+{window.duration_s:g}s/"
                f"{window.detrend}/ddim {cfg.reconstruct.steps or 'model'}")
    d = tracking.register_run(run_id, ckpt, cfg.metric, cfg.tie_break, test_set, store.manifest_sha256(),
                              s3=cfg.s3)
    print(f"\nregistry {d.name} v{d.version} -> {d.alias}: {d.reason}")
    return {"model": f"models:/{d.name}/{d.version}", "alias": d.alias}


def run_dynadiff(cfg: DiffusionDecodeConfig) -> StageResult:
    t0 = time.time()
    cfg = absolute_paths(cfg)
    spec = get_method(cfg.method)
    if spec.get(Reconstructs) is None or spec.window(spec.config(cfg.preset, cfg.model)) is None:
        raise ConfigError(f"method {cfg.method!r}: the dynadiff stage needs a method that decodes time-series windows "
                          "into images (e.g. dynadiff)")
    evaluation_config(cfg, None)  # the evaluation's keys are checked before anything trains
    subjects = cfg.data.subjects or open_store(cfg.store, cfg.s3).manifest.subject_ids
    trained = run_training(train_part(cfg), stage="dynadiff")
    run_id, ckpt = trained.mlflow_run_id, trained.artifacts["checkpoint"]
    tracking_uri = tracking.configure(cfg)
    ev = run_evaluate(evaluation_config(cfg, ckpt))
    curve, tr_s = _curve(ev), read_json(ckpt, CONFIG_FILE, cfg.s3)["info"]["tr_s"]
    key = curve_metric(curve, cfg.method)
    specialized = _specialized(cfg, run_id, tr_s, subjects) if cfg.time_resolved.specialized else []
    _log_to_training_run(run_id, ev, curve, key, specialized)
    if specialized and key:
        print("\n" + time_resolved_table(curve, key, {p["shift"]: p[key] for p in specialized if key in p}))

    artifacts = {**trained.artifacts, "evaluation_run": f"runs:/{ev.mlflow_run_id}",
                 **{f"evaluation.{k}": v for k, v in ev.artifacts.items() if k not in ("evaluates", "outputs")}}
    if cfg.promote:
        artifacts.update(_register(cfg, run_id, ckpt, {**trained.metrics, **ev.metrics}))
    print(f"\nmlflow   run {run_id}, evaluation run {ev.mlflow_run_id} ({tracking_uri})")
    out = {**{k: float(v) for k, v in trained.metrics.items() if isinstance(v, (int, float))},
           **{f"final.{k}": float(v) for k, v in ev.metrics.items()}, "seconds": round(time.time() - t0, 1)}
    return StageResult(stage="dynadiff", status="ok", mlflow_run_id=run_id, metrics=out, artifacts=artifacts)


def run_reconstruct_only(cfg: DiffusionDecodeConfig) -> StageResult:
    """``raydecode dynadiff reconstruct``: step 2 (the suite with the stage's protocols) for an existing
    checkpoint, in a new evaluation run."""
    cfg = absolute_paths(cfg)
    ckpt = cfg.checkpoint_uri or resolve(cfg.storage_path(), cfg.s3).join(cfg.run_name or "run", "final").uri
    read_json(ckpt, CONFIG_FILE, cfg.s3)  # a clear error before anything starts
    ev = run_evaluate(evaluation_config(cfg, ckpt))
    return StageResult(stage="reconstruct", status="ok", mlflow_run_id=ev.mlflow_run_id, metrics=ev.metrics,
                       artifacts=ev.artifacts)
