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
import os
import resource
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

from raydecode.config import TrainConfig
from raydecode.data.batches import collate
from raydecode.methods.spec import DatasetInfo, MethodSpec, Progress, get_method
from raydecode.nn.targets import BatchPreparer

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


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    if cfg.optim.schedule == "constant" or total_steps < 2:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    # MindEye2: OneCycle, warming up over the first two epochs
    pct = min(0.5, max(0.01, 2.0 / cfg.optim.epochs))
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.optim.lr, total_steps=total_steps + 1,
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
    from raydecode.evaluate.retrieval import retrieval_top1

    engine.eval()
    brain, image, subject = [], [], []
    sums: dict[str, float] = {}
    rows = 0
    for raw in batches:
        batch = prepare(dict(raw))
        if spec.test_metrics is not None:
            for k, v in spec.test_metrics(engine, batch).items():
                sums[k] = sums.get(k, 0.0) + float(v.float().sum())
            rows += len(batch["subject"])
        pred = spec.predict(engine, batch)
        if "brain" in pred and "image" in pred:
            brain.append(pred["brain"].float().cpu())
            image.append(pred["image"].float().cpu())
            subject.append(batch["subject"].cpu())
    engine.train()
    out = {}
    out.update(spec.test_summary(sums, rows))
    if brain:
        r = retrieval_top1(torch.cat(brain), torch.cat(image), torch.cat(subject).numpy(),
                           candidates=cfg.eval.candidates, draws=cfg.eval.draws, seed=cfg.optim.seed)
        out.update({f"retrieval.{k}": v for k, v in r.items()})
    return out


# -- MLflow (rank 0) -----------------------------------------------------------------------


class Tracker:
    def __init__(self, tracking_uri: str | None, run_id: str | None, enabled: bool):
        self.client = None
        if enabled and tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()
                                                    if np.isfinite(v)])


# -- the loop ------------------------------------------------------------------------------


def train_loop_per_worker(payload: dict) -> None:
    import ray.data
    import ray.train
    from ray.data.collate_fn import NumpyBatchCollateFn
    from ray.train import Checkpoint

    from raydecode.train.progress import Poster

    cfg = TrainConfig.model_validate(payload["cfg"])
    _worker_logging()
    ray.data.DataContext.get_current().enable_progress_bars = False  # one line per epoch instead
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import ray.train.torch

    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    bf16 = cfg.deepspeed.precision == "bf16" or (cfg.deepspeed.precision == "auto" and use_gpu)
    spec = get_method(cfg.method)
    mcfg = spec.config_model(**payload["method_config"])
    info = DatasetInfo.from_dict(payload["info"])
    steps_per_epoch = int(payload["steps_per_epoch"])
    total_steps = steps_per_epoch * cfg.optim.epochs

    torch.manual_seed(cfg.optim.seed)  # identical initial weights on every rank
    model = spec.build_model(mcfg, info)
    if payload.get("init_state_uri"):
        from raydecode.checkpoint import load_state

        state = load_state(payload["init_state_uri"], cfg.s3)
        fresh = spec.load_pretrained(model, state) if spec.load_pretrained else model.load_state_dict(state)
        if rank == 0:
            shown = fresh if len(fresh) <= 8 else fresh[:8] + [f"... {len(fresh) - 8} more"]
            log.info(f"initialised from {payload['init_state_uri']}; left at init: {shown}")
    if payload.get("stats_uri"):
        from raydecode.data.stats import load_stats

        spec.attach_statistics(model, load_stats(payload["stats_uri"], cfg.s3)[0])
    if rank:  # same weights on every rank, but each rank its own dropout masks and noise draws
        torch.manual_seed(cfg.optim.seed + 7919 * rank)
    optimizer = torch.optim.AdamW(spec.param_groups(model, mcfg, cfg.optim.weight_decay), lr=cfg.optim.lr)
    # methods with frozen parts (e.g. a diffusion UNet) checkpoint only what they train
    partial = spec.persisted_keys is not None
    # the engine steps the schedule and keeps its state in its checkpoints
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=make_scheduler(optimizer, cfg, total_steps),
        config=deepspeed_config(cfg, bf16), dist_init_required=False)
    dtype = torch.bfloat16 if bf16 else torch.float32
    prepare = BatchPreparer(payload["targets"], device, dtype, cfg.store, cfg.s3.model_dump())
    tracker = Tracker(payload.get("tracking_uri"), payload.get("run_id"), rank == 0)

    epoch, step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=CHECKPOINT_TAG, load_module_strict=not partial)
        epoch, step = int(client["epoch"]), int(client["step"])
        if rank == 0:
            log.info(f"resumed from checkpoint at epoch {epoch}, step {step}")

    poster = Poster(payload.get("progress_board"), rank == 0)
    poster.begin(step, epoch)

    def save(metrics: dict, epoch_next: int) -> None:
        with tempfile.TemporaryDirectory(prefix="raydecode-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={"epoch": epoch_next, "step": step},
                                   exclude_frozen_parameters=partial)
            if rank == 0:
                with open(os.path.join(tmp, "progress.json"), "w") as f:
                    json.dump({"epoch": epoch_next, "step": step, "metrics": metrics}, f)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_epoch={epoch_next:04d}_step={step:07d}")

    # the test split is small and not split across workers: held in memory, evaluated every epoch
    test_batches = [collate(b) for b in ray.train.get_dataset_shard("test").iter_batches(batch_size=256,
                                                                                       batch_format="numpy")]
    train_shard = ray.train.get_dataset_shard("train")
    fault = cfg.fault_injection
    history: list[dict] = []
    metrics: dict[str, float] = {}

    class NumpyCollate(NumpyBatchCollateFn):  # Ray Data's class-based collate (a plain function is deprecated)
        def __call__(self, batch):
            return collate(batch)

    collate_numpy = NumpyCollate()
    while epoch < cfg.optim.epochs:
        t0 = time.time()
        skip = step - epoch * steps_per_epoch  # resuming mid-epoch: the epoch's batches already trained
        sums: dict[str, float] = {}
        n = 0
        for i, raw in enumerate(train_shard.iter_torch_batches(
                batch_size=cfg.optim.batch_size, drop_last=True, collate_fn=collate_numpy,
                local_shuffle_buffer_size=cfg.optim.shuffle_buffer or None, local_shuffle_seed=cfg.optim.seed + epoch)):
            if i < skip or i >= steps_per_epoch:
                continue
            batch = prepare(raw)
            loss, parts = spec.loss(engine, batch, Progress(epoch, cfg.optim.epochs, step, total_steps))
            engine.backward(loss)
            engine.step()
            step += 1
            n += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            poster.step(step, epoch, sums["loss"] / n if "loss" in sums else None)
            if fault and rank == fault.rank and step == fault.at_step and not os.path.exists(fault.marker):
                open(fault.marker, "w").write(f"killed rank {rank} at step {step}\n")
                log.info(f"fault injection: killing rank {rank} at step {step} in {fault.delay_s:g} s")
                # Ray Train's controller records a reported checkpoint when it next polls the workers: a worker
                # dying a moment after its report can beat that, and the group then restarts from the one before
                time.sleep(fault.delay_s)
                os._exit(1)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and i + 1 < steps_per_epoch:
                save({"epoch": epoch, "step": step}, epoch)
        epoch += 1
        metrics = {f"train.{k}": v / max(1, n) for k, v in sums.items()}
        metrics.update({"epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0],
                        "epoch_seconds": time.time() - t0, "train.samples_per_s": n * cfg.optim.batch_size * world
                        / max(1e-9, time.time() - t0),
                        "worker.peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        if epoch % cfg.eval.every_epochs == 0 or epoch == cfg.optim.epochs:
            metrics.update(evaluate(engine, spec, test_batches, prepare, cfg))
        tracker.log({k: v for k, v in metrics.items() if k not in ("epoch",)}, step=epoch)
        poster.epoch(step, epoch, metrics)
        history.append(metrics)
        if rank == 0:
            shown = " ".join(f"{k.split('.')[-1]} {v:.4g}" for k, v in metrics.items()
                             if k.startswith(("train.loss", "test.")) or k.endswith("top1"))
            log.info(f"epoch {epoch}/{cfg.optim.epochs} step {step} {shown} ({metrics['epoch_seconds']:.1f} s)")
        if epoch % cfg.checkpoint.every_epochs == 0 or epoch == cfg.optim.epochs:
            save(metrics, epoch)
        else:
            ray.train.report(metrics)

    if not metrics:  # resumed after the last epoch: evaluate the restored weights
        metrics = {"epoch": epoch, "step": step, **evaluate(engine, spec, test_batches, prepare, cfg)}
    state = full_state_dict(engine, cfg.deepspeed.zero_stage)
    if rank == 0:
        from raydecode.checkpoint import frozen_digest, write_consolidated

        config = {"method": spec.name, "preset": cfg.preset, "model": mcfg.model_dump(mode="json"),
                  "info": info.to_dict(), "targets": payload["targets"], "train": payload["cfg"]}
        if partial:  # what the weights left out were at the end (a loader checks it rebuilt the same ones)
            config["frozen_sha256"] = frozen_digest(state, spec.persisted_keys(engine.module))
        state = spec.state_to_save(state, engine.module)
        write_consolidated(payload["final_uri"], state, config, {**metrics, "steps_per_epoch": steps_per_epoch,
                                                                  "world_size": world}, cfg.s3)
        log.info(f"consolidated checkpoint: {payload['final_uri']}")
