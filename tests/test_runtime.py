"""Scheduling on clusters that autoscale: what a stage asks for is checked against the nodes the cluster *can* have
(the autoscaler's node types in the GCS, else the nodes alive now), never against one instant's
`ray.cluster_resources()`. The autoscaler's config is written into the session's real GCS in the format KubeRay's
autoscaler (v2) publishes it (autoscaler_pb2.ClusterConfig under its namespace/key)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import pytest
from conftest import tiny_config

from raydecode.errors import ConfigError
from raydecode.runtime import Demand, cluster_shape, fits, require
from raydecode.train.launch import run_training

CPU = {"CPU": 1.0}
GPU_WORKER = {"CPU": 8.0, "GPU": 1.0}


def test_bundles_are_placed_as_rays_strategies_place_them():
    two_nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    assert fits(Demand("x", [CPU, CPU, CPU]), two_nodes)  # PACK may spill onto the second node
    assert not fits(Demand("x", [CPU] * 3, "STRICT_SPREAD"), two_nodes)  # one bundle per node
    assert not fits(Demand("x", [CPU] * 3, "STRICT_PACK"), two_nodes)  # all on one node
    assert fits(Demand("x", [CPU] * 2, "STRICT_PACK"), two_nodes)
    # the extras (Ray Data's listing task, the lookup actor) need room beside the workers
    assert not fits(Demand("x", [CPU] * 4, extra=[CPU]), two_nodes)
    # a 0-CPU head holds nothing: the GPU workers must come from GPU nodes
    gpu_cluster = [{"CPU": 0.0}] + [{"CPU": 48.0, "GPU": 4.0}] * 2
    assert fits(Demand("x", [GPU_WORKER] * 8, "SPREAD", extra=[CPU, CPU]), gpu_cluster)
    assert not fits(Demand("x", [GPU_WORKER] * 9), gpu_cluster)
    assert not fits(Demand("x", [{"CPU": 0.5, "memory": 2 * 2**30}]), [{"CPU": 2.0, "memory": 2**30}])


@contextmanager
def autoscaler_config(groups: list[tuple[str, dict, int]]):
    """Publish node types as the autoscaler does, for the duration of the block."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in groups:
        group = config.node_group_configs.add(name=name, max_count=max_count)
        group.resources.update(resources)
    ns, key = ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE, ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    _internal_kv_put(key, config.SerializeToString(), namespace=ns)
    try:
        yield
    finally:
        _internal_kv_del(key, namespace=ns)


def test_an_autoscaling_cluster_is_judged_by_its_node_types_not_its_current_nodes(ray_local):
    """The shipped clusters' shape: a 0-CPU head, GPU workers scaling from zero. A GPU training job is accepted at
    once although no GPU is up; one no node type can hold is refused at once, naming the node types."""
    head, gpu = ("head", {"CPU": 0}, 1), ("gpu-a100", {"CPU": 48, "GPU": 4, "memory": 340 * 2**30}, 4)
    said: list[str] = []
    with autoscaler_config([head, gpu]):
        shape = cluster_shape()
        assert shape.autoscaling and shape.total("GPU") == 16 and shape.has("GPU")
        t0 = time.time()
        require(Demand("training", [GPU_WORKER] * 16, extra=[CPU]), 600, say=said.append)
        assert time.time() - t0 < 5 and not said  # no waiting: the autoscaler brings the nodes
        with pytest.raises(ConfigError, match=r"training needs 1 x \{8 GPU, 8 CPU\}: no combination of the "
                                              r"autoscaler's node types 1 x \{nothing\}, 4 x \{4 GPU, 48 CPU, 340 GB\}"):
            require(Demand("training", [{"CPU": 8.0, "GPU": 8.0}]), 600, say=said.append)
    assert not cluster_shape().autoscaling  # back to this machine's single node


def test_a_static_cluster_waits_for_nodes_then_refuses_with_one_line(ray_local, monkeypatch):
    """A cluster without an autoscaler that this process joined: nodes may still join (``ray start``)."""
    from raydecode import runtime

    monkeypatch.setattr(runtime, "started_here", lambda: False)
    said: list[str] = []
    t0 = time.time()
    with pytest.raises(ConfigError) as err:
        require(Demand("embed", [{"CPU": 64.0}], hint="add a node with more CPUs"), 2.0, say=said.append, poll_s=0.5)
    assert 2.0 <= time.time() - t0 < 10
    assert said and said[0].startswith("embed: waiting up to 2 s for nodes: it needs 1 x {64 CPU}")
    msg = str(err.value)
    assert "\n" not in msg and "wait_for_nodes_s" in msg and msg.endswith("add a node with more CPUs")
    assert "the cluster has nodes 1 x {2 CPU" in msg


def test_a_training_job_that_no_node_can_hold_names_the_settings_to_change(ray_local, tiny_store, tmp_path):
    cfg = tiny_config(tiny_store, tmp_path, "too-wide", scaling={"num_workers": 2, "cpus_per_worker": 1.5,
                                                                 "placement_strategy": "STRICT_SPREAD",
                                                                 "wait_for_nodes_s": 1})
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"training needs 2 x \{1\.5 CPU\} \+ 1 x \{1 CPU\}: "
                                          r"the Ray this process started on this machine has nodes 1 x \{2 CPU.*; "
                                          r"lower scaling\.num_workers"):
        run_training(cfg)
    assert time.time() - t0 < 60  # at once: a machine's own Ray never gains nodes
    assert not (tmp_path / "runs" / "too-wide" / "final").exists()


def test_every_stage_s_defaults_fit_a_two_core_laptop():
    """``raydecode evaluate --model M --store S`` with no config waited forever on 2 CPUs (1 CPU predictor + 0.5
    CPU lookup + the averaging shuffle's 1 CPU): each stage's default request now fits one 2-CPU node."""
    from raydecode.config import EvaluateConfig, TrainConfig
    from raydecode.evaluate.suite import evaluate_demand
    from raydecode.runtime import fits
    from raydecode.train.launch import train_demand

    laptop = [{"CPU": 2.0, "memory": 8 * 2**30}]
    for demand in (train_demand(TrainConfig()), train_demand(TrainConfig(), "a sweep trial"),
                   evaluate_demand(EvaluateConfig(model="m"), use_gpu=False),
                   evaluate_demand(EvaluateConfig(model="m", protocols=["single"]), use_gpu=False)):
        assert fits(demand, laptop), (demand.what, demand.describe())


def test_ray_runs_only_with_token_authentication(monkeypatch):
    from raydecode.runtime import require_token_auth

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE=disabled: raydecode runs Ray only with token"):
        require_token_auth()
    monkeypatch.delenv("RAY_AUTH_MODE")
    require_token_auth()  # unset: set explicitly, not left to Ray's default
    assert os.environ["RAY_AUTH_MODE"] == "token"
