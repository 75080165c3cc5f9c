"""Duala's pieces without Ray: its losses, the perturbation, LoRA wiring on a MindEye2 checkpoint, class statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydecode.data.schema import primary_category
from raydecode.data.stats import class_statistics
from raydecode.methods.duala import primary_class, relational_consistency, semantic_alignment
from raydecode.methods.spec import DatasetInfo, Progress, get_method


def _unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_semantic_alignment_is_zero_only_when_positives_beat_negatives_by_the_margin():
    labels = torch.tensor([0, 0, 1, 1])
    # classes 90 degrees apart, members of a class 10 degrees apart: cos(a, p) - cos(a, n) = 0.98 > margin
    a = math.radians(10)
    tight = _unit([1, 0], [math.cos(a), math.sin(a)], [0, 1], [math.sin(a), math.cos(a)])
    assert semantic_alignment(tight, labels, margin=0.2) == 0
    # the same classes 20 degrees apart: the hardest negative is closer than the margin allows
    b = math.radians(20)
    loose = _unit([1, 0], [math.cos(a), math.sin(a)], [math.cos(b), math.sin(b)], [math.cos(b + a), math.sin(b + a)])
    loss = semantic_alignment(loose, labels, margin=0.2)
    assert loss > 0
    # a larger margin asks for more; unlabelled samples (-1) take no part
    assert semantic_alignment(loose, labels, margin=0.5) > loss
    assert semantic_alignment(tight, torch.tensor([-1, -1, -1, -1]), margin=0.2) == 0
    # the bank supplies the positive an anchor lacks in its batch
    single = _unit([1, 0], [0, 1])
    near, far = _unit([math.cos(b), math.sin(b)]), _unit([math.cos(4 * b), math.sin(4 * b)])
    assert semantic_alignment(single, torch.tensor([0, 1]), margin=0.2) == 0  # no positive anywhere: no term
    assert semantic_alignment(single, torch.tensor([0, 1]), near, torch.tensor([0]), margin=0.2) == 0
    assert semantic_alignment(single, torch.tensor([0, 1]), far, torch.tensor([0]), margin=0.2) > 0


def test_relational_consistency_is_zero_for_equal_matrices_and_ignores_absent_classes():
    torch.manual_seed(0)
    n_classes, dim = 5, 16
    centres = F.normalize(torch.randn(n_classes, dim), dim=-1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])  # class 3 has 1 sample, class 4 none
    emb = centres[labels]
    unit = F.normalize(centres, dim=-1)
    reference = unit @ unit.T
    assert relational_consistency(emb, labels, reference, min_samples=3) == pytest.approx(0, abs=1e-6)
    # entries of classes absent here (3: too few samples, 4: none) or NaN in the reference are ignored
    changed = reference.clone()
    changed[3, :] = changed[:, 3] = 0.9
    changed[4, :] = changed[:, 4] = float("nan")
    changed[0, 0] = -5.0  # the diagonal is not a class pair
    assert relational_consistency(emb, labels, changed, min_samples=3) == pytest.approx(0, abs=1e-6)
    # a difference on a pair both sides have counts
    changed[0, 1] = changed[1, 0] = reference[0, 1] - 0.5
    assert relational_consistency(emb, labels, changed, min_samples=3) == pytest.approx(2 * 0.25 / 6, rel=1e-4)


def test_primary_class_matches_the_store_rule():
    cats = np.zeros((4, 80), dtype=np.uint8)
    cats[0, [3, 7]] = 1
    cats[1, 0] = 1
    cats[3, 79] = 1
    assert primary_category(cats).tolist() == [3, 0, -1, 79]
    assert primary_class(torch.from_numpy(cats)).tolist() == [3, 0, -1, 79]


def _tiny(spec_name="duala", **over):
    spec = get_method(spec_name)
    cfg = spec.config("tiny", over)
    info = DatasetInfo([8], {8: 40}, n_classes=80)
    return spec, cfg, info


def test_perturbation_keeps_class_means_in_expectation_and_follows_source_deviations():
    spec, cfg, info = _tiny(perturb_p=1.0, perturb_scale=0.5)
    torch.manual_seed(0)
    model = spec.build_model(cfg, info)
    scale = torch.zeros(80, cfg.hidden)
    scale[2] = 0.05
    model.deviation_scale.copy_(scale)
    z = torch.randn(1, cfg.hidden).repeat(20000, 1)
    out = model.perturb(z, torch.full((20000,), 2))
    assert (out - z).abs().mean() > 0.01  # it does perturb
    assert torch.allclose(out.mean(0), z[0], atol=0.02 * z[0].norm().item() / math.sqrt(cfg.hidden) + 0.01)
    # no source deviation for class 5, no class for -1: untouched
    assert torch.equal(model.perturb(z[:10], torch.full((10,), 5)), z[:10])
    assert torch.equal(model.perturb(z[:10], torch.full((10,), -1)), z[:10])


def test_duala_starts_from_mindeye2_with_frozen_weights_and_trains_lora_and_the_new_ridge():
    me2 = get_method("mindeye2")
    spec, cfg, info = _tiny()
    torch.manual_seed(0)
    source = me2.build_model(me2.config("tiny"), DatasetInfo([1, 2], {1: 30, 2: 20}))
    model = spec.build_model(cfg, info)
    fresh = spec.load_pretrained(model, source.state_dict())
    assert "mindeye2" in spec.init_methods
    assert torch.equal(model.backbone.blocks[0][1].base_layer.weight, source.backbone.blocks[0][1].weight)
    src = source.state_dict()
    assert all(torch.equal(v, src[k]) for k, v in model.state_dict().items() if k.startswith("prior."))
    assert any("lora_A" in k for k in fresh) and "ridge.maps.8.weight" in fresh
    assert not any(k.startswith("prior.") for k in fresh)  # every prior weight came from the checkpoint
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("ridge.") for n in trainable)
    assert any(n.startswith("to_tokens.lora_") for n in trainable) and any(n.startswith("projector.") for n in trainable)

    n, d = cfg.clip_tokens
    cats = torch.zeros(12, 80, dtype=torch.uint8)
    cats[torch.arange(12), torch.arange(12) % 3] = 1
    batch = {"betas": torch.randn(12, 40), "subject": torch.full((12,), 8), "categories": cats,
             "clip_tokens": torch.randn(12, n * d), "vae_tokens": torch.randn(12, *cfg.vae_latents),
             "cnx_tokens": torch.randn(12, cfg.lowlevel_size ** 2, cfg.aux_dim()),
             "cnx_aug_tokens": torch.randn(12, cfg.lowlevel_size ** 2, cfg.aux_dim())}
    model.reference.copy_(torch.eye(80))
    loss, parts = spec.loss(model, batch, Progress(0, 1, 0, 10))  # BiMixCo phase
    loss.backward()
    assert {"loss_sa", "loss_rc", "loss_clip", "loss_prior"} <= set(parts)
    assert model.ridge.maps["8"].weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0][1].lora_B["default"].weight.grad is not None
    assert model.backbone.blocks[0][1].base_layer.weight.grad is None
    assert len(model.bank_labels) == 12
    # plain LoRA: no class terms
    spec2, cfg2, _ = _tiny(ssp=False, sdp=False)
    assert spec2.statistics(cfg2) == [] and spec.statistics(cfg) == ["latent", "hidden"]
    _, parts2 = spec2.loss(spec2.build_model(cfg2, info), batch, Progress(0, 1, 9, 10))
    assert "loss_sa" not in parts2


def test_class_statistics_from_sums():
    # 2 subjects x 3 classes x 2 dims; subject 1 lacks class 2
    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]],
                           [[0.8, 0.2], [0.0, 1.0], [9.0, 9.0]]])
    counts = torch.tensor([[4.0, 3.0, 5.0], [3.0, 6.0, 1.0]])
    st = class_statistics(protos * counts[..., None], counts, min_samples=3)
    assert st["valid"].tolist() == [[True, True, True], [True, True, False]]
    assert torch.allclose(st["prototypes"][0], protos[0])
    assert torch.isnan(st["similarity"][1, 2]).all() and torch.isnan(st["similarity"][1, :, 2]).all()
    cos01 = [0.0, float(F.cosine_similarity(protos[1, 0], protos[1, 1], dim=0))]
    assert st["reference"][0, 1].item() == pytest.approx(sum(cos01) / 2, abs=1e-6)
    assert st["reference"][0, 2].item() == pytest.approx(float(F.cosine_similarity(protos[0, 0], protos[0, 2], dim=0)))
    assert torch.allclose(st["class_mean"][0], (protos[0, 0] + protos[1, 0]) / 2)
    assert torch.allclose(st["class_mean"][2], protos[0, 2])  # the only subject with the class
    assert torch.allclose(st["deviation"][1, 2], torch.zeros(2))
    assert torch.allclose(st["deviation_scale"][0], torch.tensor([0.1, 0.1]))


# -- leave-one-subject-out -----------------------------------------------------------------


def test_pretraining_holds_out_a_subject_and_adapting_to_a_seen_one_is_refused(pretrained, tiny_store, tmp_path):
    """Duala's protocol: the new subject's model never saw it. A pretrain with ``hold_out`` reads every other
    subject; an adaptation whose ``init_from`` was trained on its subject is refused, naming both, so the target's
    own ridge map and statistics can never come from the pretrained model; continued training says so explicitly,
    and even then the source statistics leave the run's subject out."""
    from conftest import SOURCE_SUBJECTS, tiny_config

    from raydecode.errors import ConfigError
    from raydecode.sweep import SWEEP_ONLY, check_sweep, trial_config
    from raydecode.train.launch import plan_training

    plan = plan_training(tiny_config(tiny_store, tmp_path, "wo7", data={"subjects": None, "hold_out": [7]}))
    assert plan.info.subjects == [1, 2, 3, 4, 5, 6, 8]
    with pytest.raises(ConfigError, match="both name subject 7"):
        plan_training(tiny_config(tiny_store, tmp_path, "x", data={"subjects": [6, 7], "hold_out": [7]}))

    _, pre = pretrained  # trained on SOURCE_SUBJECTS: 7 and 8 never seen
    ckpt = pre.artifacts["checkpoint"]
    adapt = dict(method="duala", init_from=ckpt, data={"subjects": [3], "sessions": [1]},
                 optim={"epochs": 1, "batch_size": 8}, scaling={"num_workers": 1})
    with pytest.raises(ConfigError) as err:
        plan_training(tiny_config(tiny_store, tmp_path, "leak", **adapt))
    assert f"init_from {ckpt}: trained on subject 3" in str(err.value) and "hold_out: [3]" in str(err.value)
    continued = plan_training(tiny_config(tiny_store, tmp_path, "cont", allow_seen_subjects=True, **adapt))
    assert continued.source_subjects == [s for s in SOURCE_SUBJECTS if s != 3]
    new = plan_training(tiny_config(tiny_store, tmp_path, "new", **{**adapt, "data": {"subjects": [8], "sessions": [1]}}))
    assert new.source_subjects == SOURCE_SUBJECTS and new.init_state_uri == ckpt

    # a sweep names one leave-one-out model per subject: {subject} is the trial's
    from raydecode.config import SweepConfig

    template = ckpt.replace("pretrain-tiny", "pretrain-wo{subject:02d}")
    base = SweepConfig.model_validate({"store": tiny_store, "workdir": str(tmp_path), "preset": "tiny",
                                       "init_from": template, "subjects": [7, 8]}).model_dump(mode="json", exclude=SWEEP_ONLY)
    assert trial_config(base, {"subject": 8}, "t").init_from == ckpt.replace("pretrain-tiny", "pretrain-wo08")
    leaky = SweepConfig.model_validate({"store": tiny_store, "workdir": str(tmp_path), "preset": "tiny",
                                        "init_from": ckpt, "subjects": [8, 2], "data": {"sessions": [1]},
                                        "optim": {"batch_size": 8}})
    with pytest.raises(ConfigError, match="trained on subject 2"):
        check_sweep(leaky)  # refused before any trial starts
