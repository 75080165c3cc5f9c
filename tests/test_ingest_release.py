"""`raydecode ingest nsd` and `raydecode ingest mindeye2` on miniature releases written in the published formats
(tests/nsd_release.py): exact values against the source files, the trial -> image mapping, time series, resuming,
changed sources, bad input, S3, and the stores training with the existing stages."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from conftest import run_main
from nsd_release import BETA_SESSIONS, PER_RUN, TR, write_mindeye2, write_nsd
from PIL import Image

from raydecode.data.ingest import TaskOptions, run_ingest
from raydecode.data.mindeye2 import mindeye2_plan
from raydecode.data.nsd import nsd_plan
from raydecode.data.pipeline import betas_matrix
from raydecode.data.store import open_store
from raydecode.errors import SourceError


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release") / "nsd"
    mini = write_nsd(root)
    me2 = write_mindeye2(root.parent / "mindeyev2", mini)
    return mini, me2


@pytest.fixture(scope="module")
def nsd_store(release, ray_local, tmp_path_factory):
    """The miniature release ingested through the CLI: one Ray task per shard, time series and COCO annotations."""
    mini, _ = release
    out = str(tmp_path_factory.mktemp("stores") / "nsd")
    r = run_main("ingest", "nsd", "--source", str(mini.root), "--out", out, "--timeseries",
                 "--coco", str(mini.root / "coco"), "--set", "task_cpus=0.5")
    assert r.returncode == 0, r.stderr
    return out, r.stdout


@pytest.fixture(scope="module")
def me2_store(release, ray_local, tmp_path_factory):
    mini, me2 = release
    out = str(tmp_path_factory.mktemp("stores") / "me2")
    res = run_ingest(mindeye2_plan(str(me2.root), nsd=str(mini.root), coco=str(mini.root / "coco"),
                                   tasks=TaskOptions(num_cpus=0.5)), out, progress=False)
    assert res.status == "written"
    return out


def _trials(store, subject, session):
    return store.read_shard(store.manifest.shards_of("trials", subjects=[subject], sessions=[session])[0])


def test_betas_equal_the_hdf5_value_over_300_at_the_masks_coordinate(release, nsd_store, tmp_path):
    mini, _ = release
    store = open_store(nsd_store[0])
    vt = store.voxel_table(2)
    ijk = np.stack([vt[c].to_numpy() for c in "ijk"], 1)
    # the voxels are the mask's 1s in C order over the NIfTI's (i, j, k) axes
    assert np.array_equal(ijk, np.argwhere(mini.masks[2] > 0))
    assert store.manifest.subject(2).grid_shape == mini.masks[2].shape
    # labels from prf-visualrois (1..7 -> V1v..hV4), nsdgeneral elsewhere
    prf = np.asarray(nib.load(mini.root / "nsddata/ppdata/subj02/func1pt8mm/roi/prf-visualrois.nii.gz").dataobj)
    names = ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4")
    expected = [names[v - 1] if v else "nsdgeneral" for v in prf[ijk[:, 0], ijk[:, 1], ijk[:, 2]].tolist()]
    assert vt["roi"].to_pylist() == expected
    t = _trials(store, 2, 2)
    betas = betas_matrix(t["betas"])
    raw = mini.betas[(2, 2)]  # (trials, Z, Y, X) int16, as written
    for trial, voxel in ((7, 33), (1, 0), (40, len(vt) - 1)):
        i, j, k = ijk[voxel]
        session_values = raw[:, k, j, i].astype(np.float64) / 300
        z = (session_values[trial - 1] - session_values.mean()) / session_values.std()
        row = t["trial"].to_pylist().index(trial)
        assert betas[row, voxel] == pytest.approx(z, abs=2e-3 * max(1, abs(z)))
    # normalize: none keeps percent signal change (the value / 300, float16)
    plain = str(tmp_path / "plain")
    run_ingest(nsd_plan(str(mini.root), subjects=[2], sessions=[2], normalize="none", tasks=None), plain, progress=False)
    p = betas_matrix(_trials(open_store(plain), 2, 2)["betas"])
    i, j, k = ijk[33]
    assert p[6, 33] == np.float16(raw[6, k, j, i] / 300)
    assert open_store(plain).manifest.source_params["normalize"] == "none"


def test_trials_follow_subjectim_of_masterordering_and_shared_images_are_test(release, nsd_store):
    mini, _ = release
    store = open_store(nsd_store[0])
    d = mini.design
    shared = set((d["sharedix"][0] - 1).tolist())
    per = 4 * PER_RUN
    for s in (1, 2):
        expected = d["subjectim"][s - 1, d["masterordering"][0] - 1] - 1
        seen: dict[int, int] = {}
        reps = []
        for i in expected.tolist():
            seen[i] = seen.get(i, 0) + 1
            reps.append(seen[i])
        for sess in BETA_SESSIONS:
            t = _trials(store, s, sess)
            g = slice((sess - 1) * per, sess * per)
            assert t["image_id"].to_pylist() == expected[g].tolist()
            assert t["repetition"].to_pylist() == reps[g]
            assert t["split"].to_pylist() == ["test" if i in shared else "train" for i in expected[g].tolist()]
            runs, slots = np.nonzero(d["stimpattern"][sess - 1])
            assert t["run"].to_pylist() == (runs + 1).tolist()
            assert np.allclose(t["onset_s"].to_numpy(), slots * 4.0)
    m = store.manifest
    assert set(m.shared_test_image_ids) <= shared and m.shared_test_image_ids
    assert m.subject(1).trials["test"] == sum(
        (_trials(store, 1, s)["split"].to_numpy(zero_copy_only=False) == "test").sum() for s in BETA_SESSIONS)


def test_stimuli_are_imgbrick_rows_with_coco_categories_and_captions(release, nsd_store):
    mini, _ = release
    store = open_store(nsd_store[0])
    stim = store.read_shard(store.manifest.shards_of("stimuli")[0])
    ids = stim["image_id"].to_pylist()
    with h5py.File(mini.root / "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5") as f:
        for row in (0, len(ids) - 1):
            img = np.array(Image.open(io.BytesIO(stim["image"][row].as_py())))
            assert np.array_equal(img, f["imgBrick"][ids[row]])
    assert store.manifest.image_size == (425, 425)
    cats = np.array(stim["categories"].to_pylist())
    names = [store.manifest.categories[c] for c in np.flatnonzero(cats[0])]
    i = ids[0]
    from nsd_release import COCO_IDS

    pool = list(COCO_IDS)
    assert names == sorted({pool[i % len(pool)], pool[(i // 7) % len(pool)]}, key=store.manifest.categories.index)
    assert stim["caption"][0].as_py() == f"a photo of image {i}"  # the lowest annotation id's caption
    assert stim["shared"].to_pylist() == [x in set(store.manifest.shared_test_image_ids) for x in ids]
    assert store.manifest.absent == []


def test_time_series_are_the_masked_runs_in_percent_signal_change_with_design_onsets(release, nsd_store):
    mini, _ = release
    store = open_store(nsd_store[0])
    assert store.manifest.tr_s == pytest.approx(TR, abs=1e-5)
    ts = store.read_shard(store.manifest.shards_of("timeseries", subjects=[1], sessions=[2])[0])
    # session 2 has 6 run files, the first and last rest: 4 stimulus runs, numbered 1..4 as in stimpattern
    assert ts["run"].to_pylist() == [1, 2, 3, 4]
    row = 1  # stimulus run 2 = file run 3
    img = nib.load(mini.root / "nsddata_timeseries/ppdata/subj01/func1pt8mm/timeseries/timeseries_session02_run03.nii.gz")
    data = np.asarray(img.dataobj, np.float64)
    ijk = np.argwhere(mini.masks[1] > 0)
    n_tr = ts["n_tr"][row].as_py()
    bold = np.asarray(ts["bold"][row].values.to_numpy(zero_copy_only=False), np.float32).reshape(-1, n_tr)
    v = 17
    x = data[ijk[v, 0], ijk[v, 1], ijk[v, 2]]
    assert np.allclose(bold[v], 100 * (x / x.mean() - 1), atol=0.02)
    design = np.loadtxt(mini.root / "nsddata_timeseries/ppdata/subj01/func1pt8mm/design/design_session02_run03.tsv",
                        dtype=int)
    onsets = np.flatnonzero(design)
    assert np.allclose(ts["trial_onset_s"][row].as_py(), onsets * TR, atol=1e-4)
    assert ts["trial_image_id"][row].as_py() == (design[onsets] - 1).tolist()
    trials = _trials(store, 1, 2)
    in_run = [t for t, r in zip(trials["trial"].to_pylist(), trials["run"].to_pylist()) if r == 2]
    assert ts["trial"][row].as_py() == in_run


def test_all_three_sources_pass_info_verify(nsd_store, me2_store, tiny_store):
    for uri in (nsd_store[0], me2_store, tiny_store):
        r = run_main("info", uri, "--verify")
        assert r.returncode == 0, r.stderr
        assert "match the manifest" in r.stdout
    out = nsd_store[1]
    assert "ingest   wrote 11 shard(s), kept 0" in out and "trials/s" in out


def test_the_manifest_lists_every_source_file_with_size_and_checksum(release, nsd_store):
    import hashlib

    mini, _ = release
    files = {f.path: f for f in open_store(nsd_store[0]).manifest.source_files}
    for rel in ("nsddata/experiments/nsd/nsd_expdesign.mat", "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5",
                "nsddata_betas/ppdata/subj02/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.hdf5",
                "nsddata_timeseries/ppdata/subj01/func1pt8mm/design/design_session02_run06.tsv"):
        data = (mini.root / rel).read_bytes()
        assert files[rel].bytes == len(data) and files[rel].sha256 == hashlib.sha256(data).hexdigest()
    assert "coco/instances_train2017.json" in files


def test_mindeye2_release_values_images_and_coordinates(release, me2_store):
    mini, me2 = release
    store = open_store(me2_store)
    m = store.manifest
    assert m.source == "mindeye2" and m.image_size == (224, 224) and "voxel coordinates" not in m.absent
    t = _trials(store, 1, 2)
    betas = betas_matrix(t["betas"])
    behav = me2.behav[1]
    rows = behav[behav[:, 2] == 2]
    assert t["image_id"].to_pylist() == rows[:, 0].astype(int).tolist()
    for n in (0, 5, len(rows) - 1):
        g = int(rows[n, 5])
        assert t["trial"][n].as_py() == g - 750 + 1
        assert np.array_equal(betas[n], me2.betas[1][g].astype(np.float16))
    vt = store.voxel_table(1)
    assert np.array_equal(np.stack([vt[c].to_numpy() for c in "ijk"], 1), np.argwhere(mini.masks[1] > 0))
    # the same trials as the NSD release's (the miniature MindEye2 release was made from it)
    shared = set(np.flatnonzero(np.load(me2.root / "shared1000.npy")).tolist())
    assert t["split"].to_pylist() == ["test" if i in shared else "train" for i in rows[:, 0].astype(int).tolist()]
    stim = store.read_shard(m.shards_of("stimuli")[0])
    i = stim["image_id"][3].as_py()
    img = np.array(Image.open(io.BytesIO(stim["image"][3].as_py())))
    expected = (np.clip(me2.images[i].astype(np.float32), 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    assert np.array_equal(img, expected)


def test_mindeye2_without_masks_says_coordinates_are_absent(release, tmp_path):
    _, me2 = release
    out = str(tmp_path / "s")
    run_ingest(mindeye2_plan(str(me2.root), subjects=[2], tasks=None), out, progress=False)
    m = open_store(out).manifest
    assert {"voxel coordinates", "categories", "captions", "timeseries"} <= set(m.absent)
    assert m.subject(2).grid_shape == (m.subject(2).voxels, 1, 1)


def test_resumed_ingest_writes_only_the_missing_shards(release, nsd_store, ray_local, tmp_path):
    mini, _ = release
    out = tmp_path / "store"
    shutil.copytree(nsd_store[0], out)
    before = {s.path: s.sha256 for s in open_store(str(out)).manifest.shards}
    kept_mtime = os.stat(out / "voxels/subject=01.parquet").st_mtime_ns
    (out / "manifest.json").unlink()
    (out / "trials/subject=02/part-00002.parquet").unlink()
    (out / "timeseries/subject=01/part-00001.parquet").unlink()
    r = run_main("info", str(out))
    assert r.returncode != 0 and "incomplete store" in r.stderr
    res = run_ingest(nsd_plan(str(mini.root), timeseries=True, coco=str(mini.root / "coco"),
                              tasks=TaskOptions(num_cpus=0.5)), str(out), progress=False)
    assert (res.status, res.written, res.skipped) == ("completed", 2, 9)
    assert os.stat(out / "voxels/subject=01.parquet").st_mtime_ns == kept_mtime  # never rewritten
    assert {s.path: s.sha256 for s in open_store(str(out)).manifest.shards} == before
    assert open_store(str(out)).verify() == []


def test_a_source_changed_since_the_partial_ingest_is_refused(release, ray_local, tmp_path):
    mini, _ = release
    src = tmp_path / "release"
    shutil.copytree(mini.root, src, ignore=shutil.ignore_patterns("nsddata_timeseries", "coco"))
    out = tmp_path / "store"
    run_ingest(nsd_plan(str(src), subjects=[1], tasks=None), str(out), progress=False)
    (out / "manifest.json").unlink()
    (out / "trials/subject=01/part-00002.parquet").unlink()  # an interrupted ingest: session 2 not written yet
    # session 1's betas change in place (same size) after its shard was written
    path = src / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.hdf5"
    size = path.stat().st_size
    with h5py.File(path, "r+") as f:
        f["betas"][0, 0, 0, 0] = f["betas"][0, 0, 0, 0] + 1
    assert path.stat().st_size == size
    r = run_main("ingest", "nsd", "--source", str(src), "--out", str(out), "--subjects", "1")
    assert r.returncode == 5
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "betas_session01.hdf5: changed since" in err[0]
    assert not (out / "manifest.json").exists()
    # a changed file that every shard depends on (the design) is named the same way
    from scipy.io import loadmat, savemat

    design = src / "nsddata/experiments/nsd/nsd_expdesign.mat"
    original = design.read_bytes()
    mat = {k: v for k, v in loadmat(design).items() if not k.startswith("__")}
    savemat(design, {**mat, "basiccnt": mat["basiccnt"] + 1})
    with h5py.File(path, "r+") as f:
        f["betas"][0, 0, 0, 0] = f["betas"][0, 0, 0, 0] - 1  # the betas' bytes as before (a new modification time)
    r = run_main("ingest", "nsd", "--source", str(src), "--out", str(out), "--subjects", "1")
    assert r.returncode == 5 and "nsd_expdesign.mat: changed since" in r.stderr
    # both restored: the same bytes are no change (a new modification time alone is re-hashed, not refused)
    design.write_bytes(original)
    r = run_main("ingest", "nsd", "--source", str(src), "--out", str(out), "--subjects", "1")
    assert r.returncode == 0, r.stderr
    assert "completed an interrupted ingest: 1 shard(s), kept" in r.stdout


def _damage(root: Path, what: str) -> str:
    """Break one thing of a release copy; returns the text the error must contain."""
    betas = root / "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session01.hdf5"
    if what == "missing expdesign":
        (root / "nsddata/experiments/nsd/nsd_expdesign.mat").unlink()
        return "nsd_expdesign.mat: missing (NSD's experiment design)"
    if what == "wrong dataset name":
        with h5py.File(betas, "r+") as f:
            f.move("betas", "data")
        return "betas_session01.hdf5: no dataset 'betas' (datasets: data)"
    if what == "mask of another grid":
        path = root / "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz"
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.pad(np.asarray(img.dataobj), ((0, 1), (0, 0), (0, 0))), img.affine), path)
        (path.parent / "prf-visualrois.nii.gz").unlink()  # (else its own grid is refused first, as it should be)
        return "betas_session01.hdf5: dataset 'betas' has shape (40, 7, 11, 9), expected (40, 7, 11, 10)"
    if what == "wrong variable":
        from scipy.io import loadmat, savemat

        path = root / "nsddata/experiments/nsd/nsd_expdesign.mat"
        mat = {k: v for k, v in loadmat(path).items() if not k.startswith("__") and k != "subjectim"}
        savemat(path, mat)
        return "nsd_expdesign.mat: no variable 'subjectim'"
    raise ValueError(what)


@pytest.mark.parametrize("what", ["missing expdesign", "wrong dataset name", "mask of another grid", "wrong variable"])
def test_bad_release_files_give_one_error_line_and_no_manifest(release, tmp_path, what):
    mini, _ = release
    src = tmp_path / "release"
    shutil.copytree(mini.root, src, ignore=shutil.ignore_patterns("nsddata_timeseries", "coco"))
    expected = _damage(src, what)
    out = tmp_path / "out"
    with pytest.raises(SourceError) as exc:
        run_ingest(nsd_plan(str(src), subjects=[1], tasks=None), str(out), progress=False)
    assert expected in str(exc.value) and "\n" not in str(exc.value)
    assert not (out / "manifest.json").exists()


def test_a_subject_or_session_the_release_lacks_is_named(release, tmp_path):
    mini, _ = release
    r = run_main("ingest", "nsd", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: config: key 'source' is required (the release's root: a path, file:// or s3://bucket/prefix)")
    r = run_main("ingest", "nsd", "--source", str(mini.root), "--out", str(tmp_path / "a"), "--sessions", "3")
    assert r.returncode == 5 and "subject 1 has no session 3 in this release (sessions 1..2)" in r.stderr
    r = run_main("ingest", "nsd", "--source", str(mini.root), "--out", str(tmp_path / "b"), "--subjects", "4")
    assert r.returncode == 5 and "subj04/func1pt8mm/betas_fithrf_GLMdenoise_RR: no betas_sessionSS.hdf5 for subject 4" in r.stderr
    r = run_main("ingest", "nsd", "--source", str(mini.root), "--out", str(tmp_path / "c"), "--subjects", "9")
    assert r.returncode == 5 and "subject 9: NSD has subjects 1..8" in r.stderr
    assert not any((tmp_path / x / "manifest.json").exists() for x in "abc")


def test_mindeye2_mask_whose_voxel_count_differs_is_refused(release, tmp_path):
    mini, me2 = release
    with pytest.raises(SourceError, match=r"nsdgeneral.nii.gz: 232 voxels, but .*betas_all_subj02_fp32_renorm.hdf5 has 297"):
        # subject 1's mask given as subject 2's
        nsd = tmp_path / "nsd"
        shutil.copytree(mini.root / "nsddata/ppdata", nsd / "nsddata/ppdata")
        shutil.copy(nsd / "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz",
                    nsd / "nsddata/ppdata/subj02/func1pt8mm/roi/nsdgeneral.nii.gz")
        (nsd / "nsddata/ppdata/subj02/func1pt8mm/roi/prf-visualrois.nii.gz").unlink()
        mindeye2_plan(str(me2.root), subjects=[2], nsd=str(nsd), tasks=None)


@pytest.mark.s3
def test_ingest_from_an_s3_release_into_an_s3_store(release, s3_server, ray_local):
    import boto3

    mini, _ = release
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="public-nsd", ACL="public-read")  # as NSD's own bucket: anyone may list and read
    for path in mini.root.rglob("*"):
        if path.is_file() and "nsddata_timeseries" not in path.parts:
            client.upload_file(str(path), "public-nsd", f"release/{path.relative_to(mini.root).as_posix()}",
                               ExtraArgs={"ACL": "public-read"})
    # the release read without credentials (as NSD's public bucket is), the store written with them
    public = s3_server.model_copy(update={"access_key_id": None, "secret_access_key": None, "anonymous": True})
    res = run_ingest(nsd_plan("s3://public-nsd/release", public, subjects=[1], sessions=[1],
                              tasks=TaskOptions(num_cpus=0.5)), "s3://nsd/ingested", s3_server, progress=False)
    assert res.status == "written"
    store = open_store("s3://nsd/ingested", s3_server)
    assert store.verify() == []
    assert store.manifest.source_params["release"] == "s3://public-nsd/release"
    assert "timeseries" in store.manifest.absent and "categories" in store.manifest.absent


@pytest.fixture(scope="module")
def nsd_trained(nsd_store, me2_store, ray_local, tmp_path_factory):
    """MindEye2 pretraining and Dynadiff on the ingested NSD store, unchanged: the same configs as the synthetic."""
    from raydecode.config import DiffusionDecodeConfig, TrainConfig
    from raydecode.diffusion_decode import run_dynadiff
    from raydecode.train.launch import run_training

    work = tmp_path_factory.mktemp("nsd-train")
    common = {"store": nsd_store[0], "workdir": str(work), "preset": "tiny",
              "scaling": {"num_workers": 1, "cpus_per_worker": 0.5}, "deepspeed": {"zero_stage": 2}}
    pre = TrainConfig.model_validate({
        **common, "run_name": "nsd-pretrain",
        "data": {"subjects": [1, 2], "categories": False, "read_cpus": 0.25},
        "optim": {"epochs": 8, "batch_size": 16, "lr": 1e-3}})
    dd = DiffusionDecodeConfig.model_validate({
        **common, "run_name": "nsd-dynadiff", "method": "dynadiff", "model": {"eval_timesteps": 2},
        "data": {"subjects": [1], "categories": False, "read_cpus": 0.25},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 3e-3},
        "reconstruct": {"steps": 2, "max_images": 4, "grid_images": 4}, "time_resolved": {"shifts": [0]},
        "promote": False})
    me2 = pre.model_copy(update={"store": me2_store, "run_name": "me2-pretrain"})
    return run_training(pre), run_dynadiff(dd), run_training(me2)


def test_an_ingested_nsd_store_trains_with_pretrain_and_dynadiff(nsd_trained):
    pre, dd, _ = nsd_trained
    m = pre.metrics
    # 8 shared test images per subject: chance 1/8; the planted code is decoded well above it
    assert m["retrieval.chance"] == pytest.approx(1 / 8)
    assert m["retrieval.brain_to_image_top1"] >= 0.35 and m["retrieval.image_to_brain_top1"] >= 0.35
    assert dd.status == "ok" and np.isfinite(dd.metrics["final.test.diffusion_loss"])
    assert Path(dd.artifacts["evaluation.reconstructions_averaged.png"]).is_file()


def test_an_ingested_mindeye2_store_trains_with_pretrain(nsd_trained):
    *_, me2 = nsd_trained
    m = me2.metrics
    assert m["retrieval.chance"] == pytest.approx(1 / 8)
    assert m["retrieval.brain_to_image_top1"] >= 0.35 and m["retrieval.image_to_brain_top1"] >= 0.35


def test_tasks_no_node_can_run_are_refused_instead_of_waiting_forever(release, ray_local, tmp_path):
    mini, _ = release
    r = run_main("ingest", "nsd", "--source", str(mini.root), "--out", str(tmp_path / "s"), "--subjects", "1",
                 "--set", "task_cpus=64", "--set", "task_wait_s=3")
    assert r.returncode == 2
    assert "task_cpus 64 / task_memory_gb 0: no node of the cluster can run an ingest task (the largest has 2 CPUs" \
        in r.stderr
    assert not (tmp_path / "s" / "manifest.json").exists()


@pytest.mark.parametrize("layout", [{"chunks": (40, 1, 1, 1)}, {}, {"chunks": (40, 2, 3, 4), "compression": "gzip"}])
def test_masked_betas_read_the_same_from_any_hdf5_layout(tmp_path, layout):
    """NSD's one-chunk-per-voxel layout is read chunk by chunk; any other by the mask's bounding box."""
    from raydecode.data.nsd import read_masked_betas

    rng = np.random.default_rng(0)
    vol = rng.integers(-3000, 3000, (40, 7, 11, 9), dtype=np.int16)  # (trials, Z, Y, X)
    coords = np.argwhere(rng.random((9, 11, 7)) < 0.3)  # (i, j, k) in C order
    with h5py.File(tmp_path / "b.hdf5", "w") as f:
        f.create_dataset("betas", data=vol, **layout)
    with h5py.File(tmp_path / "b.hdf5") as f:
        got = read_masked_betas(f["betas"], coords)
    assert np.array_equal(got, vol[:, coords[:, 2], coords[:, 1], coords[:, 0]])
