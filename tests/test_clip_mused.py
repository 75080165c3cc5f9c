"""CLIP-MUSED through the generic paths: per-subject ROI PCA fitted on train trials only (or ROI tokens on a template
grid), two tokens per subject, CLIP-guided RSA, the orthogonality constraint and 80-way multi-label classification,
evaluated with the semantic metrics; multi-subject training helps a data-poor subject (demo store)."""

from __future__ import annotations

import os

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
    """CLIP-MUSED on 6 subjects with FEW train trials each, ROI tokens by the paper's per-subject PCA."""
    work = tmp_path_factory.mktemp("clip-mused")
    cfg = tiny_config(tiny_store, work, "clip-mused", method="clip_mused",
                      data={"subjects": SOURCE_SUBJECTS, "train_trials": FEW, "categories": True},
                      model={"tokens": "pca"},  # the paper's tokens, through the driver's PCA and the checkpoint
                      optim={"epochs": 30, "lr": 1e-3, "batch_size": 16})
    return cfg, run_training(cfg, stage="pretrain")


def test_clip_mused_is_evaluated_and_compared_beside_mindeye2(multi_subject, pretrained, tiny_store):
    """`raydecode evaluate` fills mAP / AUC / Hamming (and the chance mAP) on subject 1's test images from the
    method's class scores and draws the t-SNE of its embeddings (by subject and by class); `raydecode compare` puts
    the semantic columns beside a MindEye2 model's retrieval. (On this store the numbers stay at chance: 50 training
    images per subject carry too little of the categories; the demo store decodes them: README, CLIP-MUSED.)"""
    from raydecode.config import CompareConfig, EvaluateConfig
    from raydecode.evaluate.suite import run_compare, run_evaluate

    cfg, result = multi_subject
    common = dict(store=tiny_store, workdir=cfg.workdir, subjects=[1], protocols=["averaged"], cpus_per_actor=0.5,
                  data={"read_cpus": 0.25}, reconstruct={"enabled": False})
    ev = run_evaluate(EvaluateConfig(model=result.artifacts["checkpoint"], tsne=True, **common))
    m = ev.metrics
    print("subject 1:", {k: v for k, v in m.items() if k.startswith("semantic.")})
    for k in ("semantic.map", "semantic.auc", "semantic.hamming", "semantic.chance_map"):
        assert 0 <= m[k] <= 1, (k, m)
    assert m["semantic.classes"] > 10 and m["rows"] == 30, m  # the 30 shared test images, averaged
    assert "tsne.png" in ev.artifacts and os.path.getsize(ev.artifacts["tsne.png"]) > 0, ev.artifacts

    _, mindeye2 = pretrained
    run_evaluate(EvaluateConfig(model=mindeye2.artifacts["checkpoint"], tsne=False, **common))
    models = [result.artifacts["checkpoint"], mindeye2.artifacts["checkpoint"]]
    cmp_ = run_compare(CompareConfig(store=tiny_store, workdir=cfg.workdir, models=models))
    header = next(line for line in open(cmp_.artifacts["table"]) if line.startswith("|"))
    assert "semantic.map" in header and "retrieval.brain_to_image_top1" in header, header
    assert cmp_.metrics[f"{models[0]}/semantic.map"] == m["semantic.map"], cmp_.metrics
    assert f"{models[1]}/retrieval.brain_to_image_top1" in cmp_.metrics, cmp_.metrics


def test_rsa_terms_fall_during_training(multi_subject):
    cfg, result = multi_subject
    for key in ("train.rsa_llv", "train.rsa_hlv", "train.bce"):
        hist = [v for _, v in metric_history(cfg, result.mlflow_run_id, key)]
        assert len(hist) == cfg.optim.epochs and np.mean(hist[-3:]) < 0.8 * np.mean(hist[:3]), (key, hist)
    assert {"semantic.map", "semantic.auc", "semantic.chance_map"} <= set(result.metrics), result.metrics


def _semantic_data(store_root: str, subjects: list[int], encoder_name: str):
    """Every trial of ``subjects`` in one process, as the training loop's batches carry them (betas zero-padded to
    the widest subject, CLIP-levels targets, categories), train trials in acquisition order, plus the DatasetInfo
    (voxel coordinates and ROI labels from the store)."""
    import io

    from PIL import Image

    from raydecode.data.store import open_store
    from raydecode.methods.spec import DatasetInfo
    from raydecode.nn.encoders import FrozenEncoder, encoder_config

    store = open_store(store_root)
    info = DatasetInfo(subjects, {s: store.manifest.subject(s).voxels for s in subjects},
                       coords={s: np.stack([store.voxel_table(s)[c].to_numpy() for c in "ijk"], 1) for s in subjects},
                       rois={s: store.voxel_table(s)["roi"].to_pylist() for s in subjects})
    stim: dict[str, list] = {}
    for shard in store.manifest.shards_of("stimuli"):
        for k, v in store.read_shard(shard, ["image_id", "image", "categories", "caption"]).to_pydict().items():
            stim.setdefault(k, []).extend(v)
    ids = stim["image_id"]
    rgb = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in stim["image"]])
    toks, pooled = FrozenEncoder(encoder_config(encoder_name)).encode(torch.from_numpy(rgb), stim["caption"])
    by_id = {i: n for n, i in enumerate(ids)}
    rows: dict[str, list] = {"train": [], "test": []}
    for shard in store.manifest.shards_of("trials", subjects=subjects):
        t = store.read_shard(shard, ["subject", "split", "betas", "image_id", "session", "run", "trial"]).to_pydict()
        for s, sp, b, i, *order in zip(t["subject"], t["split"], t["betas"], t["image_id"], t["session"], t["run"],
                                       t["trial"]):
            rows[sp].append((s, *order, np.pad(np.asarray(b, np.float32), (0, info.width - len(b))), i))
    data = {}
    for split, r in rows.items():
        r.sort(key=lambda x: x[:4])  # subject, then acquisition order
        pick = torch.tensor([by_id[x[5]] for x in r])
        data[split] = {"betas": torch.tensor(np.stack([x[4] for x in r])), "subject": torch.tensor([x[0] for x in r]),
                       "image_id": torch.tensor([x[5] for x in r]), "clip_tokens": toks[pick],
                       "clip_pooled": pooled[pick],
                       "categories": torch.tensor(np.stack([stim["categories"][by_id[x[5]]] for x in r]))}
    return info, data


def _fit(cfg, info, train: dict, steps: int, seed: int = 0):
    """CLIP-MUSED trained in one process (Adam at 1e-3, batches of 32) on ``train``'s rows."""
    from raydecode.methods.spec import get_method

    spec = get_method("clip_mused")
    torch.manual_seed(seed)
    model = spec.build_model(cfg, info)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    rows = {k: v for k, v in train.items() if k != "image_id"}
    for _ in range(steps):
        pick = torch.randint(len(rows["betas"]), (32,), generator=gen)
        loss, _ = spec.loss(model, {k: v[pick] for k, v in rows.items()}, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_the_orthogonality_term_separates_the_two_tokens(tiny_store):
    """In one process on 3 subjects' betas: with λ⊥ the low- and high-level tokens of test trials end far less
    aligned (|cos|) than with λ⊥ = 0."""
    from raydecode.methods.spec import get_method

    spec = get_method("clip_mused")
    info, data = _semantic_data(tiny_store, [1, 2, 3], spec.config("tiny").image_encoder)
    cos = {}
    for name, lam in (("orth", spec.config("tiny").lambda_orth), ("none", 0.0)):
        model = _fit(spec.config("tiny", {"lambda_orth": lam}), info, data["train"], 300)
        with torch.no_grad():
            out = spec.predict(model, data["test"])
        cos[name] = float(torch.nn.functional.cosine_similarity(out["low"], out["high"], dim=-1).abs().mean())
    print("|cos(z_llv, z_hlv)| on test trials:", cos)
    assert cos["orth"] <= 0.5 * cos["none"], cos


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory) -> str:
    """The demo's synthetic store (seed 0): 300 training images per subject, where categories can be decoded."""
    from raydecode.data.ingest import run_ingest, synthetic_plan

    out = tmp_path_factory.mktemp("stores") / "demo"
    run_ingest(synthetic_plan("demo", 0), str(out), progress=False)
    return str(out)


def test_multi_subject_training_helps_a_data_poor_subject(demo_store):
    """The paper's comparison on the demo store: subject 1 keeps only its first 180 train trials (of 900), subjects
    2-6 all of theirs. CLIP-MUSED trained on all six decodes subject 1's test images' categories clearly better
    than the same backbone trained on subject 1 alone (SS-ViT), and far above chance; both with the same recipe
    (ROI tokens on the template grid: README, CLIP-MUSED)."""
    from raydecode.evaluate.semantic import semantic_metrics
    from raydecode.methods.spec import get_method

    spec, subjects, poor, n = get_method("clip_mused"), [1, 2, 3, 4, 5, 6], 1, 180
    cfg = spec.config("demo")
    info, data = _semantic_data(demo_store, subjects, cfg.image_encoder)
    train = data["train"]
    own = torch.nonzero(train["subject"] == poor).flatten()
    keep = torch.cat([own[:n], torch.nonzero(train["subject"] != poor).flatten()])
    multi_rows = {k: v[keep] for k, v in train.items()}
    single_rows = {k: v[own[:n]] for k, v in train.items()}
    single_info = type(info)([poor], {poor: info.voxels[poor]}, coords={poor: info.coords[poor]},
                             rois={poor: info.rois[poor]})
    test = {k: v[data["test"]["subject"] == poor] for k, v in data["test"].items()}
    ids = sorted(set(test["image_id"].tolist()))  # repetitions averaged, as the suite's averaged protocol
    rows = [torch.nonzero(test["image_id"] == i).flatten() for i in ids]
    batch = {"betas": torch.stack([test["betas"][r].mean(0) for r in rows]), "subject": torch.full((len(ids),), poor)}
    labels = torch.stack([test["categories"][r[0]] for r in rows]).numpy()
    scores = {}
    for name, model_info_, rows_ in (("multi", info, multi_rows), ("single", single_info, single_rows)):
        model = _fit(cfg, model_info_, rows_, 2000)
        with torch.no_grad():
            scores[name] = semantic_metrics(spec.predict(model, batch)["logits"].numpy(), labels)
    summary = {k: round(v["map"], 3) for k, v in scores.items()}
    chance = scores["multi"]["chance_map"]
    print(f"subject {poor} with {n} train trials, test mAP:", summary, "chance", round(chance, 3))
    assert scores["multi"]["map"] >= scores["single"]["map"] + 0.04, summary
    assert scores["multi"]["map"] >= 2 * chance, (summary, chance)


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


def test_the_claims_category_score_is_the_models_logits_on_the_subjects_test_images(multi_subject, tiny_store):
    """``raydecode claims``' CLIP-MUSED score: subject 1's test images (repetitions averaged) in one order, the
    model's 80 category logits and the store's multi-hot labels; their mAP is the suite's (scikit-learn) and beats
    the chance mAP of random scores."""
    from raydecode.app.claims import category_scores
    from raydecode.config import ClaimsConfig
    from raydecode.evaluate.semantic import semantic_metrics

    cfg, result = multi_subject
    logits, labels = category_scores(result.artifacts["checkpoint"], ClaimsConfig(store=tiny_store, workdir=cfg.workdir), 1)
    assert logits.shape == labels.shape == (30, 80) and set(np.unique(labels)) <= {0, 1}
    m = semantic_metrics(logits, labels)
    assert m["map"] > m["chance_map"], m
