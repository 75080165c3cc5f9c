"""MindLink on the tiny store through the generic paths: betas placed on each subject's 3D grid from the store's
voxel tables, one shared patch frame, no subject-specific parameters; it learns (masked-voxel reconstruction falls,
retrieval far above chance) and its size does not depend on the subjects."""

from __future__ import annotations

import pytest
from conftest import SOURCE_SUBJECTS, metric_history, tiny_config

from raydecode.modelinfo.info import model_info
from raydecode.train.launch import run_training


def test_the_parameter_count_does_not_depend_on_subjects_or_voxel_counts():
    counts = {tuple(v): model_info("mindlink", "tiny", voxels=v)["total"]
              for v in ([240], [240, 200, 230, 180], [240, 200, 230, 180, 190, 260, 170, 210], [5000, 90])}
    assert len(set(counts.values())) == 1, counts
    paper = model_info("mindlink", "paper", voxels=[15724, 14278, 15226, 13153])
    assert paper["total"] == model_info("mindlink", "paper", voxels=[15724])["total"]
    assert 100e6 < paper["total"] < 250e6, paper["total"]  # paper: ~159 M


@pytest.fixture(scope="module")
def mindlink_trained(tiny_store, ray_local, tmp_path_factory):
    work = tmp_path_factory.mktemp("mindlink")
    cfg = tiny_config(tiny_store, work, "mindlink", method="mindlink", data={"subjects": SOURCE_SUBJECTS[:3]},
                      optim={"epochs": 10, "lr": 3e-3}, deepspeed={"zero_stage": 2})
    return cfg, run_training(cfg, stage="pretrain")


def test_mindlink_learns_one_model_for_every_subject(mindlink_trained):
    cfg, result = mindlink_trained
    rec = metric_history(cfg, result.mlflow_run_id, "train.rec")
    assert len(rec) == cfg.optim.epochs and rec[-1][1] < 0.9 * rec[0][1], rec
    warm = metric_history(cfg, result.mlflow_run_id, "train.warmup")
    assert warm[0][1] == 1.0 and warm[-1][1] == 0.0  # the first third trains L_rec alone
    chance = result.metrics["retrieval.chance"]
    assert result.metrics["retrieval.brain_to_image_top1"] >= 3 * chance, result.metrics
    from raydecode.checkpoint import load_consolidated

    model = load_consolidated(result.artifacts["checkpoint"]).model  # the volume layout comes back from the config
    assert sorted(model.layout.subjects) == SOURCE_SUBJECTS[:3]
    assert result.metrics["retrieval.image_to_brain_top1"] >= 3 * chance, result.metrics
