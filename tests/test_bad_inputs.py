"""Bad inputs a user (or an attacker) can give: each is refused with one line naming the file, field or value, a
non-zero exit, and nothing half-written. (The store's older bad-input tests are in test_store.py, the configs' in
test_config.py, the submit checks in test_cluster_files.py.)"""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_main

from raydecode.data.ingest import run_ingest, synthetic_plan
from raydecode.data.schema import BEGUN
from raydecode.errors import SourceError


def _interrupted(out: str, seed: int, monkeypatch, after: int = 10) -> None:
    """An ingest of the tiny synthetic store (``seed``) that dies after ``after`` shards."""
    from raydecode.data import ingest

    real_write, calls = ingest.write_shard, {"n": 0}

    def crash(*a, **kw):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt("simulated crash")
        return real_write(*a, **kw)

    monkeypatch.setattr(ingest, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(synthetic_plan("tiny", seed), out, progress=False)
    monkeypatch.setattr(ingest, "write_shard", real_write)


def test_an_interrupted_ingest_is_completed_only_with_the_parameters_it_began_with(tmp_path, monkeypatch):
    """A store begun with seed 1 and completed with seed 0 would hold seed-1 shards under a seed-0 manifest and
    verify: the parameters it began with are recorded before the first shard and checked on completion."""
    out = str(tmp_path / "store")
    _interrupted(out, 1, monkeypatch)
    assert os.path.exists(os.path.join(out, BEGUN))
    r = run_main("ingest", "synthetic", "--out", out, "--seed", "0")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert BEGUN in r.stderr and "'seed': 1" in r.stderr and "refusing to complete it" in r.stderr
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    res = run_ingest(synthetic_plan("tiny", 1), out, progress=False)  # the same parameters complete it
    assert res.status == "completed" and res.skipped == 10
    assert not os.path.exists(os.path.join(out, BEGUN))  # a complete store carries only its manifest


@pytest.mark.parametrize("subjects, words", [
    ([0], "subject 0: the synthetic tiny preset has subjects 1..8"),
    ([9, 2], "subject 9: the synthetic tiny preset has subjects 1..8"),
    ([2, 2], "subjects [2, 2]: a subject listed twice; the synthetic tiny preset has subjects 1..8"),
])
def test_subjects_outside_the_source_are_refused_before_anything_is_written(tmp_path, subjects, words):
    """``subjects=[0]`` used to write subject 8's data as subject 00 (a Python index of -1)."""
    with pytest.raises(SourceError, match=words.replace("[", r"\[").replace("]", r"\]")):
        synthetic_plan("tiny", 0, subjects=subjects)
    out = tmp_path / "store"
    r = run_main("ingest", "synthetic", "--out", str(out), "--set", f"subjects={subjects}")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [f"error: {words}"], r.stderr
    assert not out.exists()


def _verify_problems(store: str) -> str:
    r = run_main("info", store, "--verify")
    assert r.returncode != 0
    return r.stdout + r.stderr


def test_verify_finds_repeated_trials(store_copy):
    path = "trials/subject=03/part-00002.parquet"
    t = pq.read_table(os.path.join(store_copy, path))
    pq.write_table(pa.concat_tables([t, t.slice(0, 3)]), os.path.join(store_copy, path))
    out = _verify_problems(store_copy)
    assert f"{path}: 3 trial row(s) repeat a (session, run, trial) of their subject" in out, out


def test_verify_finds_a_test_image_in_the_train_split(store_copy):
    """A test image shown in a train trial (any subject's) leaks the test set into training."""
    path = "trials/subject=05/part-00001.parquet"
    t = pq.read_table(os.path.join(store_copy, path))
    split, ids = t["split"].to_pylist(), t["image_id"].to_pylist()
    test_image = ids[split.index("test")]
    ids[split.index("train")] = test_image
    t = t.set_column(t.schema.get_field_index("image_id"), "image_id", pa.array(ids, t.schema.field("image_id").type))
    pq.write_table(t, os.path.join(store_copy, path))
    out = _verify_problems(store_copy)
    assert f"1 image(s) shown in both the train and the test split (test images leak into training): {test_image}" \
        in out, out


def test_a_clean_store_verifies(tiny_store):
    """The checks above find nothing in a store as ingest writes it."""
    r = run_main("info", tiny_store, "--verify")
    assert r.returncode == 0 and "problem" not in r.stdout.lower(), r.stdout


def test_a_model_directory_with_a_bad_config_is_one_line(tmp_path, tiny_store):
    from raydecode.checkpoint import rebuild
    from raydecode.errors import StoreError

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    (model / "metrics.json").write_text("{}")
    r = run_main("evaluate", "--model", str(model), "--store", tiny_store, "--set", f"workdir={tmp_path}")
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert r.returncode == 4 and errors == [f"error: {model}/config.json: not valid JSON (Expecting property name "
                                            "enclosed in double quotes: line 1 column 2 (char 1))"], r.stderr
    for config, words in [({}, "config.json: no 'method'"),
                          ({"method": "mindeye2", "model": {"hiden": 3}, "info": {}}, "do not describe a mindeye2")]:
        with pytest.raises(StoreError, match=words):
            rebuild(config)


def test_a_model_path_with_a_quote_is_looked_up_not_a_filter_syntax_error(pretrained, tmp_path):
    """MLflow's search filters are strings: a checkpoint path with ``'`` broke the filter (a traceback)."""
    import shutil

    import mlflow

    from raydecode.checkpoint import resolve_ref
    from raydecode.evaluate.suite import evaluation_run
    from raydecode.report import filter_literal

    _, result = pretrained
    odd = tmp_path / "it's here" / "final"
    shutil.copytree(result.artifacts["checkpoint"], odd)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        ref = resolve_ref(str(odd))
        assert ref.kind == "checkpoint" and ref.run_id is None  # no run logged this copy
        assert evaluation_run(ref, "raydecode-evaluate") is None
    finally:
        mlflow.set_tracking_uri(None)
    assert filter_literal("it's") == '"it\'s"'
    with pytest.raises(Exception, match="holds both"):
        filter_literal("it's \"odd\"")


@pytest.mark.parametrize("where", ["a-file/summary.json", "a-directory"])
def test_a_summary_that_cannot_be_written_is_refused_before_the_stage_runs(tiny_store, tmp_path, where):
    """(A missing directory is made: `make demo` writes its summary into a workdir that does not exist yet.)"""
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-file").write_text("not a directory")
    target = tmp_path / where
    r = run_main("info", tiny_store, "--summary", str(target))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert f"--summary {target}" in r.stderr and "subjects" not in r.stdout  # the stage never ran
    made = tmp_path / "new" / "dir" / "summary.json"
    assert run_main("info", tiny_store, "--summary", str(made)).returncode == 0 and made.exists()
