"""MindLink on the tiny store through the generic paths: betas placed on each subject's 3D grid from the store's
voxel tables, one shared patch frame, no subject-specific parameters; it learns (masked-voxel reconstruction falls,
retrieval far above chance) and its size does not depend on the subjects."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import SOURCE_SUBJECTS, metric_history, tiny_config

from raydecode.modelinfo.info import model_info
from raydecode.train.launch import run_training

NEW_SUBJECTS = [4, 5, 6, 7, 8]  # never trained on: the shared model learns subjects 1-3


def test_the_parameter_count_does_not_depend_on_subjects_or_voxel_counts():
    counts = {tuple(v): model_info("mindlink", "tiny", voxels=v)["total"]
              for v in ([240], [240, 200, 230, 180], [240, 200, 230, 180, 190, 260, 170, 210], [5000, 90])}
    assert len(set(counts.values())) == 1, counts
    paper = model_info("mindlink", "paper", voxels=[15724, 14278, 15226, 13153])
    assert paper["total"] == model_info("mindlink", "paper", voxels=[15724])["total"]
    assert 100e6 < paper["total"] < 250e6, paper["total"]  # paper: ~159 M


def test_the_frame_is_fixed_at_launch_by_the_store_or_the_pretrained_model():
    """The box every subject is stretched onto: the largest ROI bounding box over the store's subjects (so a
    subject joining later fits unshrunk), or the pretrained model's box when adapting one; a box given is kept."""
    from raydecode.methods.mindlink import resolve_frame
    from raydecode.methods.spec import get_method

    cfg = get_method("mindlink").config("tiny", {})
    store = {1: np.array([[0, 0, 0], [9, 4, 2]]), 2: np.array([[3, 3, 3], [5, 12, 4]]), 7: np.array([[1, 1, 1]])}
    assert resolve_frame(cfg, store, None).box == (10, 10, 3)
    assert resolve_frame(cfg, store, {"frame": "box", "box": [6, 7, 8]}).box == (6, 7, 8)
    assert resolve_frame(cfg, store, {"frame": "corner", "box": None}).box == (10, 10, 3)
    assert resolve_frame(cfg.model_copy(update={"box": (20, 20, 20)}), store, None).box == (20, 20, 20)
    assert resolve_frame(cfg.model_copy(update={"frame": "corner"}), store, None).box is None


def _trials(store_root: str, subjects: list[int]):
    """Every trial of ``subjects`` in one process: the DatasetInfo (voxel coordinates from the store's voxel tables)
    and, per split, (betas zero-padded to the widest subject, subject labels)."""
    import torch

    from raydecode.data.store import open_store
    from raydecode.methods.spec import DatasetInfo

    store = open_store(store_root)
    coords = {s: np.stack([store.voxel_table(s)[c].to_numpy() for c in "ijk"], 1) for s in subjects}
    info = DatasetInfo(subjects, {s: store.manifest.subject(s).voxels for s in subjects}, coords=coords)
    rows = {"train": ([], []), "test": ([], [])}
    for shard in store.manifest.shards_of("trials", subjects=subjects):
        t = store.read_shard(shard, ["subject", "split", "betas"]).to_pydict()
        for subject, split, betas in zip(t["subject"], t["split"], t["betas"]):
            rows[split][0].append(np.pad(np.asarray(betas, np.float32), (0, info.width - len(betas))))
            rows[split][1].append(subject)
    return info, {k: (torch.tensor(np.stack(b)), torch.tensor(s)) for k, (b, s) in rows.items()}


def _image_tokens(store_root: str, encoder) -> dict:
    """image id -> its target tokens (flattened), every stimulus of the store through ``encoder``."""
    import io

    import torch
    from PIL import Image

    from raydecode.data.store import open_store

    store = open_store(store_root)
    stim = store.read_shard(store.manifest.shards_of("stimuli")[0]).to_pydict()
    rgb = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in stim["image"]])
    return dict(zip(stim["image_id"], encoder.encode(torch.from_numpy(rgb))[0].flatten(1)))


def _trial_tokens(store_root: str, subjects: list[int], encoder) -> dict:
    """Per split, the image tokens of every trial of ``subjects`` in :func:`_trials`' row order."""
    import torch

    from raydecode.data.store import open_store

    store, tokens = open_store(store_root), _image_tokens(store_root, encoder)
    ids = {"train": [], "test": []}
    for shard in store.manifest.shards_of("trials", subjects=subjects):
        t = store.read_shard(shard, ["split", "image_id"]).to_pydict()
        for split, i in zip(t["split"], t["image_id"]):
            ids[split].append(i)
    return {split: torch.stack([tokens[i] for i in v]) for split, v in ids.items()}


def _fit(spec, model, cfg, rows: dict, steps: int, batch: int, lr: float, weight_decay: float, seed: int):
    """The method's model trained in one process as the loop trains it: its param groups (a group's ``lr_scale``
    times ``lr``), AdamW, OneCycle, the method's loss with its schedule's progress; batches of ``batch`` rows drawn
    from ``rows`` (betas, subject, clip_tokens) by a generator seeded with ``seed``."""
    import torch

    from raydecode.nn.context import Progress

    groups = spec.param_groups(model, cfg, weight_decay)
    for g in groups:
        g["lr"] = lr * g.pop("lr_scale", 1.0)
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, [g["lr"] for g in groups], total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        pick = torch.randint(len(rows["betas"]), (batch,), generator=gen)
        loss, _ = spec.loss(model, {k: v[pick] for k, v in rows.items()}, Progress(0, 1, step, steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def test_masked_voxel_modelling_learns_the_volume(tiny_store):
    """The warm-up's objective alone (L_rec), in one process on the tiny store's betas: the masked patches' voxels
    are predicted from the visible ones below their variance, on held-out trials (a ridge map from half the voxels
    to the other half, an easier task, does 20 % better than the variance on this store). (Through Ray Train the
    warm-up of the runs below is too short on this store to show it: 150 trials per subject.)"""
    import torch

    from raydecode.methods.spec import get_method

    info, data = _trials(tiny_store, SOURCE_SUBJECTS[:3])
    spec = get_method("mindlink")
    cfg = spec.config("tiny", {"lambdas": (1.0, 0.0, 0.0, 0.0)})
    torch.manual_seed(0)
    model = spec.build_model(cfg, info)
    tokens = torch.zeros(1, *cfg.image_tokens).flatten(1)

    def rec(split: str) -> float:
        betas, subject = data[split]
        torch.manual_seed(1)  # the same masks before and after training
        with torch.no_grad():
            return model._loss({"betas": betas, "subject": subject, "clip_tokens": tokens.expand(len(betas), -1)},
                               model.layout.to_patches(betas, subject), None)[1]["rec"]

    model.eval()
    before = rec("test")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    betas, subject = data["train"]
    for _ in range(600):
        pick = torch.randint(len(betas), (32,), generator=gen)
        batch = {"betas": betas[pick], "subject": subject[pick], "clip_tokens": tokens.expand(32, -1)}
        loss, _ = spec.loss(model, batch, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = rec("test")
    print(f"masked voxels' error on the test trials: {before:.3f} -> {after:.3f}")
    assert after <= 0.95 * before, (before, after)  # measured 1.684 -> 1.540


@pytest.fixture(scope="module")
def mindlink_trained(tiny_store, ray_local, tmp_path_factory):
    work = tmp_path_factory.mktemp("mindlink")
    cfg = tiny_config(tiny_store, work, "mindlink", method="mindlink", data={"subjects": SOURCE_SUBJECTS[:3]},
                      optim={"epochs": 60, "lr": 3e-3}, deepspeed={"zero_stage": 2})
    return cfg, run_training(cfg, stage="pretrain")


def test_mindlink_learns_one_model_for_every_subject(mindlink_trained):
    cfg, result = mindlink_trained
    rec = metric_history(cfg, result.mlflow_run_id, "train.rec")
    # L_rec starts at the masked voxels' variance (the decoder's output layer starts at zero) and goes below it; only
    # a little on this store (150 trials per subject: 1.70 -> 1.64 measured; see README, MindLink)
    assert len(rec) == cfg.optim.epochs and min(v for _, v in rec[1:]) < rec[0][1], rec
    warm = metric_history(cfg, result.mlflow_run_id, "train.warmup")
    assert warm[0][1] == 1.0 and warm[-1][1] == 0.0  # the first third trains L_rec alone
    chance = result.metrics["retrieval.chance"]
    assert result.metrics["retrieval.brain_to_image_top1"] >= 3 * chance, result.metrics
    from raydecode.checkpoint import load_consolidated

    model = load_consolidated(result.artifacts["checkpoint"]).model  # the volume layout comes back from the config
    assert sorted(model.layout.subjects) == SOURCE_SUBJECTS[:3]
    assert result.metrics["retrieval.image_to_brain_top1"] >= 3 * chance, result.metrics


def _new_subject(store_root: str, subject: int, encoder) -> dict:
    """One subject read in one process: its DatasetInfo (voxel coordinates from the store), its train trials in
    acquisition order (betas, image tokens) and its test images with repetitions averaged (the suite's averaged
    protocol)."""
    import torch

    from raydecode.data.store import open_store
    from raydecode.methods.spec import DatasetInfo

    store, images = open_store(store_root), _image_tokens(store_root, encoder)
    coords = {subject: np.stack([store.voxel_table(subject)[c].to_numpy() for c in "ijk"], 1)}
    info = DatasetInfo([subject], {subject: store.manifest.subject(subject).voxels}, coords=coords)
    train, test = [], {}
    for shard in store.manifest.shards_of("trials", subjects=[subject]):
        t = store.read_shard(shard, ["image_id", "split", "betas", "session", "run", "trial"]).to_pydict()
        for i, split, b, *order in zip(t["image_id"], t["split"], t["betas"], t["session"], t["run"], t["trial"]):
            if split == "test":
                test.setdefault(i, []).append(np.asarray(b, np.float32))
            else:
                train.append((tuple(order), i, np.asarray(b, np.float32)))
    train.sort(key=lambda r: r[0])

    def tokens(ids):
        return torch.stack([images[i] for i in ids])

    ids = sorted(test)
    return {"info": info,
            "train": (torch.tensor(np.stack([r[2] for r in train])), tokens([r[1] for r in train])),
            "test": (torch.tensor(np.stack([np.mean(test[i], 0) for i in ids])), tokens(ids))}


def test_never_seen_subjects_are_decoded_with_no_training(mindlink_trained, tiny_store):
    """Subject-agnostic: the 3-subject model, rebuilt for subjects 4-8 from their voxel coordinates alone (every
    weight loads: none is per subject) and not trained on them, retrieves their test images well above chance; the
    same network with random weights does not. (Measured: 0.15 mean top-1 over 5 subjects x 2 directions, chance
    0.033.)"""
    import torch

    from raydecode.checkpoint import load_consolidated
    from raydecode.evaluate.retrieval import retrieval_top1
    from raydecode.methods.spec import get_method
    from raydecode.nn.encoders import FrozenEncoder, encoder_config

    _, result = mindlink_trained
    shared = load_consolidated(result.artifacts["checkpoint"]).model
    spec = get_method("mindlink")
    encoder = FrozenEncoder(encoder_config(shared.cfg.image_encoder))
    top1, chance = {"shared": [], "random": []}, []
    for subject in NEW_SUBJECTS:
        data = _new_subject(tiny_store, subject, encoder)
        betas, target = data["test"]
        for name in top1:
            torch.manual_seed(0)
            model = spec.build_model(shared.cfg, data["info"])
            if name == "shared":
                assert spec.load_pretrained(model, shared.state_dict()) == []  # nothing left at initialisation
            with torch.no_grad():
                brain = spec.predict(model.eval(), {"betas": betas,
                                                    "subject": torch.full((len(betas),), subject)})["brain"]
            r = retrieval_top1(brain, target, candidates=len(betas), draws=1)
            top1[name] += [r["brain_to_image_top1"], r["image_to_brain_top1"]]
            chance.append(r["chance"])
    chance = float(np.mean(chance))
    mean = {k: float(np.mean(v)) for k, v in top1.items()}
    print("never-seen subjects, mean top-1:", mean, "chance", chance)
    assert mean["shared"] >= 2 * chance and mean["shared"] >= mean["random"] + chance, mean


def test_a_new_subject_adapted_from_the_shared_model_beats_one_trained_from_scratch(mindlink_trained, tiny_store):
    """The paper's Table 3 claim: a never-seen subject fine-tuned from the 3-subject model decodes better than the
    same network trained from scratch on the same trials. Subjects 4-8, each subject's first 4, 8 and 16 train
    trials (acquisition order), the same recipe for both (every loss from the first step, AdamW + OneCycle at 1e-3,
    150 steps of 8), scored by two-way identification of the test images' tokens (chance 50 %), averaged over the
    five subjects. (Measured 79.7 / 81.7 / 84.3 against 69.6 / 75.8 / 78.3; the head start is nearly gone by 24-32
    trials, +1.7 / +1.0; with the frames only corner-aligned the shared model falls behind there: README, MindLink.)"""
    import torch

    from raydecode.checkpoint import load_consolidated
    from raydecode.evaluate.feature_metrics import two_way_identification
    from raydecode.methods.spec import get_method
    from raydecode.nn.encoders import FrozenEncoder, encoder_config

    _, result = mindlink_trained
    shared = load_consolidated(result.artifacts["checkpoint"]).model
    spec, cfg = get_method("mindlink"), shared.cfg.model_copy(update={"warmup_fraction": 0.0})
    encoder = FrozenEncoder(encoder_config(cfg.image_encoder))
    steps, batch, lr = 150, 8, 1e-3
    sizes = (4, 8, 16)  # of 150 train trials: the paper's 500 / 1,500 / 4,000 of ~27,000 are 2 / 6 / 15 %
    scores: dict[tuple[str, int], list[float]] = {}
    for subject in NEW_SUBJECTS:
        data = _new_subject(tiny_store, subject, encoder)
        for n in sizes:
            betas, tokens = (x[:n] for x in data["train"])
            for start in ("adapted", "scratch"):
                torch.manual_seed(1)
                model = spec.build_model(cfg, data["info"])
                if start == "adapted":
                    spec.load_pretrained(model, shared.state_dict())
                rows = {"betas": betas, "subject": torch.full((n,), subject), "clip_tokens": tokens}
                _fit(spec, model, cfg, rows, steps, batch, lr, weight_decay=0.01, seed=1)
                test_betas, test_tokens = data["test"]
                with torch.no_grad():
                    brain = spec.predict(model, {"betas": test_betas,
                                                        "subject": torch.full((len(test_betas),), subject)})["brain"]
                scores.setdefault((start, n), []).append(two_way_identification(brain, test_tokens))
    mean = {f"{start} {n}": round(float(np.mean(v)), 1) for (start, n), v in scores.items()}
    print("new subjects, two-way identification % (chance 50):", mean)
    for n in sizes:  # measured: +10.1 / +5.9 / +6.0 points (at 8, +4.1 to +7.2 over four runs of the fixture)
        assert mean[f"adapted {n}"] >= mean[f"scratch {n}"] + 2, mean


def subject_probe(model, data: dict) -> float:
    """A linear probe's accuracy at reading the subject from the pooled embeddings: logistic regression on
    standardised embeddings of every trial (train and test), 5-fold cross-validated."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from raydecode.methods.spec import get_method

    betas, subject = (torch.cat([data["train"][i], data["test"][i]]) for i in (0, 1))
    with torch.no_grad():
        emb = get_method("mindlink").predict(model.eval(), {"betas": betas, "subject": subject})["embedding"].numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    return float(cross_val_score(probe, emb, subject.numpy(), cv=5).mean())


def test_the_subject_adversary_hides_the_subject_without_losing_retrieval(mindlink_trained, tiny_store):
    """Trained with L_subj, the embeddings tell the subjects apart clearly less well than the same model's trained
    with λ2 = 0 (a linear probe fitted afterwards; chance 1/3), and both still identify the test images.

    In one process with fixed seeds (the test's Ray Train schedule: 420 steps, OneCycle to 3e-3, batches of 64,
    the subject classifier's group at its own learning rate), because between Ray Train runs the probe moves by
    up to 0.08 (0.53-0.62 with the adversary, 0.64-0.68 without), as much as the effect. Measured here: 0.54
    against 0.64, two-way identification of the test trials 82.7 against 84.7; with torch 2.14.1 and scikit-learn
    1.9.1 (a fresh install, 2026-12-05) 0.58 against 0.64, 80.7 against 83.0 (other seeds and weight decay:
    0.53-0.61 against 0.68-0.72); the paper's gradient reversal instead left 0.49-0.61 and lowered retrieval:
    README, MindLink. The Ray-trained model of this file (the adversary on) retrieves far above chance (above)."""
    import torch

    from raydecode.evaluate.feature_metrics import two_way_identification
    from raydecode.methods.spec import get_method
    from raydecode.nn.encoders import FrozenEncoder, encoder_config

    cfg, _ = mindlink_trained
    spec = get_method("mindlink")
    info, data = _trials(tiny_store, SOURCE_SUBJECTS[:3])
    encoder = FrozenEncoder(encoder_config(spec.config("tiny").image_encoder))
    tokens, steps = _trial_tokens(tiny_store, SOURCE_SUBJECTS[:3], encoder), 420
    probe, two_way = {}, {}
    for name, lambdas in (("adversary", (1.0, 1.0, 1.0, 1.0)), ("plain", (1.0, 0.0, 1.0, 1.0))):
        mcfg = spec.config("tiny", {"lambdas": lambdas})
        torch.manual_seed(0)
        model = spec.build_model(mcfg, info)
        betas, subject = data["train"]
        rows = {"betas": betas, "subject": subject, "clip_tokens": tokens["train"]}
        _fit(spec, model, mcfg, rows, steps, 64, 3e-3, weight_decay=cfg.optim.weight_decay, seed=0)
        probe[name] = subject_probe(model, data)
        with torch.no_grad():
            brain = spec.predict(model.eval(), {"betas": data["test"][0], "subject": data["test"][1]})["brain"]
        two_way[name] = two_way_identification(brain, tokens["test"])
    print("subject probe accuracy (chance 0.33):", probe, "two-way identification of test trials:", two_way)
    chance = 1 / 3
    # at least a sixth of what the probe reads above chance is gone (measured a fifth to a third)
    assert probe["adversary"] - chance <= 5 / 6 * (probe["plain"] - chance), probe
    assert probe["adversary"] <= probe["plain"] - 0.05, probe
    assert min(two_way.values()) >= 75 and two_way["adversary"] >= two_way["plain"] - 5, two_way


def test_new_subject_adaptation_is_a_sweep_over_the_sample_count(mindlink_trained, tmp_path):
    """The paper's Table 3 as a sweep: subject 4 (never seen) fine-tuned from the 3-subject model (every weight
    loads, none is per subject) on its first 16 / 120 train trials, one trial each, nothing promoted; with 120 it
    decodes the new subject far above chance, and the trial is placed in the pretrained model's frame (its box).
    (Adapted against scratch: the test above.)"""
    from mlflow.tracking import MlflowClient

    from raydecode.checkpoint import load_consolidated
    from raydecode.config import SweepConfig
    from raydecode.sweep import run_sweep

    cfg, result = mindlink_trained
    sweep = run_sweep(SweepConfig.model_validate({
        "store": cfg.store, "workdir": str(tmp_path), "method": "mindlink", "preset": "tiny",
        "run_name": "ml-new-subject", "init_from": result.artifacts["checkpoint"], "subjects": [4],
        "space": {"data.train_trials": {"grid": [16, 120]}}, "search": "grid", "promote": False,
        "metric": "retrieval.brain_to_image_top1", "tie_break": "retrieval.image_to_brain_top1",
        "data": {"categories": False, "read_cpus": 0.25},
        "model": {"warmup_fraction": 0.0},  # adapting: every loss from the first step
        "optim": {"epochs": 20, "lr": 1e-3, "batch_size": 8},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.25}, "deepspeed": {"zero_stage": 0}}))
    assert sweep.metrics["trials_ok"] == 2 and not any(k.startswith("raydecode-") for k in sweep.artifacts)
    client = MlflowClient(cfg.model_copy(update={"workdir": str(tmp_path)}).resolved_tracking_uri())
    parent = client.get_run(sweep.mlflow_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.mlflow_run_id}'")
    adapted = {int(r.data.params["data.train_trials"]): r.data for r in children}
    assert sorted(adapted) == [16, 120], adapted
    box = load_consolidated(result.artifacts["checkpoint"]).model.cfg.box  # the store's largest ROI bounding box
    assert box is not None and len(box) == 3
    for n, run in adapted.items():
        assert run.params["data.train_rows"] == str(n) and run.params["init_from"] == result.artifacts["checkpoint"]
        assert run.params["model.box"] == str(list(box))  # the new subject goes into the pretrained model's frame
    top1 = {n: run.metrics["retrieval.brain_to_image_top1"] for n, run in adapted.items()}
    print("new subject top-1 by training trials:", top1)
    assert top1[120] >= 3 * adapted[120].metrics["retrieval.chance"], top1


def test_mindlink_is_evaluated_registered_and_compared_beside_mindeye2(mindlink_trained, pretrained, tiny_store):
    """``raydecode evaluate`` with the IP-Adapter decoder (the projector's 16 tokens generate the images; random
    tiny weights, so the numbers are not the paper's: that all eight are computed per image is the claim), the
    registry's gate, and ``raydecode compare`` with a MindEye2 model evaluated in the same tracking store."""
    from raydecode import tracking
    from raydecode.config import CompareConfig, EvaluateConfig
    from raydecode.data.store import open_store
    from raydecode.evaluate.feature_metrics import SMALL_NETS
    from raydecode.evaluate.suite import run_compare, run_evaluate

    cfg, result = mindlink_trained
    common = dict(store=tiny_store, workdir=cfg.workdir, protocols=["averaged"], tsne=False, cpus_per_actor=0.5,
                  metric_nets=[n.model_dump(exclude_defaults=True) for n in SMALL_NETS],
                  reconstruct={"steps": 3, "max_images": 6, "grid_images": 6},
                  data={"read_cpus": 0.25})
    ev = run_evaluate(EvaluateConfig(model=result.artifacts["checkpoint"], **common,
                                     decoder={"kind": "ip-adapter", "preset": "tiny"}))
    m = ev.metrics
    assert m["retrieval.brain_to_image_top1"] >= 3 * m["retrieval.chance"], m
    assert m["recon.images"] == 6 and -1 <= m["recon.pixcorr"] <= 1 and 0 <= m["recon.ssim"] <= 1, m
    for k in ("alexnet2", "alexnet5", "inception", "clip", "effnet", "swav"):
        assert np.isfinite(m[f"recon.{k}"]), (k, m)
    assert os.path.getsize(ev.artifacts["reconstructions_averaged.png"]) > 0  # the grid: stimuli above, images below

    store = open_store(tiny_store)
    tracking.configure(cfg)
    decision = tracking.register_run(result.mlflow_run_id, result.artifacts["checkpoint"],
                                     "retrieval.brain_to_image_top1", "retrieval.image_to_brain_top1",
                                     store.test_set_digest(SOURCE_SUBJECTS[:3]), store.manifest_sha256(), s3=cfg.s3)
    assert decision.name.startswith("raydecode-mindlink") and decision.alias == tracking.CHAMPION, decision

    _, mindeye2 = pretrained
    run_evaluate(EvaluateConfig(model=mindeye2.artifacts["checkpoint"], **common))
    cmp_ = run_compare(CompareConfig(store=tiny_store, workdir=cfg.workdir,
                                     models=[result.artifacts["checkpoint"], mindeye2.artifacts["checkpoint"]]))
    table = open(cmp_.artifacts["table"]).read()
    assert result.artifacts["checkpoint"] in table and mindeye2.artifacts["checkpoint"] in table, table
    assert f"{result.artifacts['checkpoint']}/recon.pixcorr" in cmp_.metrics, cmp_.metrics


def test_the_claims_subject_probe_is_a_cross_validated_probe_of_the_test_embeddings(mindlink_trained, tiny_store):
    """``raydecode claims``' MindLink score: per test row (subject, image; repetitions averaged), whether a 5-fold
    cross-validated logistic-regression probe on the shared embedding reads the subject; recomputed here from the
    checkpoint, the store's test rows and scikit-learn."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from raydecode.app.claims import probe_correct
    from raydecode.config import ClaimsConfig, DataSelection
    from raydecode.data.pipeline import read_split
    from raydecode.inference import ModelRunner

    cfg, result = mindlink_trained
    ckpt, subjects = result.artifacts["checkpoint"], SOURCE_SUBJECTS[:3]
    correct = probe_correct(ckpt, ClaimsConfig(store=tiny_store, workdir=cfg.workdir, seed=3), subjects)
    rows = read_split(tiny_store, "test", DataSelection(subjects=subjects, categories=False, images=True))
    order = np.lexsort((rows["image_id"], rows["subject"]))
    rows = {k: v[order] for k, v in rows.items()}
    runner = ModelRunner.load(ckpt, store=tiny_store)
    emb = runner.predict(runner.batch(rows))["embedding"].numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    expected = cross_val_predict(probe, emb, rows["subject"], cv=StratifiedKFold(5, shuffle=True, random_state=3))
    assert len(correct) == 3 * 30 and np.array_equal(correct, (expected == rows["subject"]).astype(float))
