"""The memory planner (`raydecode model-info --memory`): model states as DeepSpeed's own estimators count them, and
activations measured as the peak bytes alive in a step, a parabola in the batch size."""

from __future__ import annotations

import pytest
import torch
from conftest import run_main

from raydecode.errors import ConfigError
from raydecode.methods.spec import get_method
from raydecode.modelinfo.info import dataset_info
from raydecode.modelinfo.memory import (
    LiveBytes,
    build_for_measurement,
    measure_activations,
    memory_plan,
    model_states_bytes,
    resident_encoders,
    step_peak_bytes,
)


@pytest.mark.parametrize("gpus", [1, 8, 64])
def test_model_states_match_deepspeeds_estimators_for_a_fully_trainable_model(gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = 2_588_627_300, 1_745_256_448 // 256  # MindEye2 (paper): its parameters, one token head
    _, zero2 = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, cpu_offload=False)
    assert model_states_bytes(total, total, 2, gpus, "bf16", largest) == pytest.approx(zero2, rel=1e-6)
    assert model_states_bytes(total, total, 3, gpus, "bf16", largest) == pytest.approx(zero3, rel=1e-6)
    # each stage partitions more; frozen weights (Dynadiff's UNet, Duala's base) cost only their 16-bit copy
    stages = [model_states_bytes(total, total, z, gpus, "bf16", largest) for z in range(4)]
    assert stages[0] >= stages[1] >= stages[2] and (gpus == 1 or stages[2] > stages[3])
    assert model_states_bytes(total, 0, 0, gpus) == 2 * total


def test_live_bytes_counts_transients_once_per_storage_and_frees_them():
    """y = 2x is alive until the sum consumes it, and autograd saves nothing for backward: the peak is y's 4000 bytes
    and the sum's 4 (x, an input, skipped; a view of y is y's storage); in backward y is gone, and the seed gradient
    (4) and x's gradient (4000) join the sum: 4008, or 4004 with x's gradient left out by its number."""
    x = torch.randn(1000, requires_grad=True)
    saved = []
    with LiveBytes({x.untyped_storage().data_ptr()}) as live:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = x * 2.0
            view = y[:10]
            s = y.sum()
        del y, view
        s.backward()
    assert saved == []
    assert live.peak() == 4008
    assert live.peak({live.number(x.grad)}) == 4004
    assert live.number(x) is None and live.number(s) is not None


def test_activations_are_measured_as_a_parabola_in_the_batch():
    """The peak bytes of a step grow with B (features) and B^2 (soft_cont_loss's (B x 16)^2 similarities): three
    batch sizes give both terms and predict the peak at a batch 8x larger, where a line through two small batches
    falls short (demo preset)."""
    spec = get_method("mindeye2")
    mcfg, info = spec.config("demo"), dataset_info("demo")
    model, trainable = build_for_measurement(spec, mcfg, info)
    assert trainable and all(p.requires_grad for p in trainable) and not any(p.is_meta for p in model.parameters())
    act = measure_activations(spec, mcfg, info, model)
    assert act.per_sample > 0 and act.per_pair > 0
    line = measure_activations(spec, mcfg, info, model, (2, 4))
    counted = step_peak_bytes(spec, mcfg, info, model, 32)
    assert act.at(32, "fp32") == pytest.approx(counted, rel=1e-3)
    assert line.at(32, "fp32") < 0.9 * counted
    assert act.at(64, "bf16") == pytest.approx(act.at(64, "fp32") / 2)
    room = act.at(100, "bf16") - act.at(0, "bf16")
    assert act.max_batch(room) == 100 and act.max_batch(room - 1) == 99
    with pytest.raises(ConfigError, match=r"2 or 3 distinct batch sizes, not \(2, 2\)"):
        measure_activations(spec, mcfg, info, model, (2, 2))


def test_the_plan_picks_the_smallest_zero_stage_that_fits_and_the_cli_prints_it():
    plan = memory_plan("dynadiff", "tiny", gpus=2, gpu_sizes_gb=(24,))
    assert plan["trainable"] < plan["params"]  # the frozen UNet
    batches = [r["max_batch"][24] for r in plan["zero"]]
    assert all(b and b > 0 for b in batches) and batches == sorted(batches)  # more partitioning, more room
    out = run_main("model-info", "--method", "dynadiff", "--preset", "tiny", "--memory", "--gpus", "2", "--gpu-gb",
                   "24", "--batch", "16")
    assert out.returncode == 0, out.stderr
    assert "ZeRO-3" in out.stdout and "at optim.batch_size 16: 24 GB: deepspeed.zero_stage 0" in out.stdout


def test_the_plan_counts_the_frozen_encoder_every_worker_runs():
    """MindEye2's ConvNeXt target runs in every worker (a fresh augmented view each step): its weights leave less
    room for the batch. At paper size it is the reference's ConvNeXt-XL (~350 M parameters: about 1.4 GB fp32)."""
    plan = memory_plan("mindeye2", "tiny", gpus=2, gpu_sizes_gb=(24,))
    assert set(plan["frozen_encoders_gb"]) == {"convnext-tiny"}
    without = memory_plan("mindeye2", "tiny", overrides={"lowlevel": False}, gpus=2, gpu_sizes_gb=(24,))
    assert without["frozen_encoders_gb"] == {}
    paper = resident_encoders(get_method("mindeye2"), get_method("mindeye2").config("paper"))
    assert 1.3e9 < paper["convnext-xl-mindeye2"] < 1.5e9
