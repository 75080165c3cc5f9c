"""Faults injected into real components (Ray Train workers, the MLflow server, moto's S3, the registry, the disk):
what each one costs. Every test adds its row to the matrix printed at the end of the module."""


import pytest
import torch
from conftest import tiny_config

MATRIX: list[tuple[str, str, str]] = []  # (fault, what happened, data lost)


@pytest.fixture(scope="module", autouse=True)
def fault_matrix():
    yield
    if MATRIX:
        width = max(len(f) for f, _, _ in MATRIX)
        lines = [f"{'fault'.ljust(width)}  outcome / data lost"] + [
            f"{f.ljust(width)}  {outcome}; data lost: {lost}" for f, outcome, lost in MATRIX]
        print("\n\nfault matrix\n" + "\n".join(lines))


def _weights(uri: str) -> dict[str, torch.Tensor]:
    from raydecode.checkpoint import load_consolidated

    return load_consolidated(uri).model.state_dict()


@pytest.fixture(scope="module")
def twin_runs(tiny_store, ray_local, tmp_path_factory):
    """The same 2-epoch run twice: uninterrupted, and with rank 1 killed mid-epoch 2, two steps after a mid-epoch
    (``every_steps``) checkpoint, resumed by Ray Train's restart of the worker group."""
    from raydecode.train.launch import run_training

    work = tmp_path_factory.mktemp("twins")
    common = dict(data={"subjects": [1, 2, 3]}, optim={"epochs": 2, "batch_size": 16, "lr": 1e-3},
                  checkpoint={"every_steps": 5, "max_failures": 1})
    whole = run_training(tiny_config(tiny_store, work / "whole", "whole", **common))
    steps = int(whole.metrics["step"]) // 2
    at_step = steps + 7  # epoch 2's checkpoints: steps + 5 and steps + 10 (every 5 steps)
    killed = run_training(tiny_config(tiny_store, work / "killed", "killed", **common, fault_injection={
        "rank": 1, "at_step": at_step, "marker": str(work / "killed.marker"), "delay_s": 1.0}))
    return whole, killed, steps, at_step, work


def test_a_worker_killed_mid_epoch_resumes_to_the_same_weights_as_an_uninterrupted_run(twin_runs):
    """Exact resume: weights, optimizer and scheduler from DeepSpeed's checkpoint, each rank's random state, and a
    data order that is a function of the seeds and the epoch (the resumed epoch skips exactly the 5 batches it had
    trained). Dropping the optimizer state, the schedule or the random state, or reading other rows, moves the
    weights by far more than the tolerance (measured when this test was written: see the issue's note)."""
    whole, killed, steps, at_step, work = twin_runs
    assert (work / "killed.marker").exists()  # the fault happened
    assert killed.metrics["step"] == whole.metrics["step"] == 2 * steps
    a, b = _weights(whole.artifacts["checkpoint"]), _weights(killed.artifacts["checkpoint"])
    assert a.keys() == b.keys()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    scale = max(a[k].float().abs().max().item() for k in a)
    print(f"\nresumed at step {steps + 5} of {2 * steps} (killed at {at_step}): largest weight difference {diff:.2e} "
          f"(largest weight {scale:.2f})")
    assert diff < 1e-5, diff
    assert killed.metrics["retrieval.brain_to_image_top1"] == whole.metrics["retrieval.brain_to_image_top1"]
    MATRIX.append(("worker killed mid-epoch (rank 1, every_steps checkpoint)",
                   f"group restarted from step {steps + 5}, final weights equal to an uninterrupted run's "
                   f"(max |diff| {diff:.1e})", "none"))
