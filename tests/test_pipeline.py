"""Ray Data pipeline on a real local Ray cluster: splits, selections, the per-worker parts Ray Train streams."""

import os

import numpy as np
import pytest

from raydecode.config import DataSelection
from raydecode.data.pipeline import deal_blocks, trials_dataset
from raydecode.data.store import open_store
from raydecode.errors import ConfigError, StoreError


def _collect(ds):
    out = {}
    for batch in ds.iter_batches(batch_size=64):
        for k, v in batch.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def test_train_trials_keeps_each_subjects_first_trials_in_acquisition_order(tiny_store, ray_local):
    """MindLink's new-subject settings (500 / 1,500 / 4,000 samples): the first N train trials of each subject, by
    (session, run, trial), however the files are shuffled."""
    store = open_store(tiny_store)
    every = _collect(trials_dataset(store, "train", DataSelection(subjects=[2, 3], categories=False)).dataset)
    first = _collect(trials_dataset(store, "train", DataSelection(subjects=[2, 3], categories=False,
                                                                  train_trials=40)).dataset)
    for subject in (2, 3):
        mine = every["subject"] == subject
        order = np.lexsort((every["trial"][mine], every["run"][mine], every["session"][mine]))
        expected = sorted(zip(every["session"][mine][order][:40], every["run"][mine][order][:40],
                              every["trial"][mine][order][:40]))
        got = first["subject"] == subject
        assert sorted(zip(first["session"][got], first["run"][got], first["trial"][got])) == expected
    assert len(every["betas"]) > 80 and len(first["betas"]) == 80
    with pytest.raises(ConfigError, match=r"data.train_trials 100000: subject 2 has \d+ train trials"):
        trials_dataset(store, "train", DataSelection(subjects=[2], train_trials=100_000))


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
    # MindEye2's columns keep each repetition (in acquisition order) beside the average
    kept = _collect(trials_dataset(store, "test", DataSelection(subjects=[3], categories=False,
                                                               keep_test_repeats=True)).dataset)
    assert kept["betas_repeats"].shape == (len(kept["image_id"]), 3, rows["betas"].shape[1])
    np.testing.assert_allclose(kept["betas_repeats"].mean(1), kept["betas"], atol=1e-5)
    j = int(np.flatnonzero(kept["image_id"] == i)[0])
    order = np.lexsort((t["trial"].to_numpy(), t["run"].to_numpy(), t["session"].to_numpy()))
    in_order = betas_matrix(t["betas"])[order][t["image_id"].to_numpy()[order] == i]
    np.testing.assert_allclose(kept["betas_repeats"][j], in_order, atol=1e-6)


def test_an_image_seen_fewer_times_repeats_its_own_presentations_as_mindeye2s_reference():
    from raydecode.data.pipeline import _average_repeats

    def group(n):
        return {"betas": np.arange(n, dtype=np.float32)[:, None] * np.ones((n, 2), np.float32),
                "session": np.ones(n, np.int16), "run": np.ones(n, np.int16), "trial": np.arange(n)[::-1].copy(),
                "repetition": np.arange(n)}

    firsts = [_average_repeats(group(n), keep_repeats=True)["betas_repeats"][0, :, 0].tolist() for n in (1, 2, 3)]
    # acquisition order is by trial: the last row came first
    assert firsts == [[0, 0, 0], [1, 0, 1], [2, 1, 0]]
    assert "betas_repeats" not in _average_repeats(group(3))


def test_unknown_subject_and_session_are_refused(tiny_store):
    with pytest.raises(StoreError, match="unknown subject 11"):
        trials_dataset(tiny_store, "train", DataSelection(subjects=[11]))
    with pytest.raises(StoreError, match="session 7 out of range for subject 1"):
        trials_dataset(tiny_store, "train", DataSelection(subjects=[1], sessions=[7]))


def test_streaming_split_gives_each_train_worker_its_own_part(tiny_store, ray_local):
    """What Ray Train does with the train split (DataConfig: `streaming_split(num_workers, equal=True)`, one
    iterator per worker, read side by side): every trial reaches exactly one of the two iterators, in every epoch.
    (The training tests run the real workers on it.)"""
    import threading

    import pyarrow as pa

    td = trials_dataset(tiny_store, "train", DataSelection(subjects=[1, 2], categories=False))
    parts = td.dataset.streaming_split(2, equal=True)
    seen: dict[int, list[list[int]]] = {0: [], 1: []}
    errors = []

    def consume(rank: int) -> None:
        try:
            for _ in range(2):  # two epochs: each re-reads its part
                keys = []
                for batch in parts[rank].iter_batches(batch_size=32):
                    keys += _keys(batch)
                seen[rank].append(keys)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors

    store = open_store(tiny_store)
    cols = ["subject", "image_id", "repetition", "split"]
    t = pa.concat_tables([store.read_shard(s, cols) for s in store.manifest.shards_of("trials", subjects=[1, 2])])
    t = t.filter(pa.compute.equal(t["split"], "train"))
    keys = t["subject"].to_numpy().astype(np.int64) * 100000 + t["image_id"].to_numpy() * 10 + t["repetition"].to_numpy()
    for epoch in (0, 1):
        a, b = seen[0][epoch], seen[1][epoch]
        assert 0 < len(a) < len(keys) and len(a) == len(b)  # each worker a part, equal parts
        assert not set(a) & set(b)  # no trial reached both workers
        assert sorted(a + b) == sorted(keys.tolist())  # every trial reached one


def _actors(class_name: str) -> set[str]:
    import ray._private.state

    return {i for i, a in ray._private.state.actors().items()
            if a.get("ActorClassName") == class_name and a.get("State") != "DEAD"}


def _keys(batch) -> list[int]:
    return (batch["subject"].astype(np.int64) * 100000 + batch["image_id"] * 10 + batch["repetition"]).tolist()


def test_a_materialized_train_split_is_dealt_once_into_equal_fixed_parts(tiny_store, ray_local):
    """The training jobs' DataConfig (``launch._data_config``): a materialized train split becomes one fixed part per
    worker, its blocks dealt in turn, with no SplitCoordinator actor in the loop (``streaming_split`` starts one):
    every trial reaches at most one worker (equal parts drop at most one row), each part holds every subject and
    gives the same rows in the same order every epoch and every run; a dataset not split reaches every worker
    whole."""
    import ray

    from raydecode.train.launch import _data_config

    td = trials_dataset(tiny_store, "train", DataSelection(subjects=[1, 2], categories=False))
    train = td.dataset.materialize()
    assert train.num_blocks() >= 4  # enough blocks for the deal to mix them
    whole = [k for b in train.iter_batches(batch_size=None) for k in _keys(b)]
    before = _actors("SplitCoordinator")
    iterators = _data_config().configure({"train": train, "test": ray.data.range(10)}, 2, None, None)
    seen = [[[k for b in its["train"].iter_batches(batch_size=32) for k in _keys(b)] for _ in range(2)]
            for its in iterators]
    assert _actors("SplitCoordinator") == before
    again = _data_config().configure({"train": train}, 2, None, None)  # a restarted run's workers
    for rank in (0, 1):
        part = seen[rank][0]
        assert part == seen[rank][1]  # the same rows in the same order every epoch
        assert part == [k for b in again[rank]["train"].iter_batches(batch_size=32) for k in _keys(b)]  # every run
        assert {k // 100000 for k in part} == {1, 2}  # both subjects in each part
        assert sum(len(b["id"]) for b in iterators[rank]["test"].iter_batches()) == 10
    a, b = seen[0][0], seen[1][0]
    assert len(a) == len(b) and not set(a) & set(b) and len(whole) - 1 <= len(a) + len(b) <= len(whole)
    # the parts keep the source's context, not the driver's: the jobs' train split has no progress bars (a worker
    # would print one per epoch)
    for quiet in (True, False):
        train.context.enable_progress_bars = not quiet
        assert all(p.context.enable_progress_bars is not quiet for p in deal_blocks(train, 2))


def _footer_readers() -> set[str]:
    import ray._private.state

    return {i for i, a in ray._private.state.actors().items() if a.get("ActorClassName") == "FooterReader"}


def test_shards_are_read_from_the_manifest_in_one_seeded_order(tiny_store, ray_local, tmp_path):
    """ShardSource plans its reads from the manifest alone (no listing, no footer-reading actors, which Ray's
    read_parquet starts again every epoch): the train split's shards come in one order drawn from data.seed, the same
    in every execution, other splits in store order; a shard that went missing is an error naming it."""
    import shutil

    from raydecode.data.source import ShardSource, shard_order

    store = open_store(tiny_store)
    sel = DataSelection(subjects=[1, 2], categories=False)
    before = _footer_readers()
    td = trials_dataset(store, "train", sel)
    td.dataset.context.execution_options.preserve_order = True
    keys = ("subject", "session", "run", "trial")
    epochs = [list(zip(*(b[k].tolist() for k in keys))) for b in (_collect(td.dataset), _collect(td.dataset))]
    assert epochs[0] == epochs[1] and len(epochs[0]) == 300  # the same rows in the same order every epoch
    assert not _footer_readers() - before

    shards = store.manifest.shards_of("trials", subjects=[1, 2])
    order = shard_order(len(shards), sel.seed)
    assert sorted(order) == list(range(len(shards))) and order != sorted(order) and order != shard_order(len(shards), 1)
    first = [(int(sh.subject), int(sh.session)) for sh in (shards[i] for i in order)]
    seen = list(dict.fromkeys((s, se) for s, se, _, _ in epochs[0]))
    assert seen == first  # the seeded order, not the store's
    tds = trials_dataset(store, "test", DataSelection(subjects=[1, 2], categories=False, average_test_repeats=False))
    tds.dataset.context.execution_options.preserve_order = True
    test = _collect(tds.dataset)
    at = {(int(sh.subject), int(sh.session)): n for n, sh in enumerate(shards)}
    positions = [at[k] for k in dict.fromkeys(zip(test["subject"].tolist(), test["session"].tolist()))]
    assert len(positions) > 1 and positions == sorted(positions)  # store order

    copy = tmp_path / "store"
    shutil.copytree(tiny_store, copy)
    moved = open_store(str(copy))
    gone = moved.manifest.shards_of("trials", subjects=[1])[0]
    os.remove(moved.location(gone).path)
    source = ShardSource(moved.root, moved.manifest.shards_of("trials", subjects=[1]), ["subject"])
    assert len(source.get_read_tasks(1)) == len(moved.manifest.shards_of("trials", subjects=[1]))  # planned, not read
    with pytest.raises(Exception, match=f"missing file .*{os.path.basename(gone.path)}"):
        trials_dataset(moved, "train", DataSelection(subjects=[1], categories=False)).dataset.materialize()


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def test_read_concurrency_caps_the_read_tasks_at_once_and_keeps_them_fused(tiny_store, ray_local):
    """data.read_concurrency is Ray Data's ``concurrency`` on the read and on every map fused into it. Fractional-CPU
    read tasks on new worker processes (each starting Python and its stimulus lookup: what a streamed epoch pays when Ray
    has stopped the idle workers beyond one per CPU) run several at once; capped at one, they run one after
    another, still one fused operator, and deliver the same rows."""
    import ray

    def read(cap):  # runs in a Ray task: only what it imports (no helper of this module)
        sel = DataSelection(subjects=[1, 2, 3, 4], images=True, read_cpus=0.05, read_concurrency=cap)
        ds = trials_dataset(open_store(tiny_store), "train", sel).dataset.materialize()
        spans = {}  # (start, end) of each read task, from the exec stats Ray Data keeps with its blocks
        for name, blocks in ds._raw_stats().metadata.items():  # the public ds.stats() prints only totals
            for es in (b.exec_stats for b in blocks if name.startswith("Read")):
                span = spans.setdefault(es.task_idx, [es.start_time_s, es.end_time_s])
                span[0], span[1] = min(span[0], es.start_time_s), max(span[1], es.end_time_s)
        ops = [n for n in ds._raw_stats().metadata if n.startswith("Read")]
        return sorted(tuple(s) for s in spans.values()), ops, ds.to_pandas().to_dict("list")

    rows, most = {}, {}
    for cap in (None, 1):
        # a runtime env of its own: its tasks start on new worker processes, as after Ray stopped the idle ones
        fresh = ray.remote(num_cpus=0)(read).options(runtime_env={"env_vars": {"RAYDECODE_TEST_CAP": str(cap)}})
        spans, ops, got = ray.get(fresh.remote(cap))
        assert len(spans) >= 8 and ops == [  # one task per shard, in the one fused read operator
            "ReadReadStoreShards->Filter(col('split') == 'train')->MapBatches(_decode_betas)->MapBatches(lookup_stimuli)"]
        most[cap] = _most_at_once(spans)
        got = {k: np.stack(v) for k, v in got.items()}
        order = np.lexsort((got["trial"], got["run"], got["session"], got["subject"]))
        rows[cap] = {k: v[order] for k, v in got.items()}
    assert most[1] == 1 and most[None] > 1, most
    assert rows[None].keys() == rows[1].keys() and all(np.array_equal(rows[None][k], rows[1][k]) for k in rows[1])
    with pytest.raises(ValueError, match="read_concurrency"):
        DataSelection(read_concurrency=0)
