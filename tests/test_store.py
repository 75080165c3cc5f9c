"""The store contract: round trip, determinism, idempotency, interrupted ingest, bad inputs."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_main

from raydecode.data.ingest import run_ingest, synthetic_plan
from raydecode.data.pipeline import betas_matrix
from raydecode.data.schema import SCHEMA_VERSION
from raydecode.data.store import StoreWriter, open_store
from raydecode.errors import StoreError
from raydecode.storage import resolve


def _checksums(uri):
    return {s.path: s.sha256 for s in open_store(uri).manifest.shards}


def test_round_trip_local(tiny_store):
    store = open_store(tiny_store)
    m = store.manifest
    assert m.schema_version == SCHEMA_VERSION and m.source == "synthetic"
    assert m.subject_ids == list(range(1, 9))
    assert len({s.voxels for s in m.subjects}) == 8  # every subject has its own voxel count
    assert store.verify() == []
    # a trials shard reads back with the subject's width and the manifest's row count
    shard = m.shards_of("trials", subjects=[3], sessions=[1])[0]
    t = store.read_shard(shard)
    assert t.num_rows == shard.rows and betas_matrix(t["betas"]).shape == (shard.rows, m.subject(3).voxels)
    # the voxel table rebuilds a volume: unique (i, j, k) inside the grid, one per beta position
    vt = store.voxel_table(3)
    ijk = np.stack([vt[c].to_numpy() for c in "ijk"], 1)
    assert len(vt) == m.subject(3).voxels and len(np.unique(ijk, axis=0)) == len(vt)
    assert (ijk < np.array(m.subject(3).grid_shape)).all()
    assert vt.schema.metadata[b"grid_shape"] == ",".join(map(str, m.subject(3).grid_shape)).encode()
    volume = np.zeros(m.subject(3).grid_shape, bool)
    volume[ijk[:, 0], ijk[:, 1], ijk[:, 2]] = True
    assert volume.sum() == len(vt)
    assert {"V1", "V2", "V3", "hV4"} <= set(vt["roi"].to_pylist())
    # trials per split in the manifest match the shards
    train = sum((store.read_shard(s, ["split"])["split"].to_numpy(zero_copy_only=False) == "train").sum()
                for s in m.shards_of("trials", subjects=[3]))
    assert train == m.subject(3).trials["train"]


def test_deterministic_for_a_seed(tiny_store, tmp_path):
    run_ingest(synthetic_plan("tiny", 0), str(tmp_path / "again"), progress=False)
    assert _checksums(str(tmp_path / "again")) == _checksums(tiny_store)
    run_ingest(synthetic_plan("tiny", 1, subjects=[1]), str(tmp_path / "seed1"), progress=False)
    other = _checksums(str(tmp_path / "seed1"))
    path = "trials/subject=01/part-00001.parquet"
    assert other[path] != _checksums(tiny_store)[path]


def test_rerun_over_complete_store_is_a_noop(store_copy):
    manifest = os.path.join(store_copy, "manifest.json")
    before = os.stat(manifest).st_mtime_ns
    res = run_ingest(synthetic_plan("tiny", 0), store_copy, progress=False)
    assert res.status == "unchanged" and res.written == 0
    assert os.stat(manifest).st_mtime_ns == before


def test_refuses_to_overwrite_a_different_store(store_copy):
    with pytest.raises(StoreError, match="refusing to overwrite"):
        run_ingest(synthetic_plan("tiny", 5), store_copy, progress=False)


def test_interrupted_ingest_is_detected_and_completed(tiny_store, tmp_path, monkeypatch):
    from raydecode.data import ingest

    out = str(tmp_path / "interrupted")
    real_write = ingest.write_shard
    calls = {"n": 0}

    def crash_after_ten(*a, **kw):
        calls["n"] += 1
        if calls["n"] > 10:
            raise KeyboardInterrupt("simulated crash")
        return real_write(*a, **kw)

    monkeypatch.setattr(ingest, "write_shard", crash_after_ten)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(synthetic_plan("tiny", 0), out, progress=False)
    monkeypatch.setattr(ingest, "write_shard", real_write)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with pytest.raises(StoreError, match="incomplete store"):
        open_store(out)
    r = run_main("info", out)
    assert r.returncode != 0 and "incomplete store" in r.stderr
    res = run_ingest(synthetic_plan("tiny", 0), out, progress=False)
    assert res.status == "completed" and res.skipped == 10 and res.written == len(synthetic_plan("tiny", 0).shards) - 10
    assert _checksums(out) == _checksums(tiny_store)
    assert open_store(out).verify() == []


# -- bad inputs: each a clear error naming the file or field, non-zero exit, nothing half-written --


def _rewrite(store_uri, path, table):
    pq.write_table(table, os.path.join(store_uri, path))


def _with_betas(table, betas):
    col = pa.FixedSizeListArray.from_arrays(pa.array(betas.astype(np.float16).ravel(), pa.float16()), betas.shape[1])
    return table.set_column(table.schema.get_field_index("betas"), "betas", col)


def _verify_cli(uri):
    r = run_main("info", uri, "--verify")
    assert r.returncode != 0
    return r.stdout + r.stderr


def test_truncated_shard(store_copy):
    path = "trials/subject=02/part-00001.parquet"
    full = os.path.join(store_copy, path)
    data = open(full, "rb").read()
    open(full, "wb").write(data[: len(data) // 2])
    out = _verify_cli(store_copy)
    assert path in out and "truncated" in out
    with pytest.raises(StoreError, match=path.replace("=", "=")):
        open_store(store_copy)  # readers check shard footers before any training


def test_wrong_voxel_count(store_copy, tiny_store):
    path = "trials/subject=02/part-00001.parquet"
    t = pq.read_table(os.path.join(store_copy, path))
    bad = _with_betas(t, betas_matrix(t["betas"])[:, :-5])
    _rewrite(store_copy, path, bad)
    out = _verify_cli(store_copy)
    assert path in out and "'betas' has 195 values per trial, expected 200" in out
    # the writer refuses such a table before anything reaches the store
    w = StoreWriter(resolve(str(store_copy) + "-new"), "synthetic", {})
    with pytest.raises(StoreError, match="expected 200"):
        w.write_shard(path, "trials", bad, subject_info=open_store(tiny_store).manifest.subject(2), session=1, subject=2)
    assert not os.path.exists(str(store_copy) + "-new")


def test_nan_and_inf_betas(store_copy, tiny_store):
    path = "trials/subject=04/part-00002.parquet"
    t = pq.read_table(os.path.join(store_copy, path))
    b = betas_matrix(t["betas"]).astype(np.float16)
    b[3, 7] = np.nan
    b[5, 1] = np.inf
    bad = _with_betas(t, b)
    _rewrite(store_copy, path, bad)
    out = _verify_cli(store_copy)
    assert path in out and "2 NaN/Inf" in out
    w = StoreWriter(resolve(str(store_copy) + "-new"), "synthetic", {})
    with pytest.raises(StoreError, match="NaN/Inf"):
        w.write_shard(path, "trials", bad, subject_info=open_store(tiny_store).manifest.subject(4), session=2, subject=4)


def test_trials_pointing_at_missing_stimuli(store_copy, tiny_store):
    path = "trials/subject=01/part-00001.parquet"
    t = pq.read_table(os.path.join(store_copy, path))
    ids = t["image_id"].to_numpy().copy()
    ids[0] = 999_999
    bad = t.set_column(t.schema.get_field_index("image_id"), "image_id", pa.array(ids, pa.int32()))
    _rewrite(store_copy, path, bad)
    out = _verify_cli(store_copy)
    assert path in out and "missing from stimuli: 999999" in out
    store = open_store(tiny_store)
    w = StoreWriter(resolve(str(store_copy) + "-new"), "synthetic", {})
    with pytest.raises(StoreError, match="999999"):
        w.write_shard(path, "trials", bad, subject_info=store.manifest.subject(1), session=1,
                      stimulus_ids=store.stimulus_ids(), subject=1)


def test_unknown_subject(tiny_store):
    with pytest.raises(StoreError, match=r"unknown subject 9 in store .*available: 1, 2, 3, 4, 5, 6, 7, 8"):
        open_store(tiny_store).check_subjects([1, 9])


def test_empty_prefix(tmp_path):
    r = run_main("info", str(tmp_path))
    assert r.returncode != 0 and "is empty: no manifest.json" in r.stderr and str(tmp_path) in r.stderr


def test_invalid_manifest_names_field(store_copy):
    p = os.path.join(store_copy, "manifest.json")
    m = json.load(open(p))
    m["subjects"][0]["voxels"] = -3
    json.dump(m, open(p, "w"))
    with pytest.raises(StoreError, match=r"manifest.json: field 'subjects.0.voxels'"):
        open_store(store_copy)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "trials/../../x.parquet", "s3://other/x",
                                  "trials//x.parquet", "trials\\..\\x"])
def test_a_shard_path_outside_the_store_is_refused(store_copy, path):
    p = os.path.join(store_copy, "manifest.json")
    m = json.load(open(p))
    m["shards"][0]["path"] = path
    json.dump(m, open(p, "w"))
    with pytest.raises(StoreError, match=r"manifest.json: field 'shards.0.path'.*not a path inside the store"):
        open_store(store_copy)


def test_a_manifest_that_is_not_utf8_is_one_line(store_copy):
    p = os.path.join(store_copy, "manifest.json")
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:10] + b"\xff\xfe" + raw[10:])
    with pytest.raises(StoreError, match=r"manifest.json: not UTF-8 text \(byte 10"):
        open_store(store_copy)
    proc = run_main("info", store_copy)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "not UTF-8 text" in proc.stderr, proc.stderr


@pytest.mark.parametrize("damage, message", [
    (lambda m: m["subjects"].append(dict(m["subjects"][0])), r"subjects \[1\] are listed more than once"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), r"are listed more than once"),
    (lambda m: next(s for s in m["shards"] if s["subject"] is not None).update(subject=42),
     r"names subject 42, which is not among the manifest's subjects"),
])
def test_an_inconsistent_manifest_is_one_line(store_copy, damage, message):
    p = os.path.join(store_copy, "manifest.json")
    m = json.load(open(p))
    damage(m)
    json.dump(m, open(p, "w"))
    with pytest.raises(StoreError, match=r"manifest.json: .*" + message) as err:
        open_store(store_copy)
    assert "\n" not in str(err.value)


def test_unlisted_and_missing_files(store_copy):
    os.remove(os.path.join(store_copy, "timeseries/subject=05/part-00001.parquet"))
    open(os.path.join(store_copy, "trials/subject=05/part-00099.parquet"), "wb").write(b"x")
    out = _verify_cli(store_copy)
    assert "timeseries/subject=05/part-00001.parquet: missing" in out
    assert "part-00099.parquet: not listed in the manifest" in out


def test_write_is_atomic_on_failure(tmp_path):
    """A failure in the middle of a write leaves neither the file nor a temporary file."""
    loc = resolve(str(tmp_path)).join("x.parquet")
    with pytest.raises(Exception):
        loc.write_bytes_atomic(None)  # fails after the temporary file is opened
    assert os.listdir(tmp_path) == []
