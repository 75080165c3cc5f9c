"""MethodSpec registry, MindEye2 pieces and `model-info` (no Ray)."""

from __future__ import annotations

import json
import resource

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydecode.errors import ConfigError
from raydecode.methods.spec import DatasetInfo, Progress, get_method
from raydecode.modelinfo.info import model_info
from raydecode.nn.mindeye2 import cosine_anneal, mixco, mixco_nce, soft_clip_loss


def test_model_info_paper_preset_builds_on_meta_without_memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info = model_info("mindeye2", "paper")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert info["device"] == "meta"
    assert info["total"] > 2e9  # ~2.6 B parameters: 8 ridge maps, 4096 x (256 x 1664) token map, prior ...
    # the paper sizes, module by module
    assert info["modules"]["to_tokens"]["total"] == 4096 * 256 * 1664 + 256 * 1664
    assert info["modules"]["ridge"]["total"] == sum((v + 1) * 4096 for v in info["voxels"])
    assert info["trainable"] == info["total"]
    assert grown_mb < 500, f"building on meta grew RSS by {grown_mb:.0f} MB"


def test_model_info_cli_json(capsys):
    from raydecode.app.cli import main

    assert main(["model-info", "--method", "mindeye2", "--preset", "tiny", "--voxels", "100", "120", "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[: out.rindex("}") + 1])
    assert info["voxels"] == [100, 120] and info["modules"]["ridge"]["total"] == (100 + 1) * 128 + (120 + 1) * 128
    assert main(["model-info", "--method", "nope"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: method 'nope'")
    # time-series methods are sized from NSD's TR: Dynadiff's paper brain module for 15,724 voxels
    assert main(["model-info", "--method", "dynadiff", "--voxels", "15724", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[: out.rindex("}") + 1])["modules"]["brain"]["total"] == 345_394_775


def test_unknown_preset_and_override_are_refused():
    spec = get_method("mindeye2")
    with pytest.raises(ConfigError, match="preset 'huge'"):
        spec.config("huge")
    with pytest.raises(ConfigError, match="unknown key 'hiden'"):
        spec.config("tiny", {"hiden": 3})


def test_contrastive_losses_prefer_the_true_pairing():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(16, 64), dim=-1)
    shuffled = image[torch.randperm(16)]
    assert soft_clip_loss(image, image, 0.05) < soft_clip_loss(shuffled, image, 0.05)
    lam = torch.ones(16)
    perm = torch.arange(16).roll(1)  # unmixed (lam 1): all the weight on the own image
    assert mixco_nce(image, image, 0.05, perm, lam) < mixco_nce(shuffled, image, 0.05, perm, lam)


def test_bimixco_targets_are_the_references_also_when_a_sample_is_its_own_partner():
    """MindEye2's utils.mixco_nce: ``probs = diag(betas); probs[arange, perm] = 1 - betas`` (the partner's weight
    overwrites the diagonal where ``perm[i] == i``), both directions averaged."""
    torch.manual_seed(1)
    brain, image = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    perm = torch.tensor([0, 2, 1, 3, 5, 4, 7, 6])  # samples 0 and 3 are their own partners
    lam = torch.tensor([0.3, 0.6, 0.9, 1.0, 0.2, 0.5, 0.7, 0.4])
    logits = brain @ image.T / 0.05
    probs = np.zeros((8, 8))
    for i in range(8):
        probs[i, i] = lam[i]
        probs[i, perm[i]] = 1 - lam[i]
    probs = torch.from_numpy(probs).float()
    expected = (-(logits.log_softmax(-1) * probs).sum(-1).mean() - (logits.T.log_softmax(-1) * probs.T).sum(-1).mean()) / 2
    assert mixco_nce(brain, image, 0.05, perm, lam).item() == pytest.approx(expected.item(), rel=1e-6)
    assert cosine_anneal(0.004, 0.0075, 0) == pytest.approx(0.004)
    assert cosine_anneal(0.004, 0.0075, 1) == pytest.approx(0.0075)


def test_mixco_mixes_only_within_a_subject():
    betas = torch.randn(12, 5)
    subject = torch.tensor([1] * 6 + [2] * 6)
    _, perm, lam = mixco(betas, subject, 0.15, 1.0)
    assert torch.equal(subject[perm], subject)
    assert ((lam > 0) & (lam <= 1)).all()


def test_mindeye2_tiny_forward_backward_and_ridge_per_subject():
    spec = get_method("mindeye2")
    cfg = spec.config("tiny")
    info = DatasetInfo([1, 2], {1: 30, 2: 20})
    torch.manual_seed(0)
    model = spec.build_model(cfg, info)
    n, d = cfg.clip_tokens
    batch = {
        "betas": torch.randn(6, 30), "subject": torch.tensor([1, 1, 1, 2, 2, 2]),
        "clip_tokens": torch.randn(6, n * d), "vae_tokens": torch.randn(6, *cfg.vae_latents),
        "cnx_tokens": torch.randn(6, cfg.lowlevel_size ** 2, cfg.aux_dim()),
        "cnx_aug_tokens": torch.randn(6, cfg.lowlevel_size ** 2, cfg.aux_dim()),
    }
    batch["betas"][3:, 20:] = 0  # subject 2 has 20 voxels: its padding must not matter
    loss, parts = spec.loss(model, batch, Progress(0, 1, 0, 10))
    loss.backward()
    assert {"loss_clip", "loss_prior", "loss_blur", "loss_aux"} <= set(parts)
    assert model.ridge.maps["1"].weight.grad.abs().sum() > 0
    assert model.ridge.maps["2"].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        p1 = spec.predict(model, batch)["brain"]
        batch["betas"][3:, 20:] = 99.0
        p2 = spec.predict(model, batch)["brain"]
    assert torch.allclose(p1, p2)
    with torch.no_grad():  # a batch of the narrower subject alone, padded to its own width (evaluating one subject)
        alone = spec.predict(model, {"betas": batch["betas"][3:, :20], "subject": batch["subject"][3:]})["brain"]
    assert torch.allclose(alone, p1[3:], atol=1e-6)
    samples = model.prior.sample(model.encode(batch["betas"], batch["subject"])[2], steps=3)
    assert samples.shape == (6, n, d) and torch.isfinite(samples).all()


def test_methods_are_found_by_file_name_and_a_name_is_registered_once():
    import dataclasses

    from raydecode.methods.spec import get_method, methods, register

    assert {"mindeye2", "duala", "dynadiff"} <= set(methods()) and "spec" not in methods()
    spec = get_method("mindeye2")
    assert register(spec) is spec  # the same spec again (a module imported twice) is harmless
    with pytest.raises(ValueError, match="method 'mindeye2' is registered twice"):
        register(dataclasses.replace(spec))
    with pytest.raises(ConfigError, match="method 'nope': allowed values: .*mindeye2"):
        get_method("nope")


def test_the_prior_drops_its_image_input_while_training_and_samples_without_guidance_by_default():
    """MindEye2's prior (DALLE2-pytorch's): the noised image is swapped for a learned null with
    ``prior_image_drop`` (0.2) as the brain condition is with ``prior_cond_drop``; sampling uses cond_scale 1 (one
    conditional pass per step); other guidance values mix in the pass with both nulled."""
    from raydecode.nn.mindeye2 import DiffusionPrior, MindEye2Config

    cfg = MindEye2Config()
    assert (cfg.prior_cond_drop, cfg.prior_image_drop, cfg.prior_guidance, cfg.blurry_dropout) == (0.2, 0.2, 1.0, 0.3)
    torch.manual_seed(0)
    prior = DiffusionPrior(tokens=4, width=8, depth=1, heads=2, timesteps=10)
    cond, target = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    prior.loss(cond, target, cond_drop=0.0, image_drop=1.0).backward()
    assert prior.null_image.grad.abs().sum() > 0 and prior.null_cond.grad.abs().sum() == 0
    prior.zero_grad(set_to_none=True)
    prior.loss(cond, target, cond_drop=0.0, image_drop=0.0).backward()
    assert prior.null_image.grad.abs().sum() == 0
    calls = []
    prior.register_forward_hook(lambda m, i, o: calls.append(1))
    noise = torch.randn(3, 4, 8)
    plain = prior.sample(cond, steps=4, noise=noise)
    assert len(calls) == 4
    guided = prior.sample(cond, steps=4, guidance=3.0, noise=noise)
    assert len(calls) == 4 + 8 and not torch.allclose(plain, guided)


def test_mindeye2_averages_its_outputs_over_an_images_repetitions_as_its_reference():
    """With ``betas_repeats`` (the averaged test split of MindEye2's columns) every prediction is the mean of the
    three repetitions' predictions, not the prediction of the averaged betas (the backbone is nonlinear)."""
    spec = get_method("mindeye2")
    info = DatasetInfo([1], {1: 20})
    torch.manual_seed(0)
    model = spec.build_model(spec.config("tiny"), info).eval()
    reps = torch.randn(4, 3, 20)
    subject = torch.ones(4, dtype=torch.long)
    with torch.no_grad():
        averaged_outputs = spec.predict(model, {"betas": reps.mean(1), "betas_repeats": reps, "subject": subject})
        each = [spec.predict(model, {"betas": reps[:, r], "subject": subject}) for r in range(3)]
        of_mean = spec.predict(model, {"betas": reps.mean(1), "subject": subject})
    for key in ("brain", "backbone", "lowlevel_latents"):
        assert torch.allclose(averaged_outputs[key], torch.stack([e[key] for e in each]).mean(0), atol=1e-5)
    assert not torch.allclose(averaged_outputs["brain"], of_mean["brain"], atol=1e-4)
    assert "betas_repeats" in spec.columns and "betas_repeats" in get_method("duala").columns
