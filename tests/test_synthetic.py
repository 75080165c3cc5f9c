"""Synthetic NSD: NSD's shape, and planted structure that real decoders can find."""

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from scipy.spatial import cKDTree

from raydecode.data.pipeline import betas_matrix
from raydecode.data.store import open_store
from raydecode.data.synthetic import PRESETS, SyntheticNSD


@pytest.fixture(scope="module")
def loaded(tiny_store):
    """Per subject: image ids, splits, betas (float32); images as 16x16 RGB vectors."""
    store = open_store(tiny_store)
    m = store.manifest
    images = {}
    for shard in m.shards_of("stimuli"):
        t = store.read_shard(shard)
        for i, png in zip(t["image_id"].to_pylist(), t["image"].to_pylist()):
            img = Image.open(io.BytesIO(png)).convert("RGB").resize((16, 16), Image.BILINEAR)
            images[i] = np.asarray(img, np.float32).ravel() / 255
    subjects = {}
    for s in m.subject_ids:
        t = pa.concat_tables([store.read_shard(sh) for sh in m.shards_of("trials", subjects=[s])])
        subjects[s] = (t["image_id"].to_numpy(), t["split"].to_numpy(zero_copy_only=False), betas_matrix(t["betas"]))
    return store, images, subjects


def test_nsd_shape(loaded):
    store, images, subjects = loaded
    m = store.manifest
    p = PRESETS["tiny"]
    shared = set(m.shared_test_image_ids)
    assert len(shared) == p.n_shared and m.n_images == p.n_shared + 8 * p.n_unique
    train_sets = []
    for s, (ids, split, betas) in subjects.items():
        # every image shown 3 times; test images are exactly the shared ones, seen by every subject
        _, counts = np.unique(ids, return_counts=True)
        assert (counts == 3).all()
        assert set(ids[split == "test"]) == shared
        train_sets.append(set(ids[split == "train"]))
        assert len(train_sets[-1]) == p.n_unique
    # training images are subject-unique
    assert sum(len(a) for a in train_sets) == len(set().union(*train_sets))
    # 1-3 categories per image, a caption naming the first
    t = store.read_shard(m.shards_of("stimuli")[0])
    cats = np.asarray(t["categories"].combine_chunks().flatten()).reshape(-1, 80)
    assert cats.sum(1).min() >= 1 and cats.sum(1).max() <= 3 and len(np.unique(cats.argmax(1))) > 10
    assert all(c.startswith("a picture of ") for c in t["caption"].to_pylist())


def test_subject_maps_are_spatially_smooth(loaded):
    """Neighbouring voxels respond alike (smooth maps over the grid), distant ones do not."""
    store, _, subjects = loaded
    ids, split, betas = subjects[1]
    vt = store.voxel_table(1)
    xyz = np.stack([vt[c].to_numpy() for c in "ijk"], 1)
    tr = split == "train"
    u = np.unique(ids[tr])
    mean = np.stack([betas[tr][ids[tr] == i].mean(0) for i in u])  # signal: average over repeats
    corr = np.corrcoef(mean.T)
    tree = cKDTree(xyz)
    pairs = np.array(sorted(tree.query_pairs(1.01)))
    near = corr[pairs[:, 0], pairs[:, 1]].mean()
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(xyz), (2, 2000))
    far = corr[a, b][np.linalg.norm(xyz[a] - xyz[b], axis=1) > 6].mean()
    assert near > 0.25 and near > far + 0.2


def test_timeseries_follow_the_design(tiny_store):
    """BOLD rises ~5 s after each onset (HRF), in the direction of that trial's betas."""
    store = open_store(tiny_store)
    ts = store.read_shard(store.manifest.shards_of("timeseries", subjects=[2], sessions=[1])[0]).slice(0, 1)
    trials = store.read_shard(store.manifest.shards_of("trials", subjects=[2], sessions=[1])[0])
    row = ts.to_pylist()[0]
    v, n_tr, tr = row["n_voxels"], row["n_tr"], row["tr_s"]
    bold = np.asarray(row["bold"], np.float32).reshape(v, n_tr)
    assert v == store.manifest.subject(2).voxels and abs(tr - 1.3) < 1e-6
    design = np.asarray(row["design"])
    assert (design >= 0).sum() == len(row["trial"])
    betas = betas_matrix(trials["betas"])
    trial_no = trials["trial"].to_numpy()
    r_peak, r_onset = [], []
    for t, onset in zip(row["trial"], row["trial_onset_s"]):
        b = betas[trial_no == t][0]
        peak = int(round((onset + 5.5) / tr))
        at = int(onset // tr)
        if peak < n_tr:
            r_peak.append(np.corrcoef(bold[:, peak] - bold.mean(1), b)[0, 1])
            r_onset.append(np.corrcoef(bold[:, at] - bold.mean(1), b)[0, 1])
    assert np.mean(r_peak) > 0.2 and np.mean(r_peak) > np.mean(r_onset) + 0.1


def _ridge(x, y, lam, prior=None):
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs, ym = (x - mu) / sd, y.mean(0)
    resid = y - ym - (xs @ prior if prior is not None else 0)
    w = np.linalg.solve(xs.T @ xs + lam * np.eye(x.shape[1]), xs.T @ resid)
    w = w + (prior if prior is not None else 0)
    return w, lambda z: ((z - mu) / sd) @ w + ym


def _top1(pred, target):
    p = pred - pred.mean(0)
    t = target - target.mean(0)
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    return float(((p @ t.T).argmax(1) == np.arange(len(p))).mean())


def _test_set(ids, split, betas, images):
    te = split == "test"
    u = np.unique(ids[te])
    return np.stack([betas[te][ids[te] == i].mean(0) for i in u]), np.stack([images[i] for i in u])


def test_ridge_decoder_retrieves_test_images_far_above_chance(loaded):
    """A closed-form ridge map betas -> pixels, per subject, picks the right test image among 30."""
    _, images, subjects = loaded
    accs = []
    for s, (ids, split, betas) in subjects.items():
        tr = split == "train"
        _, decode = _ridge(betas[tr], np.stack([images[i] for i in ids[tr]]), lam=betas.shape[1])
        bt, targets = _test_set(ids, split, betas, images)
        accs.append(_top1(decode(bt), targets))
    chance = 1 / 30
    assert min(accs) > 8 * chance, accs
    assert np.mean(accs) > 15 * chance, accs


def _template(store, s):
    vt = store.voxel_table(s)
    return SyntheticNSD.template_coords(np.stack([vt[c].to_numpy() for c in "ijk"], 1).astype(float))


def test_map_from_other_subjects_helps_a_data_poor_subject(loaded):
    """Fit ridge maps on 7 subjects, carry them into a shared (template) space, and use their mean as
    the prior of the 8th subject's map: with 20 trials it decodes far better than from scratch."""
    store, images, subjects = loaded
    rng = np.random.default_rng(0)
    scratch, shared = [], []
    for target in subjects:
        coords = _template(store, target)
        prior = 0
        for s, (ids, split, betas) in subjects.items():
            if s == target:
                continue
            tr = split == "train"
            w, _ = _ridge(betas[tr], np.stack([images[i] for i in ids[tr]]), lam=betas.shape[1])
            _, nn = cKDTree(_template(store, s)).query(coords, k=4)
            prior = prior + w[nn].mean(1) * betas.shape[1] / len(coords) / 7
        ids, split, betas = subjects[target]
        bt, targets = _test_set(ids, split, betas, images)
        for _ in range(3):
            few = rng.choice(np.flatnonzero(split == "train"), 20, replace=False)
            y = np.stack([images[i] for i in ids[few]])
            scratch.append(_top1(_ridge(betas[few], y, betas.shape[1])[1](bt), targets))
            shared.append(_top1(_ridge(betas[few], y, betas.shape[1], prior)[1](bt), targets))
    assert np.mean(shared) > np.mean(scratch) + 0.1, (np.mean(scratch), np.mean(shared))
    assert np.mean(np.array(shared) >= np.array(scratch)) > 0.75
