"""Adding a method is one file: ``tests/toy_method.py`` (outside the library, nothing else edited) trains on Ray
Train + DeepSpeed, is evaluated by the suite's Ray Data actors and is registered, gated and served through MLflow,
all through the generic paths, found by its ``module:name`` reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import SOURCE_SUBJECTS, metric_history, tiny_config

from raydecode.config import EvaluateConfig
from raydecode.evaluate.suite import run_evaluate
from raydecode.train.launch import run_training

TOY = "tests.toy_method:toy"


@pytest.fixture(scope="module")
def toy_trained(tiny_store, ray_local, tmp_path_factory):
    work = tmp_path_factory.mktemp("toy")
    cfg = tiny_config(tiny_store, work, "toy", method=TOY, data={"subjects": SOURCE_SUBJECTS[:3]},
                      optim={"epochs": 4, "lr": 3e-3}, deepspeed={"zero_stage": 3})
    return cfg, run_training(cfg, stage="pretrain")


def test_a_method_in_one_outside_file_trains_evaluates_and_registers(toy_trained, tiny_store):
    import mlflow

    from raydecode import tracking
    from raydecode.data.store import open_store

    cfg, result = toy_trained
    # ZeRO-3 partitioned the parameters: one model-states file per rank, consolidated into one safetensors file
    files = set(os.listdir(os.path.join(result.artifacts["last_ray_checkpoint"], "state")))
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files
    assert os.path.exists(os.path.join(result.artifacts["checkpoint"], "model.safetensors"))
    loss = metric_history(cfg, result.mlflow_run_id, "train.loss")
    assert [s for s, _ in loss] == [1, 2, 3, 4] and loss[-1][1] < 0.8 * loss[0][1], loss
    chance = result.metrics["retrieval.chance"]
    assert result.metrics["retrieval.brain_to_image_top1"] >= 3 * chance, result.metrics

    ev = run_evaluate(EvaluateConfig(store=tiny_store, workdir=cfg.workdir, model=result.artifacts["checkpoint"],
                                     protocols=["averaged"], cpus_per_actor=0.5,
                                     data={"read_cpus": 0.25}))
    assert ev.metrics["rows"] == 3 * 30
    assert ev.metrics["retrieval.brain_to_image_top1"] >= 3 * ev.metrics["retrieval.chance"], ev.metrics

    store = open_store(tiny_store)
    tracking.configure(cfg)
    decision = tracking.register_run(result.mlflow_run_id, result.artifacts["checkpoint"],
                                     "retrieval.brain_to_image_top1", "retrieval.image_to_brain_top1",
                                     store.test_set_digest(SOURCE_SUBJECTS[:3]), store.manifest_sha256(), s3=cfg.s3)
    assert decision.name == "raydecode-toy-multi" and decision.alias == tracking.CHAMPION
    served = mlflow.pyfunc.load_model(f"models:/{decision.name}@{decision.alias}")
    width = max(store.manifest.subject(s).voxels for s in SOURCE_SUBJECTS[:3])
    betas = np.random.default_rng(0).standard_normal((4, width)).astype(np.float32)
    out = served.predict({"betas": betas, "subject": np.array([1, 1, 2, 3])})
    assert out["brain"].shape == (4, 32)
