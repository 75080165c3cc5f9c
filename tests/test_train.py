"""The training stage: MindEye2 on Ray Train + DeepSpeed (2 CPU workers), MLflow, checkpoints, fine-tuning."""

from __future__ import annotations

import json
import os
import posixpath
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SOURCE_SUBJECTS, STEPS_PER_EPOCH, metric_history, tiny_config

from raydecode.errors import ConfigError
from raydecode.train.launch import run_training


def test_pretrain_learns_and_is_tracked(pretrained):
    cfg, result = pretrained
    m = result.metrics
    loss = metric_history(cfg, result.mlflow_run_id, "train.loss")
    assert [s for s, _ in loss] == list(range(1, 7))
    assert loss[-1][1] < 0.6 * loss[0][1], loss
    chance = m["retrieval.chance"]
    assert chance == pytest.approx(1 / 30)
    assert m["retrieval.brain_to_image_top1"] >= 5 * chance, m
    assert m["retrieval.image_to_brain_top1"] >= 5 * chance, m
    assert m["step"] == 6 * STEPS_PER_EPOCH

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.resolved_tracking_uri())
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    db_dir = os.path.dirname(cfg.resolved_tracking_uri()[len("sqlite:///"):])
    assert run.info.artifact_uri.startswith(Path(db_dir, "mlartifacts").as_uri()), run.info.artifact_uri
    assert run.data.params["deepspeed.zero_stage"] == "2"
    assert run.data.params["model.hidden"] == "128"
    assert "s3.secret_access_key" not in run.data.params
    assert run.data.tags["raydecode.checkpoint_uri"] == result.artifacts["checkpoint"]
    arts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"config.json", "checkpoint.json", "curves.png"} <= arts
    assert len(metric_history(cfg, result.mlflow_run_id, "retrieval.brain_to_image_top1")) == 6


def test_consolidated_checkpoint_reproduces_retrieval_in_a_fresh_process(pretrained, tiny_store, tmp_path):
    cfg, result = pretrained
    script = f"""
import json, sys, torch
from raydecode.checkpoint import load_consolidated
from raydecode.config import DataSelection
from raydecode.data.pipeline import read_split
from raydecode.nn.encoders import FrozenEncoder, TargetCache, encoder_config
from raydecode.evaluate.retrieval import retrieval_top1
from raydecode.data.batches import collate

ck = load_consolidated({result.artifacts['checkpoint']!r})
test = collate(read_split({tiny_store!r}, "test", DataSelection(subjects={SOURCE_SUBJECTS}, images=True,
                                                                keep_test_repeats=True)))  # MindEye2's protocol
cache = TargetCache({{k: FrozenEncoder(encoder_config(t["encoder"])) for k, t in ck.config["targets"].items()}})
test.update(cache(test["image_id"], test.pop("image")))
with torch.no_grad():
    pred = ck.spec.predict(ck.model, test)
r = retrieval_top1(pred["brain"], pred["image"], test["subject"].numpy())
json.dump({{"retrieval": r, "ray": "ray" in sys.modules, "deepspeed": "deepspeed" in sys.modules}}, sys.stdout)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["ray"] and not out["deepspeed"]
    for key in ("brain_to_image_top1", "image_to_brain_top1"):
        assert out["retrieval"][key] == pytest.approx(result.metrics[f"retrieval.{key}"], abs=0.01)


def test_fine_tune_adds_the_new_subject_and_runs_against_s3_with_zero1(pretrained, tiny_store, s3_server, tmp_path):
    """MindEye2's 1-hour recipe: a new subject's ridge map on top of the shared model, with ZeRO-1 against S3 (store
    read from and checkpoints written to moto's server): it decodes the new subject far above chance and its
    consolidated checkpoint loads back from S3. Whether it beats training from scratch is MindEye2's claim, decided
    with an interval by `raydecode claims` (test_claims)."""
    from pyarrow import fs as pafs

    from raydecode.checkpoint import load_consolidated
    from raydecode.storage import resolve

    cfg, result = pretrained
    store = resolve("s3://nsd/train/store", s3_server)
    pafs.copy_files(tiny_store, store.path, destination_filesystem=store.fs)
    fine_cfg = tiny_config(store.uri, tmp_path / "ft", "finetune", init_from=result.artifacts["checkpoint"],
                           s3=s3_server.model_dump(), deepspeed={"zero_stage": 1},
                           checkpoint={"storage_path": "s3://nsd/train/runs", "every_epochs": 4},
                           data={"subjects": [8], "sessions": [1]}, optim={"epochs": 12, "batch_size": 8, "lr": 1e-3})
    fine = run_training(fine_cfg)
    assert fine.metrics["retrieval.candidates"] == 30  # tested on every session's test images, not session 1's
    both = ("brain_to_image_top1", "image_to_brain_top1")
    curve = [v for k in both for _, v in metric_history(fine_cfg, fine.mlflow_run_id, f"retrieval.{k}")]
    assert len(curve) == 2 * 12  # evaluated after every epoch
    assert all(fine.metrics[f"retrieval.{k}"] >= 1 / 30 + 0.2 for k in both), fine.metrics  # far above chance

    # ZeRO-1 wrote one optimizer partition per rank into the last Ray Train checkpoint, on S3
    assert fine.artifacts["checkpoint"] == "s3://nsd/train/runs/finetune/final"
    last = resolve(fine.artifacts["last_ray_checkpoint"], s3_server).join("state")
    files = {posixpath.basename(f.path) for f in last.list_files()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    # the consolidated fine-tune loads back from S3 with the new subject's ridge map
    ck = load_consolidated(fine.artifacts["checkpoint"], s3_server)
    assert ck.info.subjects == [8] and ck.metrics["step"] == fine.metrics["step"]


def test_worker_failure_resumes_from_the_last_checkpoint(pretrained):
    cfg, result = pretrained
    assert Path(cfg.fault_injection.marker).exists()  # the failure happened
    assert result.metrics["step"] == 6 * STEPS_PER_EPOCH
    # epoch 1 was logged once: the restarted group resumed at epoch 2 instead of starting over
    assert [s for s, _ in metric_history(cfg, result.mlflow_run_id, "epoch_seconds")] == list(range(1, 7))
    files = set(os.listdir(os.path.join(result.artifacts["last_ray_checkpoint"], "state")))
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files


def test_a_run_name_is_not_reused_for_another_config(pretrained):
    """Ray Train resumes a run by name: relaunching 'pretrain-tiny' with another learning rate would silently
    continue the old run, so it is refused before anything starts, naming what changed."""
    cfg, _ = pretrained
    changed = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 5e-4})})
    with pytest.raises(ConfigError, match=r"run_name 'pretrain-tiny' .*optim\.lr 0\.001 -> 0\.0005"):
        run_training(changed)


def test_bad_training_configs_fail_before_any_worker_starts(tiny_store, tmp_path):
    with pytest.raises(ConfigError, match="method 'mindeye3'"):
        run_training(tiny_config(tiny_store, tmp_path, "x", method="mindeye3"))
    with pytest.raises(ConfigError, match="optim.batch_size 4096"):
        run_training(tiny_config(tiny_store, tmp_path, "x", optim={"batch_size": 4096}))
    with pytest.raises(ConfigError, match="unknown key 'hiden'"):
        run_training(tiny_config(tiny_store, tmp_path, "x", model={"hiden": 3}))
    with pytest.raises(ConfigError, match="needs `weights`"):
        run_training(tiny_config(tiny_store, tmp_path, "x", model={"clip_encoder": "openclip-bigg"}))


def test_an_epoch_can_be_counted_in_samples_as_mindeye2s_reference_does(tiny_store, tmp_path):
    """optim.samples_per_epoch: 150 epochs of 30,000 samples on NSD's 7 x ~24.5k train trials are ~26 passes, not
    150; here 6 epochs of 300 samples over the 900 train trials of 6 subjects are 2 passes, and the OneCycle
    warm-up still spans the first two (nominal) epochs: a third of the steps."""
    from raydecode.train.launch import plan_training
    from raydecode.train.loop import make_scheduler

    plain = plan_training(tiny_config(tiny_store, tmp_path, "x"))
    assert (plain.train_rows, plain.passes) == (900, 6)
    cfg = tiny_config(tiny_store, tmp_path, "x", optim={"samples_per_epoch": 300})
    plan = plan_training(cfg)
    assert plan.passes == 2 and plan.steps_per_epoch == plain.steps_per_epoch
    total = plan.passes * plan.steps_per_epoch
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make_scheduler(opt, cfg, total)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert int(np.argmax(lrs)) == round(total / 3)  # the peak after 2 of 6 epochs' samples


def test_dynadiffs_schedule_warms_up_linearly_then_follows_a_cosine_to_zero(tiny_store, tmp_path):
    """optim.schedule cosine (Dynadiff: 1k warm-up steps, then cosine): lr rises linearly to its peak at the end of
    the warm-up, is half of it halfway through the rest, and ends at 0."""
    from raydecode.train.loop import make_scheduler

    cfg = tiny_config(tiny_store, tmp_path, "x", optim={"schedule": "cosine", "warmup_steps": 10, "lr": 1e-3})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make_scheduler(opt, cfg, 110)
    lrs = []
    for _ in range(111):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and max(lrs) == pytest.approx(1e-3)
    assert np.all(np.diff(lrs[:10]) > 0) and np.all(np.diff(lrs[10:]) <= 0)
    assert lrs[60] == pytest.approx(5e-4) and lrs[110] == pytest.approx(0, abs=1e-12)


def test_a_store_error_inside_a_worker_reaches_the_user_as_itself(store_copy, ray_local, tmp_path):
    """Stimulus images are read by the workers (targets computed there). Shards whose footers are intact (the
    driver's checks pass) but whose data pages are damaged must give the user the StoreError naming the shard,
    not Ray's page of worker tracebacks, and no final checkpoint."""
    from raydecode.data.store import open_store
    from raydecode.errors import StoreError

    store = open_store(store_copy)
    for shard in store.manifest.shards_of("stimuli"):
        path = store.location(shard).path
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(size // 4)
            f.write(b"\0" * (size // 3))
    open_store(store_copy)  # footers still read: the damage is only found where the images are decoded
    cfg = tiny_config(store_copy, tmp_path, "broken", data={"subjects": [1]}, optim={"epochs": 1},
                      scaling={"num_workers": 1})
    with pytest.raises(StoreError, match=r"stimuli/part-\d+\.parquet: unreadable parquet shard") as err:
        run_training(cfg)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
    assert not (tmp_path / "runs" / "broken" / "final").exists()


def test_the_driver_shows_rank_0s_steps_with_rate_epoch_and_test_top1(ray_local):
    """The step bar the driver draws during ``trainer.fit()``: rank 0's posts through the board actor, a worker
    group restarting from a checkpoint (the count goes back to it), and the last counters after fit returns."""
    import io
    import re
    import time

    from raydecode.train.progress import DriverProgress, Poster

    out = io.StringIO()
    with DriverProgress("pretrain", total_steps=20, steps_per_epoch=10, epochs=2, poll_s=0.05, file=out) as bar:
        rank0 = Poster(bar.board, enabled=True, every_s=0.0)
        rank0.begin(0, 0)
        for step in range(1, 13):
            rank0.step(step, step // 10, loss=1.0 / step)
            if step == 10:
                rank0.epoch(10, 1, {"train.loss": 0.5, "retrieval.brain_to_image_top1": 0.25, "epoch": 1})
            time.sleep(0.02)
        def shows(step):  # the board is polled every 50 ms; a busy machine may take longer
            deadline = time.time() + 20
            while bar.bar.n != step and time.time() < deadline:
                time.sleep(0.05)
            return bar.bar.n

        assert shows(12) == 12
        assert "epoch=2/2" in bar.bar.postfix and "top1=0.25" in bar.bar.postfix, bar.bar.postfix  # in epoch 2
        rank0.begin(10, 1)  # the group failed at step 12 and resumed from the epoch-1 checkpoint
        assert shows(10) == 10
        for step in range(11, 21):
            rank0.step(step, 1, loss=0.1)
        rank0.epoch(20, 2, {"train.loss": 0.1, "retrieval.brain_to_image_top1": 0.75})
        Poster(bar.board, enabled=False).step(99, 9, 0.0)  # other ranks post nothing
    text = out.getvalue()
    final = text.split("\r")[-1]
    assert re.search(r"\[pretrain\] train: 100%.*20/20", final), final
    assert "epoch=2/2" in final and "loss=0.1" in final and "top1=0.75" in final, final
    assert "step/s" in final or "s/step" in final, final
