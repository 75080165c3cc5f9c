"""CLIP-MUSED on the tiny store through the generic paths: per-subject ROI PCA fitted on train trials only, two
tokens per subject, CLIP-guided RSA, the orthogonality constraint and 80-way multi-label classification, evaluated with the semantic metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SOURCE_SUBJECTS, metric_history, tiny_config

from raydecode.modelinfo.info import model_info
from raydecode.train.launch import run_training

FEW = 60  # train trials per subject: the data-poor setting (tiny store: 150)


def test_the_parameter_count_grows_with_subjects_only_by_their_two_tokens():
    one = model_info("clip_mused", "paper", voxels=[15724])
    eight = model_info("clip_mused", "paper", voxels=[15724, 14278, 15226, 13153, 13039, 17907, 12682, 14386])
    assert eight["total"] - one["total"] == 7 * 2 * 512, (one["total"], eight["total"])
    assert eight["modules"]["subject_tokens"]["total"] == 8 * 2 * 512
    assert {"embed", "encoder", "classifier", "subject_tokens"} <= set(eight["modules"])
    assert 60e6 < one["total"] < 100e6, one["total"]  # ViT width 512, 24 layers
    shared = model_info("clip_mused", "paper", voxels=[15724] * 8, overrides={"subject_tokens": False})
    assert shared["total"] == one["total"]  # MS-SMODEL: one pair for everyone
    from raydecode.modelinfo.memory import memory_plan

    plan = memory_plan("clip_mused", "tiny", voxels=[240, 200], gpus=2, gpu_sizes_gb=(24,))
    assert plan["activations_per_sample_gb_bf16"] > 0 and plan["zero"][0]["max_batch"][24] > 0, plan


def _train_rows(store_root: str, subject: int, split: str) -> np.ndarray:
    from raydecode.data.store import open_store

    store = open_store(store_root)
    rows = []
    for shard in store.manifest.shards_of("trials", subjects=[subject]):
        t = store.read_shard(shard, ["split", "betas"]).to_pydict()
        rows += [np.asarray(b, np.float64) for sp, b in zip(t["split"], t["betas"]) if sp in split.split("+")]
    return np.stack(rows)


def test_the_roi_pca_is_fitted_on_train_trials_only(tiny_store, ray_local):
    """The driver's streamed PCA equals numpy's on the subject's train trials read straight from the store, and
    differs from one that also saw the test trials."""
    from raydecode.config import DataSelection
    from raydecode.data.pca import fit_roi_pca, group_indices
    from raydecode.data.store import open_store
    from raydecode.methods.clip_mused import SYNTHETIC_ROI_GROUPS

    store = open_store(tiny_store)
    rois = {s: store.voxel_table(s)["roi"].to_pylist() for s in (1, 2)}
    tensors, info = fit_roi_pca(tiny_store, DataSelection(read_cpus=0.25), rois, SYNTHETIC_ROI_GROUPS, 12)
    assert info["trials"] == {1: 150, 2: 150}
    for s in (1, 2):
        train, both = _train_rows(tiny_store, s, "train"), _train_rows(tiny_store, s, "train+test")
        for g, idx in enumerate(group_indices(rois[s], SYNTHETIC_ROI_GROUPS, s)):
            mean, comps = tensors[f"{s}.{g}.mean"].numpy(), tensors[f"{s}.{g}.components"].numpy()
            np.testing.assert_allclose(mean, train[:, idx].mean(0), atol=1e-5)
            for data, same in ((train, True), (both, False)):
                x = data[:, idx] - data[:, idx].mean(0)
                axes = np.linalg.svd(x, full_matrices=False)[2][: min(12, len(idx))]
                overlap = np.abs((comps[: len(axes)] * axes).sum(1))  # |cos| between matching axes
                assert (overlap.min() > 1 - 1e-4) == same, (s, g, same, overlap.round(4))


@pytest.fixture(scope="module")
def multi_subject(tiny_store, ray_local, tmp_path_factory):
    """CLIP-MUSED on 6 subjects with FEW train trials each."""
    work = tmp_path_factory.mktemp("clip-mused")
    cfg = tiny_config(tiny_store, work, "clip-mused", method="clip_mused",
                      data={"subjects": SOURCE_SUBJECTS, "train_trials": FEW, "categories": True},
                      optim={"epochs": 30, "lr": 1e-3, "batch_size": 16})
    return cfg, run_training(cfg, stage="pretrain")


def test_clip_mused_is_evaluated_with_the_semantic_metrics(multi_subject, tiny_store):
    """`raydecode evaluate` fills mAP / AUC / Hamming (and the chance mAP) on subject 1's test images from the
    method's class scores. (On this store they stay at chance: 50 training images per subject carry too little of
    the categories; README, CLIP-MUSED.)"""
    from raydecode.config import EvaluateConfig
    from raydecode.evaluate.suite import run_evaluate

    cfg, result = multi_subject
    m = run_evaluate(EvaluateConfig(model=result.artifacts["checkpoint"], store=tiny_store, workdir=cfg.workdir,
                                    subjects=[1], protocols=["averaged"], cpus_per_actor=0.5, tsne=False,
                                    data={"read_cpus": 0.25, "lookup_cpus": 0.25},
                                    reconstruct={"enabled": False})).metrics
    print("subject 1:", {k: v for k, v in m.items() if k.startswith("semantic.")})
    for k in ("semantic.map", "semantic.auc", "semantic.hamming", "semantic.chance_map"):
        assert 0 <= m[k] <= 1, (k, m)
    assert m["semantic.classes"] > 10 and m["rows"] == 30, m  # the 30 shared test images, averaged


def test_rsa_terms_fall_during_training(multi_subject):
    cfg, result = multi_subject
    for key in ("train.rsa_llv", "train.rsa_hlv", "train.bce"):
        hist = [v for _, v in metric_history(cfg, result.mlflow_run_id, key)]
        assert len(hist) == cfg.optim.epochs and np.mean(hist[-3:]) < 0.8 * np.mean(hist[:3]), (key, hist)
    assert {"semantic.map", "semantic.auc", "semantic.chance_map"} <= set(result.metrics), result.metrics


def test_the_orthogonality_term_separates_the_two_tokens(tiny_store):
    """In one process on 3 subjects' betas: with λ⊥ the low- and high-level tokens of test trials end far less
    aligned (|cos|) than with λ⊥ = 0."""
    from raydecode.data.store import open_store
    from raydecode.methods.spec import DatasetInfo, get_method
    from raydecode.nn.encoders import FrozenEncoder, encoder_config

    store, subjects = open_store(tiny_store), [1, 2, 3]
    info = DatasetInfo(subjects, {s: store.manifest.subject(s).voxels for s in subjects},
                       rois={s: store.voxel_table(s)["roi"].to_pylist() for s in subjects})
    spec = get_method("clip_mused")
    stim = store.read_shard(store.manifest.shards_of("stimuli")[0]).to_pydict()
    cats = {i: np.asarray(c) for i, c in zip(stim["image_id"], stim["categories"])}
    rows = {"train": [], "test": []}
    for shard in store.manifest.shards_of("trials", subjects=subjects):
        t = store.read_shard(shard, ["subject", "split", "betas", "image_id"]).to_pydict()
        for s, sp, b, i in zip(t["subject"], t["split"], t["betas"], t["image_id"]):
            rows[sp].append((np.pad(np.asarray(b, np.float32), (0, info.width - len(b))), s, i))
    data = {k: {"betas": torch.tensor(np.stack([r[0] for r in v])), "subject": torch.tensor([r[1] for r in v]),
                "image_id": torch.tensor([r[2] for r in v])} for k, v in rows.items()}
    import io

    from PIL import Image

    cfg0 = spec.config("tiny")
    enc = FrozenEncoder(encoder_config(cfg0.image_encoder))
    images = {i: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for i, b in zip(stim["image_id"], stim["image"])}
    ids = sorted(images)
    toks, pooled = enc.encode(torch.from_numpy(np.stack([images[i] for i in ids])),
                              [stim["caption"][stim["image_id"].index(i)] for i in ids])
    by_id = {i: n for n, i in enumerate(ids)}
    for d in data.values():
        pick = torch.tensor([by_id[int(i)] for i in d["image_id"]])
        d.update(clip_tokens=toks[pick], clip_pooled=pooled[pick],
                 categories=torch.tensor(np.stack([cats[int(i)] for i in d["image_id"]])))
    from raydecode.data.pca import fit_roi_pca_arrays

    pca = fit_roi_pca_arrays({s: data["train"]["betas"][data["train"]["subject"] == s].numpy()[:, :info.voxels[s]]
                              for s in subjects}, info.rois, cfg0.roi_groups, cfg0.pca_dim)
    cos = {}
    for name, lam in (("orth", cfg0.lambda_orth), ("none", 0.0)):
        torch.manual_seed(0)
        cfg = spec.config("tiny", {"lambda_orth": lam})
        model = spec.build_model(cfg, info)
        model.pca.load(pca)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        train = {k: v for k, v in data["train"].items() if k != "image_id"}
        for _ in range(300):
            pick = torch.randint(len(train["betas"]), (32,), generator=gen)
            loss, _ = spec.loss(model, {k: v[pick] for k, v in train.items()}, None)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out = spec.predict(model.eval(), data["test"])
        cos[name] = float(torch.nn.functional.cosine_similarity(out["low"], out["high"], dim=-1).abs().mean())
    print("|cos(z_llv, z_hlv)| on test trials:", cos)
    assert cos["orth"] <= 0.5 * cos["none"], cos


def test_training_on_a_store_without_captions_is_refused(store_copy, tmp_path):
    """The high-level target reads each image's caption: a store ingested without them (NSD without --coco) is
    refused before any worker starts, naming the encoder."""
    import json
    import os

    from raydecode.errors import ConfigError
    from raydecode.train.launch import plan_training

    path = os.path.join(store_copy, "manifest.json")
    manifest = json.load(open(path))
    manifest["absent"] = sorted(set(manifest.get("absent", [])) | {"captions"})
    json.dump(manifest, open(path, "w"))
    cfg = tiny_config(store_copy, tmp_path, "no-captions", method="clip_mused", data={"subjects": [1, 2]})
    with pytest.raises(ConfigError, match="'clip-levels-tiny' reads the stimuli's captions"):
        plan_training(cfg)
