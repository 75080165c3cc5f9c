"""The single training loop: one Ray Train worker, one DeepSpeed engine, any registered method.

Every worker builds the method's model (same seed on every rank), wraps it in a
DeepSpeed engine (ZeRO stage and precision from config, a torch AdamW), streams
its part of the train split (``get_dataset_shard("train")``), and asks the
:class:`~raydecode.methods.spec.MethodSpec` for the loss. Frozen targets come
from the store's embedding columns or are computed here (cached by image id).
Each epoch it evaluates test retrieval; checkpoints are DeepSpeed per-rank
files reported with ``ray.train.report`` (merged into one directory in
``storage_path``), resumed from ``ray.train.get_checkpoint()``. At the end the
full state dict is gathered and rank 0 writes the consolidated checkpoint.
Rank 0 alone logs to MLflow. Nothing here names a method.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from raydecode.checkpoint import frozen_digest, load_state, write_consolidated
from raydecode.config import TrainConfig
from raydecode.data.batches import collate
from raydecode.data.pca import load_pca
from raydecode.data.stats import load_stats
from raydecode.errors import Diverged, first_line
from raydecode.evaluate.retrieval import retrieval_top1
from raydecode.evaluate.semantic import semantic_metrics
from raydecode.methods.spec import (
    DatasetInfo,
    FitsRoiPCA,
    FreezesWeights,
    MethodSpec,
    NeedsStatistics,
    Progress,
    get_method,
)
from raydecode.nn.targets import BatchPreparer
from raydecode.tracking import bounded_http
from raydecode.train.progress import Poster
from raydecode.train.state import WeightsOnlyLoads, restore_rng, save_rng

CHECKPOINT_TAG = "state"
log = logging.getLogger("raydecode.train")


def _worker_logging() -> None:
    """Progress lines go straight to the worker's stdout (Ray forwards them to the driver) under a ``[train]``
    prefix; Ray Train's own INFO lines are silenced by ``RunConfig.logging_config`` in the launcher."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[train] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    # Ray Train configures its workers' logging after the job's setup hook (runtime.quiet_worker) ran: libraries'
    # INFO lines on the root logger (open_clip builds an encoder in every worker) stay in the worker's log file
    logging.getLogger().setLevel(logging.WARNING)
    try:  # Ray Train logs every report at INFO on a logger named by its file path, which LoggingConfig misses
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


# -- DeepSpeed -----------------------------------------------------------------------------


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in cfg.deepspeed.extra.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def skip_lone_allreduce(engine, world: int, zero_stage: int) -> None:
    """One rank at ZeRO-0 (a sweep trial, a claims arm): DeepSpeed still flattens every gradient into buckets, all-
    reduces them with itself and copies them back each step (4 % of a tiny MindEye2 step on CPU,
    ``benchmarks/bench_step.py --profile``); with nothing to reduce, the engine skips it. ZeRO-1/2 keep theirs:
    their optimizer moves the gradients into its partitions there."""
    if world == 1 and zero_stage == 0:
        engine.enable_backward_allreduce = False


def numpy_collate():
    """The train split's collate for ``iter_torch_batches``: numpy batches to :func:`collate`'s tensors (Ray Data's
    class-based collate: a plain function is deprecated)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class NumpyCollate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate(batch)

    return NumpyCollate()


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.optim.schedule == "constant" or total_steps < 2:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    if cfg.optim.schedule == "cosine":  # Dynadiff: linear warm-up, then cosine to 0 at the last step
        warm = min(cfg.optim.warmup_steps, total_steps - 1)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / warm if step < warm else
                                                 0.5 * (1 + math.cos(math.pi * (step - warm) / (total_steps - warm))))
    # MindEye2: OneCycle, warming up over the first two epochs (of optim.samples_per_epoch samples, when set)
    pct = min(0.5, max(0.01, 2.0 / cfg.optim.epochs))
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                               total_steps=total_steps + 1,
                                               pct_start=pct, final_div_factor=1000)


def full_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The whole model's state dict on every rank (ZeRO-3 partitions are gathered; collective)."""
    import deepspeed

    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in module.state_dict().items()}


# -- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def evaluate(engine, spec: MethodSpec, batches: list[dict], prepare: BatchPreparer, cfg: TrainConfig) -> dict:
    """Test metrics in eval mode; every rank runs it (ZeRO-3): retrieval (per subject among its test images) when
    the method predicts ``brain`` and ``image`` embeddings, and the method's own ``test_metrics`` averaged over rows."""
    engine.eval()
    brain, image, subject, logits, labels = [], [], [], [], []
    sums: dict[str, float] = {}
    rows = 0
    for raw in batches:
        batch = prepare(dict(raw), augment=False)
        values = spec.test_values(engine, batch)
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v.float().sum())
        rows += len(batch["subject"]) if values else 0
        pred = spec.predict(engine, batch)
        if "brain" in pred and "image" in pred:
            brain.append(pred["brain"].float().cpu())
            image.append(pred["image"].float().cpu())
            subject.append(batch["subject"].cpu())
        if "logits" in pred and "categories" in batch:
            logits.append(pred["logits"].float().cpu())
            labels.append(batch["categories"].cpu())
    engine.train()
    out = {}
    out.update(spec.test_summary(sums, rows))
    if logits:  # class scores: the semantic metrics (CLIP-MUSED's mAP, AUC, Hamming)
        out.update({f"semantic.{k}": v for k, v in
                    semantic_metrics(torch.cat(logits).numpy(), torch.cat(labels).numpy()).items()})
    if brain:
        r = retrieval_top1(torch.cat(brain), torch.cat(image), torch.cat(subject).numpy(),
                           candidates=cfg.eval.candidates, draws=cfg.eval.draws, seed=cfg.optim.seed)
        out.update({f"retrieval.{k}": v for k, v in r.items()})
    return out


# -- MLflow (rank 0) -----------------------------------------------------------------------


class Tracker:
    """Rank 0's metrics to the MLflow run. A tracking server that stops answering does not stop training: the
    metrics wait in memory and go with the next call that gets through (the run's history ends up complete)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None, enabled: bool):
        self.client, self.pending, self.down_since = None, [], None
        if enabled and tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            bounded_http()  # a worker on another node did not inherit the driver's settings
            self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), ts, step) for k, v in metrics.items() if np.isfinite(v)]
        self.flush()

    def flush(self) -> bool:
        """Send what waits (MLflow takes up to 1,000 metrics a call); False while the server does not answer."""
        if self.client is None:
            return True
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[:1000])
                self.pending = self.pending[1000:]
        except Exception as exc:  # noqa: BLE001 - any failure to reach the server: keep the metrics, go on
            if self.down_since is None:
                self.down_since = time.time()
                log.warning(f"MLflow does not answer ({first_line(exc, 160)}); training goes on, its metrics wait "
                            "and are sent when it answers again")
            return False
        if self.down_since is not None:
            log.warning(f"MLflow answers again after {time.time() - self.down_since:.0f} s: its waiting metrics "
                        "were sent")
            self.down_since = None
        return True


# -- the loop ------------------------------------------------------------------------------


def train_loop_per_worker(payload: dict) -> None:
    """Ray Train's entry point on every worker."""
    Trainer(payload).run()


class Trainer:
    """One worker's training run: :meth:`setup` (model, DeepSpeed engine, data shards, resume), epochs of
    :meth:`train_step`, :meth:`evaluate` and :meth:`save` (a Ray Train report with DeepSpeed's per-rank files), and
    :meth:`finish` (the consolidated checkpoint, rank 0)."""
    def __init__(self, payload: dict):
        import ray.data
        import ray.train

        self.payload = payload
        self.cfg = cfg = TrainConfig.model_validate(payload["cfg"])
        _worker_logging()
        ray.data.DataContext.get_current().enable_progress_bars = False  # one line per epoch instead
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        if not self.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        self.spec = get_method(cfg.method)
        self.mcfg = self.spec.config_model(**payload["method_config"])
        self.info = DatasetInfo.from_dict(payload["info"])
        self.steps_per_epoch = int(payload["steps_per_epoch"])
        self.epochs = int(payload.get("epochs", cfg.optim.epochs))  # passes over the data
        self.total_steps = self.steps_per_epoch * self.epochs
        # methods with frozen parts (e.g. a diffusion UNet) checkpoint only what they train
        self.partial = self.spec.partial_checkpoints
        self.epoch, self.step = 0, 0
        self.metrics: dict[str, float] = {}
        self.timing: dict[str, float] = {}  # seconds of the epoch so far per part (train_epoch)

    # -- setup ---------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        import deepspeed
        import ray.train
        import ray.train.torch

        cfg = self.cfg
        device = ray.train.torch.get_device() if self.use_gpu else torch.device("cpu")
        bf16 = cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and self.use_gpu)
        model = self.build_model()
        groups = self.spec.param_groups(model, self.mcfg, cfg.optim.weight_decay)
        for group in groups:  # a method may scale a group's learning rate (MethodSpec.param_groups)
            group["lr"] = cfg.optim.lr * group.get("lr_scale", 1.0)
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
        # the engine steps the schedule and keeps its state in its checkpoints
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer, cfg, self.total_steps),
            config=deepspeed_config(cfg, bf16), dist_init_required=False)
        skip_lone_allreduce(self.engine, self.world, cfg.deepspeed.zero_stage)
        # resuming reads the checkpoint from storage other jobs can write: no pickle code runs on load
        if self.engine.checkpoint_engine is not None:
            self.engine.checkpoint_engine = WeightsOnlyLoads(self.engine.checkpoint_engine)
        self.prepare = BatchPreparer(self.payload["targets"], device, torch.bfloat16 if bf16 else torch.float32,
                                     cfg.store, cfg.s3.model_dump(), local_cache=cfg.data.local_cache)
        self.tracker = Tracker(self.payload.get("tracking_uri"), self.payload.get("run_id"), self.rank == 0)
        self.resume()
        self.poster = Poster(self.payload.get("progress_board"), self.rank == 0)
        self.poster.begin(self.step, self.epoch)
        # the test split is small and not split across workers: held in memory, evaluated every epoch
        self.test_batches = [collate(b) for b in ray.train.get_dataset_shard("test").iter_batches(
            batch_size=256, batch_format="numpy")]
        self.train_shard = ray.train.get_dataset_shard("train")

    def build_model(self) -> torch.nn.Module:
        """The method's model, identical on every rank, started from ``init_from`` / given its statistics."""
        cfg, spec, payload = self.cfg, self.spec, self.payload
        torch.manual_seed(cfg.optim.seed)  # identical initial weights on every rank
        model = spec.build_model(self.mcfg, self.info)
        if payload.get("init_state_uri"):
            state = load_state(payload["init_state_uri"], cfg.s3)
            fresh = spec.load_pretrained(model, state)
            if self.rank == 0:
                shown = fresh if len(fresh) <= 8 else fresh[:8] + [f"... {len(fresh) - 8} more"]
                log.info(f"initialised from {payload['init_state_uri']}; left at init: {shown}")
        if payload.get("stats_uri"):
            spec.get(NeedsStatistics).attach(model, load_stats(payload["stats_uri"], cfg.s3)[0])
        if payload.get("pca_uri"):  # fitted by the driver on the train trials (FitsRoiPCA)
            spec.get(FitsRoiPCA).attach(model, load_pca(payload["pca_uri"], cfg.s3))
        if self.rank:  # same weights on every rank, but each rank its own dropout masks and noise draws
            torch.manual_seed(cfg.optim.seed + 7919 * self.rank)
        return model

    def resume(self) -> None:
        """From Ray Train's latest reported checkpoint, if the worker group restarted (or the run is resumed)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                _, client = self.engine.load_checkpoint(d, tag=CHECKPOINT_TAG, load_module_strict=not self.partial)
                restored = restore_rng(d, self.rank)
            self.epoch, self.step = int(client["epoch"]), int(client["step"])
            if self.rank == 0:
                log.info(f"resumed from checkpoint at epoch {self.epoch}, step {self.step}"
                         + ("" if restored else " (no random state for this rank: dropout and noise draws differ "
                                                "from an uninterrupted run)"))

    # -- training --------------------------------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        while self.epoch < self.epochs:
            self.train_epoch()
        if not self.metrics:  # resumed after the last epoch: evaluate the restored weights
            self.metrics = {"epoch": self.epoch, "step": self.step, **self.evaluate()}
        self.finish()

    def train_epoch(self) -> None:
        cfg, t0 = self.cfg, time.time()
        skip = self.step - self.epoch * self.steps_per_epoch  # resuming mid-epoch: the epoch's batches already trained
        sums: dict[str, float] = {}
        n = 0
        self.timing = dict.fromkeys(("data_wait", "prepare", "step"), 0.0)
        t = time.perf_counter()
        for i, raw in enumerate(self.train_shard.iter_torch_batches(
                batch_size=cfg.optim.batch_size, drop_last=True, collate_fn=numpy_collate(),
                local_shuffle_buffer_size=cfg.optim.shuffle_buffer or None,
                local_shuffle_seed=cfg.optim.seed + self.epoch)):
            self.timing["data_wait"] += time.perf_counter() - t
            if i < skip or i >= self.steps_per_epoch:
                t = time.perf_counter()
                continue
            for k, v in self.train_step(raw).items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            self.poster.step(self.step, self.epoch, sums["loss"] / n if "loss" in sums else None)
            self._inject_fault()
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 \
                    and i + 1 < self.steps_per_epoch:
                self.save({"epoch": self.epoch, "step": self.step}, self.epoch)
            t = time.perf_counter()
        self.end_epoch(sums, n, t0)

    def train_step(self, raw: dict) -> dict[str, float]:
        """One optimizer step on a batch; returns the method's loss parts."""
        t0 = time.perf_counter()
        batch = self.prepare(raw)
        t1 = time.perf_counter()
        loss, parts = self.spec.loss(self.engine, batch,
                                     Progress(self.epoch, self.epochs, self.step, self.total_steps))
        fault = self.cfg.fault_injection
        if fault and fault.kind == "nan_loss" and self.rank == fault.rank and self.step + 1 == fault.at_step:
            loss = loss * float("nan")
        if not torch.isfinite(loss.detach()).all():  # before the update: the weights and checkpoints stay good
            raise Diverged(f"the loss is {loss.item()} at epoch {self.epoch + 1}, step {self.step + 1} (rank "
                           f"{self.rank}, lr {self.scheduler.get_last_lr()[0]:.3g}); the run stopped, its last "
                           "checkpoint is from before: lower optim.lr or check the data")
        self.engine.backward(loss)
        self.engine.step()
        self.step += 1
        self.timing["prepare"] += t1 - t0
        self.timing["step"] += time.perf_counter() - t1
        return parts

    def end_epoch(self, sums: dict[str, float], n: int, t0: float) -> None:
        """The epoch's metrics (evaluation when due) to MLflow, the driver's bar and the log; a checkpoint when due."""
        import ray.train

        cfg = self.cfg
        self.epoch += 1
        elapsed = time.time() - t0
        metrics = {f"train.{k}": v / max(1, n) for k, v in sums.items()}
        metrics.update({"epoch": self.epoch, "step": self.step, "lr": self.scheduler.get_last_lr()[0],
                        "epoch_seconds": elapsed,
                        "train.samples_per_s": n * cfg.optim.batch_size * self.world / max(1e-9, time.time() - t0),
                        "worker.peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        # where the epoch went (rank 0's): waiting for batches, their targets, forward/backward/step
                        **{f"time.{k}_s": v for k, v in self.timing.items()}})
        if self.epoch % cfg.eval.every_epochs == 0 or self.epoch == self.epochs:
            metrics.update(self.evaluate())
        self.tracker.log({k: v for k, v in metrics.items() if k not in ("epoch",)}, step=self.epoch)
        self.poster.epoch(self.step, self.epoch, metrics)
        if self.rank == 0:
            shown = " ".join(f"{k.split('.')[-1]} {v:.4g}" for k, v in metrics.items()
                             if k.startswith(("train.loss", "test.")) or k.endswith("top1"))
            log.info(f"epoch {self.epoch}/{self.epochs} step {self.step} {shown} "
                     f"({metrics['epoch_seconds']:.1f} s)")
        self.metrics = metrics
        if self.epoch % cfg.checkpoint.every_epochs == 0 or self.epoch == self.epochs:
            self.save(metrics, self.epoch)
        else:
            ray.train.report(metrics)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.engine, self.spec, self.test_batches, self.prepare, self.cfg)

    def _inject_fault(self) -> None:
        fault = self.cfg.fault_injection
        if fault and fault.kind == "kill" and self.rank == fault.rank and self.step == fault.at_step \
                and not os.path.exists(fault.marker):
            open(fault.marker, "w").write(f"killed rank {self.rank} at step {self.step}\n")
            log.info(f"fault injection: killing rank {self.rank} at step {self.step} in {fault.delay_s:g} s")
            # Ray Train's controller records a reported checkpoint when it next polls the workers: a worker
            # dying a moment after its report can beat that, and the group then restarts from the one before
            time.sleep(fault.delay_s)
            os._exit(1)

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def save(self, metrics: dict, epoch_next: int) -> None:
        """DeepSpeed's per-rank checkpoint files, reported to Ray Train (merged into one directory in storage)."""
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="raydecode-ckpt-") as tmp:
            self.engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG,
                                        client_state={"epoch": epoch_next, "step": self.step},
                                        exclude_frozen_parameters=self.partial)
            save_rng(tmp, self.rank)
            if self.rank == 0:
                with open(os.path.join(tmp, "progress.json"), "w") as f:
                    json.dump({"epoch": epoch_next, "step": self.step, "metrics": metrics}, f)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_epoch={epoch_next:04d}_step={self.step:07d}")

    def finish(self) -> None:
        """The full state dict gathered from every partition (collective); rank 0 writes the consolidated
        checkpoint (weights, config, metrics)."""
        cfg, spec, engine = self.cfg, self.spec, self.engine
        for wait in (0, 5, 10, 20, 30):  # the metrics that waited for MLflow: a last minute for it to come back
            time.sleep(wait)
            if self.tracker.flush():
                break
        else:
            log.warning(f"MLflow did not come back: {len(self.tracker.pending)} metric values were not logged "
                        "(the final ones are in the checkpoint's metrics.json)")
        state = full_state_dict(engine, cfg.deepspeed.zero_stage)
        if self.rank != 0:
            return
        # the method as configured (a name, or module:name for a method outside raydecode)
        config = {"method": cfg.method, "preset": cfg.preset, "model": self.mcfg.model_dump(mode="json"),
                  "info": self.info.to_dict(), "targets": self.payload["targets"], "train": self.payload["cfg"]}
        if self.partial:  # what the weights left out were at the end (a loader checks it rebuilt the same ones)
            config["frozen_sha256"] = frozen_digest(state, spec.get(FreezesWeights).persisted_keys(engine.module))
        state = spec.state_to_save(state, engine.module)
        write_consolidated(self.payload["final_uri"], state, config,
                           {**self.metrics, "steps_per_epoch": self.steps_per_epoch, "world_size": self.world}, cfg.s3)
        log.info(f"consolidated checkpoint: {self.payload['final_uri']}")
