"""Sweeps on Ray Tune over any method's config: ``raydecode sweep --config jobs/sweep.yaml``.

Every trial is one training run (:func:`~raydecode.train.launch.run_training`, the same Ray Train + DeepSpeed
job as ``raydecode pretrain``, started from inside the Tune function as Ray Train V2 expects) for one new
subject and one point of the search space, and an MLflow child run of the sweep's parent run. Ray Train's
per-epoch reports reach Tune (``TuneReportCallback``), so ASHA can stop weak trials early.

After the trials: a results table (``results.csv`` and ``results.png`` on the parent run), the best trial per
subject by ``metric`` (``tie_break`` second), and, with ``promote``, its model registered as
``raydecode-<method>-subjNN`` and passed through the champion gate (:func:`raydecode.tracking.promote`).
"""

from __future__ import annotations

import copy
import csv
import itertools
import math
import os
import tempfile
import time
from typing import Any

from raydecode import tracking
from raydecode.config import SweepConfig, TrainConfig, set_dotted
from raydecode.data.store import open_store
from raydecode.errors import ConfigError
from raydecode.inference import run_class_statistics
from raydecode.methods.spec import get_method
from raydecode.report import StageResult, table
from raydecode.runtime import absolute_paths, init_ray, require
from raydecode.storage import resolve, train_storage
from raydecode.train.launch import claim_run, plan_training, run_training, train_demand

SWEEP_ONLY = set(SweepConfig.model_fields) - set(TrainConfig.model_fields)
SUBJECT = "subject"


def trial_config(base: dict, params: dict, name: str) -> TrainConfig:
    """The training config of one trial: ``base`` (the sweep config without its sweep keys) with the trial's
    subject and sampled values set."""
    d = copy.deepcopy(base)
    d.setdefault("data", {})["subjects"] = [int(params[SUBJECT])]
    if d.get("init_from"):  # one leave-one-out model per subject: runs/pretrain-wo{subject:02d}/final
        d["init_from"] = d["init_from"].format(subject=int(params[SUBJECT]))
    for key, value in params.items():
        if key != SUBJECT:
            # a grid of settings, e.g. model: [{ssp: false, sdp: false}], updates the section
            set_dotted(d, key, value, "space key", merge=True)
    d["run_name"] = name
    return TrainConfig.model_validate(d)


def _first_values(cfg: SweepConfig) -> dict:
    out: dict[str, Any] = {SUBJECT: cfg.subjects[0]}
    for key, p in cfg.space.items():
        out[key] = (p.grid or p.choice or [None])[0] if (p.grid or p.choice) else (p.uniform or p.loguniform)[0]
    return out


def check_sweep(cfg: SweepConfig) -> dict:
    """Validate what every trial will use before anything starts: the space's keys, the method config they
    reach, the search algorithm. Returns the base trial config (a dict)."""
    if not cfg.subjects:
        raise ConfigError("subjects: give at least one new subject to adapt")
    if cfg.search == "optuna" and any(p.grid is not None for p in cfg.space.values()):
        raise ConfigError("search 'optuna' samples its space: use choice / uniform / loguniform, not grid")
    if cfg.search != "optuna" and any(p.uniform or p.loguniform for p in cfg.space.values()) and cfg.num_samples == 1:
        print("[sweep] note: sampled keys with num_samples 1 draw one value per grid point")
    _check_points(cfg)
    for key in cfg.space:
        if key.split(".")[0] not in TrainConfig.model_fields:
            raise ConfigError(f"space key {key!r}: {key.split('.')[0]!r} is not a key of the training config "
                              f"(allowed: {', '.join(sorted(TrainConfig.model_fields))})")

    base = cfg.model_dump(mode="json", exclude=SWEEP_ONLY)
    for subject in cfg.subjects:  # store, subject, sessions, batch size, init_from: as each trial will see them
        # unknown model keys fail here, by name, as do subjects, sessions, batch size and init_from
        plan_training(trial_config(base, {**_first_values(cfg), SUBJECT: subject}, "probe"))
    return base


def _check_points(cfg: SweepConfig) -> None:
    """points_to_evaluate: optuna only, no more than num_samples, every space key given and inside its range."""
    if not cfg.points_to_evaluate:
        return
    if cfg.search != "optuna":
        raise ConfigError(f"points_to_evaluate: only with search 'optuna' (search {cfg.search!r} lists its values "
                          "in space)")
    if len(cfg.points_to_evaluate) > cfg.num_samples:
        raise ConfigError(f"points_to_evaluate: {len(cfg.points_to_evaluate)} points but num_samples "
                          f"{cfg.num_samples} trials per subject")
    for i, point in enumerate(cfg.points_to_evaluate):
        missing, unknown = sorted(set(cfg.space) - set(point)), sorted(set(point) - set(cfg.space))
        if missing or unknown:
            what = f"no value for {', '.join(missing)}" if missing else f"{', '.join(unknown)} is not a space key"
            raise ConfigError(f"points_to_evaluate[{i}]: {what} (a point gives every key of space)")
        for key, value in point.items():
            p = cfg.space[key]
            bounds = p.uniform or p.loguniform
            inside = value in p.choice if p.choice is not None else (
                isinstance(value, (int, float)) and bounds[0] <= value <= bounds[1])
            if not inside:
                allowed = p.choice if p.choice is not None else f"[{bounds[0]:g}, {bounds[1]:g}]"
                raise ConfigError(f"points_to_evaluate[{i}].{key}: {value!r} is outside its space {allowed}")


def _param_space(cfg: SweepConfig) -> dict:
    from ray import tune

    space: dict[str, Any] = {}
    for key, p in cfg.space.items():
        if p.grid is not None:
            space[key] = tune.grid_search(p.grid)
        elif p.choice is not None:
            space[key] = tune.choice(p.choice)
        elif p.uniform is not None:
            space[key] = tune.uniform(*p.uniform)
        else:
            space[key] = tune.loguniform(*p.loguniform)
    return space


def _train(cfg: dict, parent_run_id: str, callback) -> dict:
    """One trial's training run, as a Ray task outside the trial's placement group (Tune captures the trial's
    child tasks into its one-bundle group, where Ray Data's and Ray Train's own tasks and actors do not fit)."""

    res = run_training(TrainConfig.model_validate(cfg), stage="trial", parent_run_id=parent_run_id,
                       callbacks=[callback])
    return {"metrics": res.metrics, "run_id": res.mlflow_run_id, "checkpoint": res.artifacts["checkpoint"]}


def trial_run_name(sweep: str, subject, trial_id: str) -> str:
    """A trial's training run name (its MLflow run and Ray Train run): unique per sweep."""
    return f"{sweep}-subj{int(subject):02d}-{trial_id.removeprefix('_trial_')}"


def _trial(params: dict, base: dict, sweep: str, parent_run_id: str) -> None:
    """The Tune function: one training run whose epoch reports reach Tune, then a final report carrying the
    run's ids."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    name = trial_run_name(sweep, params[SUBJECT], tune.get_context().get_trial_id())
    cfg = trial_config(base, params, name)
    task = ray.remote(num_cpus=0, max_retries=0)(_train).options(scheduling_strategy="DEFAULT")
    ref = task.remote(cfg.model_dump(mode="json"), parent_run_id, TuneReportCallback())
    try:
        out = ray.get(ref)
    except BaseException:  # stopped by the scheduler or failed: take the training run down with the trial
        ray.cancel(ref, force=True, recursive=True)
        raise
    final = {k: float(v) for k, v in out["metrics"].items() if isinstance(v, (int, float))}
    tune.report({**final, "trial_run_name": name, "mlflow_run_id": out["run_id"],
                 "checkpoint_uri": out["checkpoint"], "finished": 1})


def _concurrency(cfg: SweepConfig) -> int:
    """Trials side by side: ``max_concurrent_trials``, else as many as the cluster's possible nodes (the autoscaler's
    node types x max_count, else the nodes up now) hold, each trial with its train workers and a read task; one CPU
    stays free for the test split's averaging shuffle. One trial must fit (waiting for nodes on a cluster without an
    autoscaler); more are queued by Tune and brought by the autoscaler."""
    shape = require(train_demand(cfg, "a sweep trial"), cfg.scaling.wait_for_nodes_s)
    if cfg.max_concurrent_trials:
        return cfg.max_concurrent_trials
    # held for a whole trial: its workers, and a read task to feed them; the averaging shuffle (1 CPU) is brief
    per_trial = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.read_cpus
    fit = int((shape.total("CPU") - 1.0 + 1e-9) // per_trial) if per_trial > 0 else 1
    if cfg.scaling.use_gpu:
        fit = min(fit, int(shape.total("GPU") // cfg.scaling.num_workers))
    return max(1, fit)


def optuna_search(cfg: SweepConfig):
    """One subject's Optuna search: the given points first, in order, then Optuna's own draws from the space."""
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=cfg.metric, mode="max",
                        points_to_evaluate=[dict(p) for p in cfg.points_to_evaluate] or None)


def _tuners(cfg: SweepConfig, base: dict, parent_run_id: str, storage: tuple[str, Any], concurrency: int,
            resume: bool) -> list:
    """One Tuner (grid / random: every subject in one; Optuna: one per subject, each its own experiment), named
    after the sweep's ``run_name`` under ``<storage>/tune/``. ``resume``: a Tune experiment already there is
    restored: its finished trials are kept, unfinished and failed ones start again with their trial ids (so their
    training runs resume from their checkpoints)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, sweep=cfg.run_name or "sweep", parent_run_id=parent_run_id),
        {"CPU": 0.01})  # a token share: the trial's Ray Train run reserves its own workers
    scheduler = None
    if cfg.asha:
        scheduler = ASHAScheduler(metric=cfg.metric, mode="max", time_attr="training_iteration",
                                  # one more than the epochs: the trial's final report must not count as a stop
                                  max_t=cfg.optim.epochs + 1, grace_period=cfg.asha.grace_period,
                                  reduction_factor=cfg.asha.reduction_factor)

    def tuner(name: str, space: dict, search_alg=None):
        path = f"{storage[0].rstrip('/')}/{name}"
        if resume and tune.Tuner.can_restore(path, storage_filesystem=storage[1]):
            print(f"[sweep] restoring the Tune experiment {name}: finished trials are kept")
            return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                      param_space=space, storage_filesystem=storage[1])
        run_config = tune.RunConfig(name=name, storage_path=storage[0], storage_filesystem=storage[1], verbose=1,
                                    # a retried trial keeps its id, so its training run (same name) resumes
                                    failure_config=tune.FailureConfig(max_failures=cfg.trial_retries))
        return tune.Tuner(trainable, param_space=space, run_config=run_config, tune_config=tune.TuneConfig(
            search_alg=search_alg, scheduler=scheduler, num_samples=cfg.num_samples,
            max_concurrent_trials=concurrency))

    names = _experiment_names(cfg)
    if cfg.search == "optuna":  # a search algorithm per subject (grid_search does not mix with them)
        return [tuner(n, {**_param_space(cfg), SUBJECT: s}, optuna_search(cfg)) for n, s in zip(names, cfg.subjects)]
    return [tuner(names[0], {**_param_space(cfg), SUBJECT: tune.grid_search(cfg.subjects)})]


def _experiment_names(cfg: SweepConfig) -> list[str]:
    """The sweep's Tune experiments under ``<storage>/tune/``: ``<run_name>``, or ``<run_name>-subjNN`` per subject
    with Optuna (a search algorithm per subject)."""
    name = cfg.run_name or "sweep"
    return [f"{name}-subj{s:02d}" for s in cfg.subjects] if cfg.search == "optuna" else [name]


# what may change between a sweep and its re-run (how it is run, not what it trains or how it picks)
_SWEEP_VOLATILE = ("run_name", "ray_address", "tracking_uri", "workdir", "promote", "max_concurrent_trials",
                   "trial_retries", "fault_injection", "scaling.wait_for_nodes_s")


def _claim_sweep(cfg: SweepConfig, tune_uri: str):
    """The sweep's claim, ``<storage>/<run_name>/raydecode_run.json`` as a training run's: the same config resumes
    (its Tune experiments under ``<storage>/tune/``, its MLflow run); another is refused while a Tune experiment of
    that name exists."""
    from ray import tune

    flat = tracking.flatten(cfg.model_dump(mode="json"))
    tune_root = resolve(tune_uri, cfg.s3)
    name = cfg.run_name or "sweep"
    return claim_run(resolve(cfg.storage_path(), cfg.s3).join(name), flat, f"sweep run_name {name!r}", lambda: any(
        tune.Tuner.can_restore(f"{tune_root.path.rstrip('/')}/{n}", storage_filesystem=tune_root.fs)
        for n in _experiment_names(cfg)), volatile=_SWEEP_VOLATILE)


def _rows(results, cfg: SweepConfig) -> list[dict]:
    rows = []
    for r in results:
        m = r.metrics or {}
        row = {SUBJECT: int(r.config[SUBJECT]), **{k: r.config.get(k) for k in cfg.space},
               "status": "ok" if m.get("finished") else ("error" if r.error else "stopped"),
               cfg.metric: m.get(cfg.metric), cfg.tie_break: m.get(cfg.tie_break),
               "epochs": m.get("epoch"), "mlflow_run_id": m.get("mlflow_run_id"),
               "checkpoint_uri": m.get("checkpoint_uri"), "trial_id": m.get("trial_id")}
        if r.error:
            row["error"] = str(r.error).strip().splitlines()[-1][:200]
        rows.append(row)
    return sorted(rows, key=lambda r: (r[SUBJECT], -(r[cfg.metric] or -1)))


def best_per_subject(rows: list[dict], metric: str, tie_break: str) -> dict[int, dict]:
    best: dict[int, dict] = {}
    for row in rows:
        if row["status"] != "ok" or row.get(metric) is None:
            continue
        key = (row[metric], row.get(tie_break) or -math.inf)
        cur = best.get(row[SUBJECT])
        if cur is None or key > (cur[metric], cur.get(tie_break) or -math.inf):
            best[row[SUBJECT]] = row
    return best


def _plot(rows: list[dict], cfg: SweepConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = sorted({r[SUBJECT] for r in rows})
    fig, axes = plt.subplots(1, len(subjects), figsize=(4 * len(subjects), 3.2), squeeze=False)
    for ax, s in zip(axes[0], subjects):
        mine = [r for r in rows if r[SUBJECT] == s]
        labels = ["\n".join(f"{k.split('.')[-1]}={r[k]:.3g}" if isinstance(r[k], float) else f"{k.split('.')[-1]}={r[k]}"
                            for k in cfg.space) or r["status"] for r in mine]
        values = [r[cfg.metric] or 0 for r in mine]
        ax.bar(range(len(mine)), values, color=["C0" if r["status"] == "ok" else "C7" for r in mine])
        ax.set_xticks(range(len(mine)), labels, fontsize=7)
        ax.set_title(f"subject {s}")
        ax.set_ylabel(cfg.metric.split(".")[-1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(cfg: SweepConfig, parent_run_id: str | None = None) -> StageResult:
    """The sweep (its MLflow run a child of ``parent_run_id`` when given, e.g. the Dynadiff stage's general model)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    t0 = time.time()
    cfg = absolute_paths(cfg)
    base = check_sweep(cfg)
    store = open_store(cfg.store, cfg.s3)
    tracking_uri = tracking.configure(cfg)
    tracking.check_reachable(tracking_uri)
    tune_uri = os.path.join(cfg.storage_path(), "tune")
    claim = _claim_sweep(cfg, tune_uri)
    if claim.resumed:
        print(f"[sweep] sweep {cfg.run_name or 'sweep'!r} exists with this config: resuming it"
              + (f" in MLflow run {claim.mlflow_run_id}" if claim.mlflow_run_id else ""))
    with tracking.stage_run(cfg, "sweep", run_name=cfg.run_name, exclude={"space"}, parent_run_id=parent_run_id, tags={
            "raydecode.method": cfg.method, "raydecode.store": cfg.store},
            resume_run_id=claim.mlflow_run_id) as parent:
        parent_id, exp_id = parent.info.run_id, parent.info.experiment_id
        claim.record(parent_id)
        tracking.log_params({f"space.{k}": v.model_dump(exclude_none=True) for k, v in cfg.space.items()})
        init_ray(cfg.ray_address)
        concurrency = _concurrency(cfg)
        _shared_statistics(cfg, base)
        tuners = _tuners(cfg, base, parent_id, train_storage(tune_uri, cfg.s3), concurrency, claim.resumed)
        n_trials = len(cfg.subjects) * cfg.num_samples * math.prod(len(p.grid) for p in cfg.space.values() if p.grid)
        print(f"[sweep] {cfg.method} on subjects {cfg.subjects}: {n_trials} trials, "
              f"{concurrency} at a time; parent run {parent_id}")
        results = [r for tuner in tuners for r in tuner.fit()]
        rows = _rows(results, cfg)
        client = MlflowClient()
        # a trial the scheduler stopped: its training run was cancelled mid-epoch (left RUNNING, or FAILED when the
        # cancellation reached run_training's handler first; a handler that runs after this keeps the KILLED)
        stopped = {trial_run_name(cfg.run_name or "sweep", r[SUBJECT], r["trial_id"]) for r in rows
                   if r["status"] == "stopped" and r["trial_id"]}
        for run in client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
            if run.info.status == "RUNNING" or (run.info.run_name in stopped and run.info.status == "FAILED"):
                client.set_terminated(run.info.run_id, "KILLED")
        best = best_per_subject(rows, cfg.metric, cfg.tie_break)
        with tempfile.TemporaryDirectory() as tmp:
            with open(os.path.join(tmp, "results.csv"), "w", newline="") as f:
                keys = list(dict.fromkeys(k for r in rows for k in r))
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(rows)
            _plot(rows, cfg, os.path.join(tmp, "results.png"))
            mlflow.log_artifacts(tmp)
        for s, row in best.items():
            mlflow.log_metric(f"best.subj{s:02d}.{cfg.metric}", row[cfg.metric])

        decisions = []
        if cfg.promote:
            for s, row in sorted(best.items()):
                decisions.append(tracking.register_run(
                    row["mlflow_run_id"], row["checkpoint_uri"], cfg.metric, cfg.tie_break,
                    store.test_set_digest([s]), store.manifest_sha256(),
                    extra_tags={"raydecode.sweep_run_id": parent_id, "raydecode.subject": s}, s3=cfg.s3))

    short = {k: k.split(".")[-1] for k in cfg.space}
    print("\n" + table([SUBJECT, *short.values(), "status", cfg.metric.split(".")[-1], "run"],
                       [[r[SUBJECT], *[f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in short],
                         r["status"], "-" if r[cfg.metric] is None else f"{r[cfg.metric]:.3f}",
                         (r["mlflow_run_id"] or "")[:8]] for r in rows]))
    if decisions:
        print("\n" + table(["model", "version", "alias", "why"],
                           [[d.name, d.version, d.alias, d.reason] for d in decisions]))
    print(f"\nsweep run {parent_id} ({tracking_uri})")
    metrics: dict[str, float] = {"trials": len(rows), "trials_ok": sum(r["status"] == "ok" for r in rows),
                                 "seconds": round(time.time() - t0, 1)}
    metrics.update({f"best.subj{s:02d}.{cfg.metric}": row[cfg.metric] for s, row in best.items()})
    artifacts = {"mlflow_run": f"runs:/{parent_id}",
                 **{d.name: f"models:/{d.name}/{d.version} ({d.alias})" for d in decisions}}
    return StageResult(stage="sweep", status="ok", mlflow_run_id=parent_id, metrics=metrics, artifacts=artifacts)


def _model_settings(cfg: SweepConfig) -> list[dict]:
    """The trial settings of the space's ``model`` keys: every combination of their grid / choice values, each
    bound of a sampled one, and the given points (the rest of a trial does not change what its model needs)."""
    keys = {k: p for k, p in cfg.space.items() if k == "model" or k.startswith("model.")}
    values = [[(k, v) for v in (p.grid if p.grid is not None else p.choice if p.choice is not None
                                else (p.uniform or p.loguniform))] for k, p in keys.items()]
    settings = [dict(c) for c in itertools.product(*values)]
    settings += [{k: v for k, v in point.items() if k in keys} for point in cfg.points_to_evaluate or []]
    return settings


def _shared_statistics(cfg: SweepConfig, base: dict) -> None:
    """Source statistics the trials read: computed once here rather than raced for by the first trials, and only
    when some trial's model needs them (a plain-LoRA sweep of Duala does not)."""

    spaces: list[str] = []
    for setting in _model_settings(cfg):
        probe = trial_config(base, {SUBJECT: cfg.subjects[0], **setting}, "probe")
        spec = get_method(probe.method)
        spaces += [s for s in spec.statistics(spec.config(probe.preset, probe.model)) if s not in spaces]
    if not spaces:
        return
    done = set()
    for subject in cfg.subjects:  # each subject's init_from, over its source subjects (never the subject itself)
        plan = plan_training(trial_config(base, {**_first_values(cfg), SUBJECT: subject}, "probe"))
        key = (plan.init_state_uri, tuple(plan.source_subjects or ()))
        if plan.init_state_uri and key not in done:
            done.add(key)
            st = run_class_statistics(cfg.store, plan.init_state_uri, spaces, plan.source_subjects, s3=cfg.s3,
                                      cpus=cfg.data.read_cpus)
            print(f"[sweep] class statistics of {plan.init_state_uri} (subjects {plan.source_subjects}): "
                  f"{st.status} {st.uri}")

