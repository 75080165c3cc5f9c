"""The `embed` stage: frozen image targets written to the store's embeddings/<encoder>/ shards.

One real Ray Data embed of the tiny store (openclip-tiny, vae-tiny, ipadapter-tiny, clip-levels-tiny) through the CLI
stage, shared by the module; the other tests damage private copies of it.
"""

import io
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_main

from raydecode.app import cli
from raydecode.config import DataSelection
from raydecode.data.pipeline import read_split, trials_dataset
from raydecode.data.store import open_store
from raydecode.embed import run_embed
from raydecode.errors import StoreError

# MindEye2's two targets, MindLink's, CLIP-MUSED's (which reads the captions too)
ENCODERS = ("openclip-tiny", "vae-tiny", "ipadapter-tiny", "clip-levels-tiny")


@pytest.fixture(scope="module")
def embedded(tiny_store, ray_local, tmp_path_factory):
    """A copy of the tiny store with the tiny encoders' embeddings, written by `raydecode embed`."""
    root = tmp_path_factory.mktemp("embedded")
    store = str(root / "store")
    shutil.copytree(tiny_store, store)
    summary = str(root / "summary.json")
    args = ["embed", "--store", store, "--summary", summary, "--set", "batch_size=100"]
    for e in ENCODERS:
        args += ["--encoder", e]
    assert cli.main(args) == 0
    return store, json.load(open(summary))


def _stored(store, encoder):
    """image_id -> (tokens, pooled) as float32, from the store's shards."""
    out = {}
    for shard in store.manifest.shards_of("embeddings", encoder=encoder):
        t = store.read_shard(shard)
        tok = np.asarray(t["tokens"].combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
        pool = np.asarray(t["pooled"].combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
        tok, pool = tok.reshape(t.num_rows, -1), pool.reshape(t.num_rows, -1)
        for n, i in enumerate(t["image_id"].to_pylist()):
            out[i] = (tok[n], pool[n])
    return out


def test_embed_writes_the_encoders_outputs(embedded):
    import torch
    from PIL import Image

    from raydecode.nn.encoders import FrozenEncoder, encoder_config

    uri, summary = embedded
    assert summary["status"] == "written"
    assert summary["metrics"]["encoders_written"] == summary["metrics"]["shards_written"] == len(ENCODERS)
    assert summary["metrics"]["images"] == summary["metrics"]["images_encoded"] == 430
    store = open_store(uri)
    m = store.manifest
    stim = store.read_shard(m.shards_of("stimuli")[0])
    images = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in stim["image"].to_pylist()])
    ids = stim["image_id"].to_pylist()
    captions = stim["caption"].to_pylist()
    assert len(set(captions)) > 1
    for name in ENCODERS:
        enc = FrozenEncoder(encoder_config(name))
        info = m.embeddings[name]
        assert info.tokens_shape == enc.tokens_shape and info.pooled_dim == enc.pooled_dim
        assert info.kind == encoder_config(name).kind and info.seed == 0 and info.image_size == 32
        (shard,) = m.shards_of("embeddings", encoder=name)
        assert shard.path == f"embeddings/{name}/part-00000.parquet" and shard.rows == len(ids)
        assert (shard.image_id_min, shard.image_id_max) == (min(ids), max(ids))
        schema = store.read_shard(shard).schema
        assert schema.field("tokens").type == pa.list_(pa.float16(), int(np.prod(enc.tokens_shape)))
        assert schema.field("pooled").type == pa.list_(pa.float16(), enc.pooled_dim)
        tokens, pooled = enc.encode(torch.from_numpy(images), captions)  # captions: read by clip-levels only
        stored = _stored(store, name)
        assert sorted(stored) == sorted(ids)
        got_t = np.stack([stored[i][0] for i in ids]).reshape(len(ids), *enc.tokens_shape)
        got_p = np.stack([stored[i][1] for i in ids])
        np.testing.assert_allclose(got_t, tokens.numpy(), rtol=2e-3, atol=2e-3)  # float16 storage
        np.testing.assert_allclose(got_p, pooled.numpy(), rtol=2e-3, atol=2e-3)
        assert np.abs(got_t).max() > 0.1  # not trivially zero
    assert store.verify() == []


def test_second_run_writes_nothing(embedded):
    uri, _ = embedded
    manifest = os.path.join(uri, "manifest.json")
    before = (os.stat(manifest).st_mtime_ns, open(manifest, "rb").read())
    res = run_embed(uri, list(ENCODERS), progress=False)
    assert res.status == "unchanged" and res.written == [] and res.skipped == list(ENCODERS)
    assert res.shards_written == 0 and res.images_encoded == 0
    assert (os.stat(manifest).st_mtime_ns, open(manifest, "rb").read()) == before
    # the same name made differently is refused, naming the encoder and the store
    with pytest.raises(StoreError, match=rf"store {uri} already holds embeddings 'vae-tiny'.*seed=0.*seed=1"):
        run_embed(uri, [{"name": "vae-tiny", "kind": "vae", "arch": "tiny", "image_size": 32, "seed": 1}], progress=False)
    assert open(manifest, "rb").read() == before[1]


def test_readers_deliver_the_stored_embeddings(embedded, ray_local):
    uri, _ = embedded
    store = open_store(uri)
    stored = _stored(store, "openclip-tiny")
    sel = DataSelection(subjects=[1, 4], embeddings=["openclip-tiny"])
    col = "tokens.openclip-tiny"
    mem = read_split(store, "test", sel)
    # as stored (float16): a batch is cast to the model's dtype on its device, so the data path carries half the bytes
    assert mem[col].shape == (len(mem["image_id"]), 16 * 32) and mem[col].dtype == np.float16
    assert mem["pooled.openclip-tiny"].shape == (len(mem["image_id"]), 32)
    for i, row in zip(mem["image_id"], mem[col]):
        np.testing.assert_array_equal(row, stored[int(i)][0])
    assert len(mem["image_id"]) == 2 * len(store.manifest.shared_test_image_ids)
    # through Ray Data (train split: no repetition averaging, so no shuffle of the dataset)
    td = trials_dataset(store, "train", DataSelection(subjects=[2], sessions=[1], shuffle=False,
                                                      embeddings=["openclip-tiny", "vae-tiny"]))
    vae = _stored(store, "vae-tiny")
    n = 0
    for batch in td.dataset.iter_batches(batch_size=64):
        assert batch[col].shape[1:] == (16 * 32,) and batch["tokens.vae-tiny"].shape[1:] == (4 * 8 * 8,)
        for i, t, p in zip(batch["image_id"], batch[col], batch["pooled.vae-tiny"]):
            np.testing.assert_array_equal(t, stored[int(i)][0])
            np.testing.assert_array_equal(p, vae[int(i)][1])
            n += 1
    assert n == sum((store.read_shard(s, ["split"])["split"].to_numpy(zero_copy_only=False) == "train").sum()
                    for s in store.manifest.shards_of("trials", subjects=[2], sessions=[1]))
    with pytest.raises(StoreError, match="no embeddings for encoder 'vae-demo'.*raydecode embed"):
        read_split(store, "test", DataSelection(subjects=[1], embeddings=["vae-demo"]))


def test_unknown_encoder_is_one_line_error(store_copy):
    manifest = os.path.join(store_copy, "manifest.json")
    before = open(manifest, "rb").read()
    r = run_main("embed", "--store", store_copy, "--encoder", "openclip-tiny", "--encoder", "no-such-encoder")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: encoder 'no-such-encoder'") and "openclip-tiny" in lines[0]
    assert open(manifest, "rb").read() == before
    assert not os.path.exists(os.path.join(store_copy, "embeddings"))


def test_damaged_embeddings_are_reported(embedded, tmp_path):
    uri, _ = embedded
    store_dir = str(tmp_path / "store")
    shutil.copytree(uri, store_dir)
    clip = "embeddings/openclip-tiny/part-00000.parquet"
    vae = "embeddings/vae-tiny/part-00000.parquet"
    full = os.path.join(store_dir, clip)
    data = open(full, "rb").read()
    open(full, "wb").write(data[: len(data) // 2])
    t = pq.read_table(os.path.join(store_dir, vae))
    pooled = np.asarray(t["pooled"].combine_chunks().flatten().to_numpy(zero_copy_only=False)).reshape(t.num_rows, -1)
    pooled = pooled[:, :-1].copy()
    pooled[2, 3] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(pooled.ravel(), pa.float16()), pooled.shape[1])
    pq.write_table(t.set_column(t.schema.get_field_index("pooled"), "pooled", col), os.path.join(store_dir, vae))
    problems = [str(p) for p in open_store(store_dir).verify()]
    assert any(clip in p and "truncated" in p for p in problems)
    assert any(vae in p and "'pooled' has 127 values per image, expected 128" in p for p in problems)
    r = run_main("info", store_dir, "--verify")
    assert r.returncode != 0 and clip in r.stdout and vae in r.stdout
    # readers refuse them before any training
    with pytest.raises(StoreError, match=clip):
        read_split(store_dir, "test", DataSelection(subjects=[1], embeddings=["openclip-tiny"]))
    with pytest.raises(StoreError, match="'pooled' has 127 values per image"):
        read_split(store_dir, "test", DataSelection(subjects=[1], embeddings=["vae-tiny"]))


def test_interrupted_embed_is_invisible_then_completed(embedded, store_copy):
    """Shards an interrupted embed finished (no manifest entry yet) are not visible to readers, are
    reported by verify, and the next run keeps them (no encoding) and writes the manifest."""
    uri, _ = embedded
    shutil.copytree(os.path.join(uri, "embeddings"), os.path.join(store_copy, "embeddings"))
    store = open_store(store_copy)
    assert store.manifest.embeddings == {}
    with pytest.raises(StoreError, match="no embeddings for encoder 'openclip-tiny'"):
        read_split(store, "test", DataSelection(subjects=[1], embeddings=["openclip-tiny"]))
    assert any("not listed in the manifest" in str(p) for p in store.verify())
    res = run_embed(store_copy, list(ENCODERS), progress=False)
    assert res.status == "completed" and res.shards_kept == len(ENCODERS) and res.shards_written == res.images_encoded == 0
    done = open_store(store_copy)
    assert done.manifest.embeddings == open_store(uri).manifest.embeddings
    assert done.verify() == []
