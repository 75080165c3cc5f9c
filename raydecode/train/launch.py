"""Launch a training stage: MLflow run, Ray datasets, ``TorchTrainer`` running :mod:`raydecode.train.loop`.

The driver validates everything it can before any worker starts (store,
subjects, sessions, encoders, the checkpoint to fine-tune from), opens one
MLflow run for the job (the flattened config as params), fits, then logs the
consolidated checkpoint's URI, its config, the metric curves and a summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from raydecode import tracking
from raydecode.checkpoint import CONFIG_FILE, METRICS_FILE, read_json
from raydecode.config import TrainConfig
from raydecode.data.pca import fit_roi_pca, write_pca
from raydecode.data.pipeline import deal_blocks, train_cutoffs, trials_dataset
from raydecode.data.store import open_store
from raydecode.data.windows import count_windows, windows_dataset
from raydecode.errors import ConfigError, UserError, user_errors_from_ray
from raydecode.inference import run_class_statistics
from raydecode.methods.spec import DatasetInfo, FitsRoiPCA, ReadsVolume, count_parameters, get_method
from raydecode.nn.encoders import encoder_config, requires_weights
from raydecode.report import StageResult, table
from raydecode.runtime import Demand, absolute_paths, init_ray, require
from raydecode.storage import Location, resolve, train_storage
from raydecode.train.loop import train_loop_per_worker
from raydecode.train.progress import DriverProgress


class TrainingError(UserError):
    exit_code = 5


@dataclass
class TrainPlan:
    """What the driver worked out before launching workers."""

    info: DatasetInfo
    method_config: object
    targets: dict[str, dict]  # key -> {"encoder": name, "source": "store" | "compute"}
    train_rows: int
    steps_per_epoch: int
    final_uri: str
    init_state_uri: str | None
    train_bytes: int = 0  # the selected trial (or time-series) shards, on disk
    window: object = None  # WindowConfig when the method reads time-series windows
    source_subjects: list[int] | None = None  # init_from's subjects but this run's: its source statistics
    passes: int = 0  # passes over the train rows (optim.epochs, or what optim.samples_per_epoch makes of them)


def plan_training(cfg: TrainConfig) -> TrainPlan:
    spec = get_method(cfg.method)
    mcfg = spec.config(cfg.preset, cfg.model)
    store = open_store(cfg.store, cfg.s3)
    subjects = store.check_subjects(cfg.data.subjects, cfg.data.hold_out)
    sessions = store.check_sessions(subjects, cfg.data.sessions)
    src = read_json(cfg.init_from, CONFIG_FILE, cfg.s3) if cfg.init_from else None  # the checkpoint's config
    coords = None
    volume = spec.get(ReadsVolume)
    if volume is not None:  # the voxels' i, j, k on each subject's grid
        every = list(store.manifest.subject_ids) if volume.resolve else subjects
        store_coords = {s: np.stack([store.voxel_table(s)[c].to_numpy().astype(np.int64) for c in "ijk"], 1)
                        for s in every}
        coords = {s: store_coords[s] for s in subjects}
        if volume.resolve:
            mcfg = volume.resolve(mcfg, store_coords, src["model"] if src else None)
    rois = None
    if spec.get(FitsRoiPCA) is not None:  # every voxel's ROI label
        rois = {s: store.voxel_table(s)["roi"].to_pylist() for s in subjects}
    info = DatasetInfo(subjects, {s: store.manifest.subject(s).voxels for s in subjects}, len(store.manifest.categories),
                       store.manifest.tr_s, coords, rois)

    targets = {}
    for key, name in spec.targets(mcfg).items():
        enc = encoder_config(name)
        if enc.name in store.manifest.embeddings:
            targets[key] = {"encoder": enc.name, "source": "store"}
        else:
            if requires_weights(enc):
                raise ConfigError(f"encoder {enc.name!r} needs `weights` (a local path, s3:// or hf:// reference) and the store {store.uri} has no "
                                  f"embeddings for it; run `raydecode embed --encoder {enc.name}` first")
            if enc.kind == "clip-levels" and "captions" in store.manifest.absent:
                raise ConfigError(f"encoder {enc.name!r} reads the stimuli's captions and the store {store.uri} has "
                                  "none (its manifest lists them absent): ingest with --coco DIR")
            targets[key] = {"encoder": name, "source": "compute"}

    window = spec.window(mcfg)
    if window is not None and cfg.data.train_trials is not None:
        raise ConfigError("data.train_trials: selects trials, not time-series windows; select sessions instead")
    if window is not None:  # windows of the BOLD time series (e.g. Dynadiff)
        shards = store.manifest.shards_of("timeseries", subjects=subjects, sessions=sessions)
        train_rows = count_windows(store, subjects, sessions, window, "train")
    else:
        shards = store.manifest.shards_of("trials", subjects=subjects, sessions=sessions)
        train_rows = sum(int(pc.sum(pc.equal(store.read_shard(s, ["split"])["split"], "train")).as_py() or 0)
                         for s in shards)
        if cfg.data.train_trials is not None:  # each subject's first N (checked: every subject has them)
            train_rows = cfg.data.train_trials * len(train_cutoffs(store, shards, cfg.data.train_trials))
    per_worker = train_rows // cfg.scaling.num_workers
    steps = per_worker // cfg.optim.batch_size
    if steps < 1:
        raise ConfigError(f"optim.batch_size {cfg.optim.batch_size}: larger than the {per_worker} train rows each of "
                          f"{cfg.scaling.num_workers} workers gets ({train_rows} rows selected)")

    init_state_uri = source = None
    if src is not None:
        allowed = spec.init_methods
        if get_method(src["method"]).name not in allowed:
            raise ConfigError(f"init_from {cfg.init_from}: a {src['method']!r} checkpoint; method {cfg.method!r} "
                              f"starts from {' or '.join(repr(m) for m in allowed)} checkpoints")
        init_state_uri = cfg.init_from
        source = check_unseen(cfg, src, subjects)
    if spec.statistics(mcfg) and not cfg.init_from:
        raise ConfigError(f"method {cfg.method!r} adapts a pretrained model: set init_from to a checkpoint "
                          f"(a final/ directory of a {' or '.join(spec.init_methods)} run)")
    if spec.statistics(mcfg) and not source:
        raise ConfigError(f"init_from {cfg.init_from}: trained only on subjects {subjects}, this run's own: "
                          "no source subjects left for the class statistics")
    final_uri = resolve(cfg.storage_path(), cfg.s3).join(cfg.run_name or "run", "final").uri
    return TrainPlan(info, mcfg, targets, train_rows, steps, final_uri, init_state_uri,
                     sum(s.bytes for s in shards), window, source, passes(cfg, train_rows))


def passes(cfg: TrainConfig, train_rows: int) -> int:
    """Passes over the train rows: ``optim.epochs``, or epochs of ``optim.samples_per_epoch`` samples each."""
    if cfg.optim.samples_per_epoch is None:
        return cfg.optim.epochs
    return max(1, round(cfg.optim.epochs * cfg.optim.samples_per_epoch / train_rows))


def check_unseen(cfg: TrainConfig, src: dict, subjects: list[int]) -> list[int]:
    """An adaptation starts from a model that never saw its subjects (leave-one-subject-out: otherwise the
    target's own ridge map and statistics come from the pretrained model and a "new subject" result is not one),
    unless ``allow_seen_subjects``. Returns the checkpoint's other subjects: the source of its statistics."""
    trained = [int(s) for s in src["info"]["subjects"]]
    seen = [s for s in subjects if s in trained]
    if seen and not cfg.allow_seen_subjects:
        raise ConfigError(
            f"init_from {cfg.init_from}: trained on subject {', '.join(map(str, seen))} (its subjects: {trained}), "
            f"which this run adapts to; start from a model pretrained with data.hold_out: {seen}, or set "
            "allow_seen_subjects: true to continue training on them")
    return [s for s in trained if s not in subjects]


RUN_FILE = "raydecode_run.json"
MATERIALIZE_BELOW = 2 * 1024**3  # bytes of selected trial shards
# what makes two launches under one run_name the same run (anything else may change on a resume)
_RUN_IDENTITY = ("method", "preset", "model", "store", "data", "init_from", "optim", "scaling.num_workers",
                 "deepspeed.zero_stage")
# how the rows are read, not which rows in which order (the read order is preserved): may change on a resume
_READ_SETTINGS = ("data.read_cpus", "data.read_concurrency", "data.local_cache", "data.stimulus_cache_shards")


@dataclass
class RunClaim:
    """A run's identity file under ``<storage>/<run_name>/``: the config keys that decide its checkpoints and the
    MLflow run logging it (a resumed run goes on logging there)."""

    loc: Location
    identity: dict
    resumed: bool
    mlflow_run_id: str | None = None

    def record(self, run_id: str) -> None:
        if run_id != self.mlflow_run_id:
            self.mlflow_run_id = run_id
            self.loc.write_bytes_atomic(json.dumps({"identity": self.identity, "mlflow_run_id": run_id},
                                                   sort_keys=True, indent=1).encode())


def _under(flat_key: str, keys: tuple[str, ...]) -> bool:
    """Whether a flattened config key is one of ``keys`` or inside one of them."""
    return any(flat_key == key or flat_key.startswith(key + ".") for key in keys)


def _without(flat: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in flat.items() if not _under(k, keys)}


def claim_run(run_dir: Location, identity: dict, what: str, has_progress,
              volatile: tuple[str, ...] = ()) -> RunClaim:
    """Record ``identity`` in ``run_dir``'s :data:`RUN_FILE`; a relaunch with the same identity resumes (Ray Train
    and Tune restore by name) in the recorded MLflow run, a different one is refused while ``has_progress()``
    (a claim nothing was saved under is replaced). ``what``: the config key that names the run, for the error.
    Keys under ``volatile`` are left out on both sides (a claim recorded before they were is compared without them)."""
    identity = json.loads(json.dumps(_without(identity, volatile), sort_keys=True))
    loc = run_dir.join(RUN_FILE)
    if loc.exists():
        old = json.loads(loc.read_bytes())
        old_ident, run_id = (old["identity"], old.get("mlflow_run_id")) if "identity" in old else (old, None)
        old_ident = _without(old_ident, volatile)
        changed = sorted(k for k in set(old_ident) | set(identity) if old_ident.get(k) != identity.get(k))
        if not changed:
            return RunClaim(loc, identity, True, run_id)
        if has_progress():
            diff = ", ".join(f"{k} {old_ident.get(k)!r} -> {identity.get(k)!r}" for k in changed[:4])
            raise ConfigError(f"{what} already names a run with another config at {loc.uri} "
                              f"({diff}{', ...' if len(changed) > 4 else ''}); it would resume from that run's "
                              "checkpoints: pick a new --run-name or delete that directory")
    loc.write_bytes_atomic(json.dumps({"identity": identity}, sort_keys=True, indent=1).encode())
    return RunClaim(loc, identity, False)


def _claim_run_name(cfg: TrainConfig) -> RunClaim:
    """The training run's claim: the config keys that decide its checkpoints (:data:`_RUN_IDENTITY`)."""
    flat = tracking.flatten(cfg.model_dump(mode="json"))
    ident = {k: v for k, v in flat.items() if _under(k, _RUN_IDENTITY)}
    run_dir = resolve(cfg.storage_path(), cfg.s3).join(cfg.run_name or "run")
    base = run_dir.path.rstrip("/") + "/"
    return claim_run(run_dir, ident, f"run_name {cfg.run_name!r}",
                     lambda: any(f.path.removeprefix(base).startswith("checkpoint_") for f in run_dir.list_files()),
                     volatile=_READ_SETTINGS)


def _first_failure(exc: BaseException) -> str:
    """One line naming the rank and the error that stopped training (Ray's own message is a page of tracebacks)."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        err = failures[rank]
        err = getattr(err, "cause", None) or err
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else type(err).__name__
        return f"rank {rank}: {last[:300]} (see the Ray worker logs for the traceback)"
    err = getattr(exc, "controller_failure", None) or exc
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1][:300] if lines else ''}"


def _fit_roi_pca(cfg: TrainConfig, plan: TrainPlan, spec, stage: str) -> str | None:
    """The method's per-subject ROI PCA (:class:`FitsRoiPCA`) on this run's train trials, written beside the run;
    its URI (None for methods without one)."""
    cap = spec.get(FitsRoiPCA)
    if cap is None or not cap.enabled(plan.method_config):
        return None
    import mlflow

    t0 = time.time()
    tensors, info = fit_roi_pca(cfg.store, cfg.data, plan.info.rois, cap.groups(plan.method_config),
                                cap.width(plan.method_config), cfg.s3)
    uri = write_pca(resolve(cfg.storage_path(), cfg.s3).join(cfg.run_name or "run").uri, tensors, cfg.s3)
    mlflow.set_tag("raydecode.roi_pca_uri", uri)
    kept = {s: round(float(np.mean(v)), 3) for s, v in info["explained"].items()}
    print(f"[{stage}] ROI PCA to {info['width']} components on the train trials {info['trials']}: variance kept "
          f"(mean over groups) {kept} ({time.time() - t0:.1f} s)")
    return uri


def run_training(cfg: TrainConfig, stage: str = "pretrain", parent_run_id: str | None = None,
                 callbacks: list | None = None) -> StageResult:
    """One training run of ``cfg.method``: plan (store, targets, statistics), an MLflow run (a child of
    ``parent_run_id`` for sweep trials), Ray Train + DeepSpeed workers, the consolidated checkpoint.
    ``callbacks``: Ray Train callbacks (a sweep passes Tune's report callback)."""
    import mlflow

    t0 = time.time()
    cfg = absolute_paths(cfg)
    plan = plan_training(cfg)
    spec = get_method(cfg.method)
    counts = _describe(cfg, plan, stage)
    tracking_uri = tracking.configure(cfg)
    tracking.check_reachable(tracking_uri)  # before anything is claimed or started
    claim = _claim_run_name(cfg)
    if claim.resumed:
        print(f"[{stage}] run {cfg.run_name!r} exists with this config: resuming from its last checkpoint"
              + (f" in MLflow run {claim.mlflow_run_id}" if claim.mlflow_run_id else ""))
    with tracking.stage_run(cfg, stage, run_name=cfg.run_name, parent_run_id=parent_run_id, tags={
            "raydecode.method": cfg.method, "raydecode.store": cfg.store,
            "raydecode.checkpoint_uri": plan.final_uri}, resume_run_id=claim.mlflow_run_id) as run:
        run_id = run.info.run_id
        claim.record(run_id)
        tracking.log_params({f"model.{k}": v for k, v in plan.method_config.model_dump(mode="json").items()
                             if k not in cfg.model})
        tracking.log_params({"params.total": counts["total"], "data.train_rows": plan.train_rows,
                             "steps_per_epoch": plan.steps_per_epoch, "passes": plan.passes})
        init_ray(cfg.ray_address)
        _check_cluster_fits(cfg)
        stats_uri = None
        if spec.statistics(plan.method_config):  # e.g. Duala's source statistics, once per pretrained checkpoint
            st = run_class_statistics(cfg.store, cfg.init_from, spec.statistics(plan.method_config),
                                      plan.source_subjects, s3=cfg.s3, cpus=cfg.data.read_cpus)
            stats_uri = st.uri
            mlflow.set_tag("raydecode.stats_uri", st.uri)
            print(f"[{stage}] class statistics of {cfg.init_from}: {st.status} {st.uri} "
                  f"({st.info['trials']} trials of subjects {st.info['subjects']}, {st.seconds:.1f} s)")
        pca_uri = _fit_roi_pca(cfg, plan, spec, stage)
        payload = {
            "cfg": cfg.model_dump(mode="json"), "method_config": plan.method_config.model_dump(mode="json"),
            "info": plan.info.to_dict(), "targets": plan.targets, "steps_per_epoch": plan.steps_per_epoch,
            "epochs": plan.passes,
            "final_uri": plan.final_uri, "init_state_uri": plan.init_state_uri, "stats_uri": stats_uri,
            "pca_uri": pca_uri, "tracking_uri": tracking_uri, "run_id": run_id,
        }
        # a sweep's trials run side by side under Tune's own table: the step bar is for a single run
        progress = DriverProgress(stage, plan.steps_per_epoch * plan.passes, plan.steps_per_epoch,
                                  plan.passes, enabled=parent_run_id is None)
        payload["progress_board"] = progress.board
        trainer = _trainer(cfg, plan, payload, callbacks)
        try:  # a worker's UserError (bad store, bad weights) reaches the user as itself
            with user_errors_from_ray(), progress, _sigint_restored():
                result = trainer.fit()
        except UserError:
            raise
        except Exception as exc:
            raise TrainingError(f"training failed: {_first_failure(exc)}") from exc

        final = read_json(plan.final_uri, METRICS_FILE, cfg.s3)
        metrics = {k: v for k, v in final.items() if isinstance(v, (int, float))}
        ckpt_uri = None
        if result.checkpoint:  # Ray gives a path on the storage filesystem: back to a URI
            ckpt_uri = result.checkpoint.path
            if resolve(cfg.storage_path(), cfg.s3).is_s3:
                ckpt_uri = "s3://" + ckpt_uri.lstrip("/")
        artifacts = {"checkpoint": plan.final_uri, "last_ray_checkpoint": ckpt_uri,
                     "mlflow_run": f"runs:/{run_id}"}
        _log_artifacts(cfg, plan, run_id, artifacts)
        mlflow.log_metrics({f"final.{k}": float(v) for k, v in metrics.items() if k.startswith(("retrieval.", "test.", "semantic."))})

    rows = [[k, f"{v:.4g}"] for k, v in metrics.items()
            if k.startswith(("retrieval.", "test.", "semantic.", "train.loss")) or k in ("epoch", "step")]
    print("\n" + table(["metric", "value"], rows))
    print(f"\ncheckpoint {plan.final_uri}\nmlflow run {run_id} ({tracking_uri})")
    metrics["seconds"] = round(time.time() - t0, 1)
    return StageResult(stage=stage, status="ok", mlflow_run_id=run_id, metrics=metrics, artifacts=artifacts)


@contextlib.contextmanager
def _sigint_restored():
    """Ray Train's ``fit`` installs a SIGINT handler (Ctrl-C aborts the run) that holds the controller actor's handle
    and stays after the run: the finished controller (~700 MB) lived on until the next run, past ``ray.shutdown()``
    as an orphan, and a later Ctrl-C in the same process went to it. The handler from before, back after the run."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, before)


def _describe(cfg: TrainConfig, plan: TrainPlan, stage: str) -> dict[str, int]:
    """The run in one line (method, size, data, workers, targets); returns the parameter counts."""
    import torch

    spec = get_method(cfg.method)
    with torch.device("meta"):
        counts = count_parameters(spec.build_model(plan.method_config, plan.info))
    print(f"[{stage}] {cfg.method} ({cfg.preset}): {counts['total'] / 1e6:.2f} M parameters "
          f"({counts['trainable'] / 1e6:.2f} M trainable); "
          f"subjects {plan.info.subjects}; {plan.train_rows} train trials; {cfg.scaling.num_workers} workers x "
          f"{plan.steps_per_epoch} steps/epoch x {plan.passes} epochs"
          + (f" (= {cfg.optim.epochs} of {cfg.optim.samples_per_epoch} samples)" if cfg.optim.samples_per_epoch else "")
          + f"; ZeRO-{cfg.deepspeed.zero_stage}; "
          "targets " + ", ".join(f"{k}={_encoder_name(t['encoder'])} ({t['source']})" for k, t in plan.targets.items())
          + (f"; windows {plan.window.n_samples(plan.info.tr_s)} TRs from {plan.window.start_s:g} s after onset"
             if plan.window is not None else ""))
    return counts


def _datasets(cfg: TrainConfig, plan: TrainPlan) -> dict:
    """The train split (materialized when small) and the test split (every session's repetitions)."""
    from ray.data import DataContext

    spec = get_method(cfg.method)
    selection = cfg.data.model_copy(update={
        "embeddings": sorted({*cfg.data.embeddings, *(t["encoder"] for t in plan.targets.values()
                                                       if t["source"] == "store")}),
        "categories": cfg.data.categories or "categories" in spec.columns,
    })
    # a dataset snapshots the context it is created in and carries it to the split coordinator and the
    # workers, whose progress bars would reach the driver as a line per refresh (workers log one per epoch)
    data_ctx = DataContext.get_current()
    bars, data_ctx.enable_progress_bars = data_ctx.enable_progress_bars, False
    try:
        if plan.window is not None:
            def dataset(split, sel):
                return windows_dataset(cfg.store, split, plan.window, sel, cfg.s3)
        else:
            def dataset(split, sel):
                return trials_dataset(cfg.store, split, sel, cfg.s3)
        train = dataset("train", selection)
        # the test split is every session's repetitions of the shared images, whatever sessions train on
        test = dataset("test", selection.model_copy(update={
            "sessions": None, "keep_test_repeats": "betas_repeats" in spec.columns}))
    finally:
        data_ctx.enable_progress_bars = bars
    materialize = cfg.data.materialize
    if materialize is None:
        materialize = plan.train_bytes < MATERIALIZE_BELOW
    # small selections: one read, then every epoch splits blocks already in the object store (streaming
    # re-reads the store each epoch: seconds per epoch of start-up on small data); either way the blocks come in
    # read order (see _in_order): two runs of one config read the same rows in the same order
    train.dataset.context.execution_options.preserve_order = True
    return {"train": train.dataset.materialize() if materialize else train.dataset,
            "test": test.dataset.materialize()}


def _in_order():
    """Ray Train's ingest options with ``preserve_order``: blocks reach the split in read order and each worker gets
    the same rows in the same order on every run of an epoch, so the data order is a function of the seeds and the
    epoch (a resumed run skips exactly what it trained; Ray Data otherwise yields blocks as tasks finish)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _data_config():
    """Ray Train's ``DataConfig``: the train split in read order (:func:`_in_order`). A materialized one is split once:
    its blocks dealt to the workers in turn (:func:`deal_blocks`: each worker's part spans the whole seeded read
    order), then cut to equal row counts; each worker iterates its own blocks, the same every epoch, with no
    coordinator actor in the loop. ``streaming_split`` (kept for a streamed split) starts an execution on its
    SplitCoordinator every epoch and passes every worker's blocks through it: at world 2 (tiny preset) 0.14 s of a
    1.28 s epoch waiting for batches, 0.05-0.06 s split once; at world 1 0.08 and 0.04-0.05 s."""
    from ray.data.dataset import MaterializedDataset
    from ray.train import DataConfig

    class SplitOnce(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            train = datasets.get("train")
            if not isinstance(train, MaterializedDataset):
                return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
            rest = {k: v for k, v in datasets.items() if k != "train"}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            for part, iterators in zip(deal_blocks(train, world_size), out):
                iterators["train"] = part.iterator()
            return out

    return SplitOnce(datasets_to_split=["train"], execution_options={"train": _in_order()})


def _trainer(cfg: TrainConfig, plan: TrainPlan, payload: dict, callbacks: list | None):
    """Ray Train's TorchTrainer running the loop on ``scaling`` workers, checkpoints in ``cfg.storage_path()``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_fs = train_storage(cfg.storage_path(), cfg.s3)
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     placement_strategy=cfg.scaling.placement_strategy,
                                     resources_per_worker=resources),
        datasets=_datasets(cfg, plan),
        dataset_config=_data_config(),
        run_config=RunConfig(
            name=cfg.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's per-report INFO lines
            # the endpoint and region only: a runtime env is readable by anyone who can list the cluster's actors
            worker_runtime_env={"env_vars": cfg.s3.env(secrets=False)} if cfg.s3.env(secrets=False) else None,
        ),
    )


def _encoder_name(ref) -> str:
    return ref["name"] if isinstance(ref, dict) else str(ref)


def train_demand(cfg: TrainConfig, what: str = "training") -> Demand:
    """What one training run holds at once: its workers' bundles (placed with ``scaling.placement_strategy``), and
    beside them room for Ray Data's tasks, one at a time: a read task (``data.read_cpus``; it also joins the
    stimuli) or one of the test split's averaging shuffle (Ray Data's sort shuffle: one whole CPU)."""
    worker = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1.0} if cfg.scaling.use_gpu else {})}
    return Demand(what, [dict(worker) for _ in range(cfg.scaling.num_workers)], cfg.scaling.placement_strategy,
                  extra=[{"CPU": max(1.0, cfg.data.read_cpus)}],
                  hint="lower scaling.num_workers / scaling.cpus_per_worker / data.read_cpus, set scaling.use_gpu "
                       "to match the nodes, or add nodes")


def _check_cluster_fits(cfg: TrainConfig) -> None:
    """Refuse configs that could never be scheduled (instead of a placement group pending forever); on a cluster
    without an autoscaler, wait ``scaling.wait_for_nodes_s`` for nodes to join first."""
    require(train_demand(cfg), cfg.scaling.wait_for_nodes_s)


def _log_artifacts(cfg: TrainConfig, plan: TrainPlan, run_id: str, artifacts: dict) -> None:
    """Config, checkpoint reference and the learning curves as MLflow artifacts."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "checkpoint.json"), "w") as f:
            json.dump(artifacts, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(read_json(plan.final_uri, CONFIG_FILE, cfg.s3), f, indent=2)
        _curves_png(run_id, os.path.join(tmp, "curves.png"))
        mlflow.log_artifacts(tmp)


RETRIEVAL_CURVES = (("retrieval.brain_to_image_top1", "brain→image"), ("retrieval.image_to_brain_top1", "image→brain"),
                    ("retrieval.chance", "chance"))


def _curves_png(run_id: str, path: str) -> None:
    """Per epoch: the train loss, test retrieval (methods that predict retrieval embeddings) and the method's own
    test values (``test.*``, e.g. Dynadiff's denoising losses), one panel each."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    loss = client.get_metric_history(run_id, "train.loss")
    if not loss:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    retrieval = {label: client.get_metric_history(run_id, k) for k, label in RETRIEVAL_CURVES}
    tests = {k: client.get_metric_history(run_id, k) for k in sorted(client.get_run(run_id).data.metrics)
             if k.startswith("test.")}
    panels = [p for p in (("loss", {"train loss": loss}), ("test retrieval", retrieval if retrieval["brain→image"]
                                                             else {}), ("test values", tests)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, h in series.items():
            chance = label == "chance"
            ax.plot([m.step for m in h], [m.value for m in h], marker=None if chance else "o",
                    linestyle="--" if chance else "-", label=label.removeprefix("test."))
        ax.set(xlabel="epoch", title=title, **({"ylim": (0, 1), "ylabel": "top-1"} if title == "test retrieval"
                                               else {}))
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
