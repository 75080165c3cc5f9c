"""``data.local_cache``: the stimulus lookup's node-local, memory-mapped copies of decoded images and stored embeddings
(``raydecode.data.shardcache``). They must give exactly the rows the plain lookup gives, be built once per node
(whichever process comes first; the others wait and map its files), be rebuilt when cut short, and serve later
processes without decoding the shards again."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from raydecode.config import DataSelection
from raydecode.data.ingest import run_ingest, synthetic_plan
from raydecode.data.pipeline import StimulusLookup, embedding_column
from raydecode.data.schema import EncoderInfo
from raydecode.data.shardcache import ShardCache
from raydecode.data.store import StoreWriter, open_store
from raydecode.data.synthetic import PRESETS
from raydecode.embed import _embeddings_table, shard_path
from raydecode.errors import StorageError, StoreError
from raydecode.nn.targets import BatchPreparer

ENCODER = "fake-tokens"


def _with_embeddings(uri: str) -> None:
    """Embedding shards of a made-up encoder (4 x 8 float16 tokens, 6 pooled) for every stimulus shard."""
    store = open_store(uri)
    info = EncoderInfo(name=ENCODER, tokens_shape=(4, 8), pooled_dim=6, kind="openclip", arch="test", seed=0)
    writer = StoreWriter.extending(store)
    rng = np.random.default_rng(0)
    for sh in store.manifest.shards_of("stimuli"):
        ids = store.read_shard(sh, ["image_id"])["image_id"].to_numpy()
        writer.write_shard(shard_path(ENCODER, sh), "embeddings",
                           _embeddings_table(ids, rng.standard_normal((len(ids), 4, 8)),
                                             rng.standard_normal((len(ids), 6)), info),
                           encoder_info=info, encoder=ENCODER, image_id_min=sh.image_id_min,
                           image_id_max=sh.image_id_max)
    writer.commit(embeddings={ENCODER: info})


@pytest.fixture
def store_with_embeddings(store_copy) -> str:
    _with_embeddings(store_copy)
    return store_copy


def _ids(uri: str) -> np.ndarray:
    store = open_store(uri)
    ids = np.concatenate([store.read_shard(s, ["image_id"])["image_id"].to_numpy()
                          for s in store.manifest.shards_of("stimuli")])
    return np.random.default_rng(1).choice(ids, 64)  # a random order, with repeats, as trials come


def test_the_cached_lookup_gives_the_same_rows_and_later_processes_decode_nothing(store_with_embeddings, tmp_path,
                                                                                   monkeypatch):
    uri, cache = store_with_embeddings, str(tmp_path / "cache")
    ids = _ids(uri)
    plain = StimulusLookup(uri, None, True, [ENCODER], 1)({"image_id": ids.copy()})
    cached = StimulusLookup(uri, None, True, [ENCODER], 1, cache)({"image_id": ids.copy()})
    assert set(cached) == set(plain) >= {"image", "categories", embedding_column(ENCODER, "tokens")}
    for key, value in plain.items():
        np.testing.assert_array_equal(cached[key], value, err_msg=key)
    assert cached[embedding_column(ENCODER, "tokens")].dtype == np.float16  # as stored: cast on the device

    store = open_store(uri)
    for sh in store.manifest.shards_of("stimuli"):
        assert np.load(os.path.join(cache, sh.sha256, "image.npy"), mmap_mode="r").shape[0] == sh.rows
    # a later process on the node: no image is decoded and the embedding shards are not read at all
    import PIL.Image

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded an image the cache holds")

    monkeypatch.setattr(PIL.Image, "open", no_decode)
    for sh in store.manifest.shards_of("embeddings"):
        os.remove(store.location(sh).path)
    again = StimulusLookup(uri, None, True, [ENCODER], 1, cache)({"image_id": ids.copy()})
    for key, value in plain.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)
    with pytest.raises(StorageError, match="missing file"):  # the plain lookup needs the shard just removed
        StimulusLookup(uri, None, False, [ENCODER], 1)({"image_id": ids.copy()})


def test_a_batch_in_random_order_decodes_each_of_its_shards_once_and_gives_every_image_its_own_row(tmp_path,
                                                                                                   monkeypatch):
    # one subject of the tiny preset, 10 images a stimulus shard: 8 shards, 4x the LRU of 2 below
    monkeypatch.setitem(PRESETS, "tiny-shards", PRESETS["tiny"].model_copy(update={
        "name": "tiny-shards", "voxels": PRESETS["tiny"].voxels[:1], "sessions": (1,), "images_per_shard": 10}))
    uri = str(tmp_path / "store")
    run_ingest(synthetic_plan("tiny-shards", 0, timeseries=False), uri, progress=False)
    _with_embeddings(uri)
    store = open_store(uri)
    stimuli = store.manifest.shards_of("stimuli")
    assert len(stimuli) > 4
    expected = {}  # every image's categories and tokens, read shard by shard
    for sh in stimuli:
        t = store.read_shard(sh, ["image_id", "categories"])
        cats = np.asarray(t["categories"].combine_chunks().flatten()).reshape(t.num_rows, -1)
        expected.update({i: [c] for i, c in zip(t["image_id"].to_pylist(), cats)})
    for sh in store.manifest.shards_of("embeddings"):
        t = store.read_shard(sh, ["image_id", "tokens"])
        tokens = t["tokens"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, -1)
        for i, tok in zip(t["image_id"].to_pylist(), tokens):
            expected[i].append(tok)
    ids = np.random.default_rng(2).choice(sorted(expected), 200)  # a random trial order over every shard

    lookup = StimulusLookup(uri, None, False, [ENCODER], 2)
    reads = []
    read_shard = lookup.store.read_shard
    monkeypatch.setattr(lookup.store, "read_shard", lambda sh, *a, **k: reads.append(sh.path) or read_shard(sh, *a, **k))
    out = lookup({"image_id": ids.copy()})
    touched = {sh.path for sh in stimuli if ((ids >= sh.image_id_min) & (ids <= sh.image_id_max)).any()}
    # each stimulus shard the batch falls in read once, and its embedding shard once (the row-by-row walk through
    # an LRU of 2 read one every row or two)
    assert len(touched) > 4 and touched <= set(reads) and len(reads) == len(set(reads)) == 2 * len(touched)
    np.testing.assert_array_equal(out["categories"], np.stack([expected[i][0] for i in ids.tolist()]))
    np.testing.assert_array_equal(out[embedding_column(ENCODER, "tokens")],
                                  np.stack([expected[i][1] for i in ids.tolist()]))
    with pytest.raises(StoreError, match=f"image {10**6} is missing from the stimuli of store"):
        lookup({"image_id": np.array([ids[0], 10**6])})


def test_a_copy_cut_short_is_built_again(store_with_embeddings, tmp_path):
    uri, cache = store_with_embeddings, str(tmp_path / "cache")
    ids = _ids(uri)
    first = StimulusLookup(uri, None, False, [ENCODER], 1, cache)({"image_id": ids.copy()})
    (sh,) = open_store(uri).manifest.shards_of("embeddings")
    path = os.path.join(cache, sh.sha256, "tokens.npy")
    np.save(path, np.zeros((3, 32), np.float16))  # an interrupted copy: too few rows
    again = StimulusLookup(uri, None, False, [ENCODER], 1, cache)({"image_id": ids.copy()})
    np.testing.assert_array_equal(again[embedding_column(ENCODER, "tokens")], first[embedding_column(ENCODER, "tokens")])
    assert np.load(path, mmap_mode="r").shape == (sh.rows, 32)


def _build_in_process(root: str, sha: str, log: str) -> None:
    from raydecode.data.schema import ShardInfo

    shard = ShardInfo(path="x.parquet", kind="embeddings", rows=5, bytes=1, sha256=sha)

    def build():
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # the other process arrives while this one decodes
        return {"tokens": np.arange(10, dtype=np.float16).reshape(5, 2)}

    out = ShardCache(root).columns(shard, ("tokens",), build)
    assert out["tokens"].shape == (5, 2) and float(out["tokens"][4, 1]) == 9.0


def test_a_shard_is_decoded_once_per_node_whichever_process_asks_first(tmp_path):
    log = str(tmp_path / "builds.log")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path / "cache"), "ab" * 32, log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(open(log).read().split()) == 1  # one decode; the others waited on the lock and mapped its file


def test_the_train_loops_augmented_views_read_images_through_the_cache(store_copy, tmp_path):
    cache = str(tmp_path / "cache")
    prep = BatchPreparer({"cnx": {"encoder": "convnext-tiny", "source": "compute"}}, torch.device("cpu"),
                         torch.float32, store_copy, None, local_cache=cache)
    ids = torch.from_numpy(_ids(store_copy)[:8].astype(np.int64))
    batch = prep({"image_id": ids, "betas": torch.zeros(8, 3)})
    assert batch["cnx_aug_tokens"].shape[0] == 8 and batch["cnx_aug_tokens"].dtype == torch.float32
    (sh,) = open_store(store_copy).manifest.shards_of("stimuli")
    assert os.path.exists(os.path.join(cache, sh.sha256, "image.npy"))


def test_local_cache_must_be_an_absolute_path():
    with pytest.raises(ValidationError, match="'work/cache' is relative: give an absolute directory"):
        DataSelection(local_cache="work/cache")
    assert DataSelection(local_cache="~/cache").local_cache == os.path.expanduser("~/cache")
