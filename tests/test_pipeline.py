"""Ray Data pipeline on a real local Ray cluster, feeding real Ray Train workers."""

import json

import numpy as np
import pytest

from raydecode.data.pipeline import DataSelection, trials_dataset
from raydecode.data.store import open_store
from raydecode.errors import StoreError
from raydecode.storage import train_storage


def _collect(ds):
    out = {}
    for batch in ds.iter_batches(batch_size=64):
        for k, v in batch.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def test_train_split_first_session_with_images(tiny_store, ray_local):
    store = open_store(tiny_store)
    m = store.manifest
    td = trials_dataset(store, "train", DataSelection(subjects=[2, 6], sessions=[1], images=True))
    rows = _collect(td.dataset)
    expected = sum(
        (store.read_shard(s, ["split"])["split"].to_numpy(zero_copy_only=False) == "train").sum()
        for s in m.shards_of("trials", subjects=[2, 6], sessions=[1])
    )
    assert len(rows["betas"]) == expected
    assert set(rows["session"]) == {1} and set(rows["split"]) == {"train"} and set(rows["subject"]) == {2, 6}
    # betas zero-padded to the widest subject; n_voxels says how many are real
    assert rows["betas"].dtype == np.float32 and rows["betas"].shape[1] == td.width == m.subject(6).voxels
    s2 = rows["subject"] == 2
    assert (rows["n_voxels"][s2] == m.subject(2).voxels).all()
    assert np.abs(rows["betas"][s2][:, m.subject(2).voxels:]).max() == 0
    assert np.abs(rows["betas"][s2][:, : m.subject(2).voxels]).max() > 0
    # images and categories joined by image id, and they are the right ones
    assert rows["image"].shape[1:] == (32, 32, 3) and rows["image"].dtype == np.uint8
    stim = store.read_shard(m.shards_of("stimuli")[0])
    cats = dict(zip(stim["image_id"].to_pylist(), stim["categories"].to_pylist()))
    for i in range(0, len(rows["image_id"]), 17):
        assert list(rows["categories"][i]) == cats[int(rows["image_id"][i])]


def test_test_split_averages_repetitions(tiny_store, ray_local):
    store = open_store(tiny_store)
    td = trials_dataset(store, "test", DataSelection(subjects=[3], categories=False))
    rows = _collect(td.dataset)
    assert len(rows["image_id"]) == len(store.manifest.shared_test_image_ids)
    assert (rows["repetition"] == 3).all()
    # the average equals the mean of the three single trials
    import pyarrow as pa

    from raydecode.data.pipeline import betas_matrix

    t = pa.concat_tables([store.read_shard(s) for s in store.manifest.shards_of("trials", subjects=[3])])
    i = int(rows["image_id"][0])
    single = betas_matrix(t["betas"])[t["image_id"].to_numpy() == i]
    assert len(single) == 3
    np.testing.assert_allclose(rows["betas"][0], single.mean(0), atol=1e-3)


def test_unknown_subject_and_session_are_refused(tiny_store):
    with pytest.raises(StoreError, match="unknown subject 11"):
        trials_dataset(tiny_store, "train", DataSelection(subjects=[11]))
    with pytest.raises(StoreError, match="session 7 out of range for subject 1"):
        trials_dataset(tiny_store, "train", DataSelection(subjects=[1], sessions=[7]))


def test_streaming_split_feeds_ray_train_workers(tiny_store, ray_local, tmp_path):
    """Two Ray Train workers each stream their own part of the train split (streaming_split): every
    trial reaches exactly one worker, in every epoch."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    td = trials_dataset(tiny_store, "train", DataSelection(subjects=[1, 2], categories=False))

    def loop(config):
        shard = ray.train.get_dataset_shard("train")
        orders = []
        ids = []
        for _ in range(2):
            seen = []
            for batch in shard.iter_batches(batch_size=32):
                key = batch["subject"].astype(np.int64) * 100000 + batch["image_id"] * 10 + batch["repetition"]
                seen += key.tolist()
            orders.append(seen)
        ids = torch.tensor(sorted(orders[0]), dtype=torch.float64)
        n = torch.tensor([len(orders[0]), len(orders[1]), len(set(orders[0]))], dtype=torch.float64)
        dist.all_reduce(n)
        key_sum = ids.sum().reshape(1)
        dist.all_reduce(key_sum)
        if ray.train.get_context().get_world_rank() == 0:
            with open(config["out"], "w") as f:
                json.dump({"n_epoch0": n[0].item(), "n_epoch1": n[1].item(), "n_unique": n[2].item(),
                           "key_sum": key_sum.item(), "rank_rows": len(orders[0])}, f)

    out = str(tmp_path / "counts.json")
    storage_path, storage_fs = train_storage(str(tmp_path / "runs"))
    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": out},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}),
        datasets={"train": td.dataset},
        run_config=RunConfig(storage_path=storage_path, storage_filesystem=storage_fs, name="split"),
    )
    trainer.fit()
    metrics = json.load(open(out))
    store = open_store(tiny_store)
    import pyarrow as pa

    cols = ["subject", "image_id", "repetition", "split"]
    t = pa.concat_tables([store.read_shard(s, cols) for s in store.manifest.shards_of("trials", subjects=[1, 2])])
    t = t.filter(pa.compute.equal(t["split"], "train"))
    keys = t["subject"].to_numpy().astype(np.int64) * 100000 + t["image_id"].to_numpy() * 10 + t["repetition"].to_numpy()
    assert metrics["n_epoch0"] == metrics["n_epoch1"] == len(keys)
    assert metrics["n_unique"] == len(keys)  # no trial reached both workers
    assert metrics["key_sum"] == float(keys.sum())
    assert 0 < metrics["rank_rows"] < len(keys)  # rank 0 got a part, not all
