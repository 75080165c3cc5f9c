"""MindEye2's auxiliary low-level target: the ConvNeXt network and its checkpoint format, the blur augmentation,
the soft contrastive loss, and the train loop's per-step augmented view."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydecode.errors import ConfigError
from raydecode.methods.spec import DatasetInfo, Progress, get_method
from raydecode.nn.convnext import ARCHS, MEAN, STD, ConvNeXt, ConvNeXtTarget, blur_augment, soft_cont_loss
from raydecode.nn.encoders import EncoderConfig, FrozenEncoder
from raydecode.nn.targets import BatchPreparer
from raydecode.runtime import seeded


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_the_backbone_is_convnext_as_timm_builds_it():
    """Same weights in timm's ConvNeXt (an independent implementation; its final norm comes after pooling, the
    reference's per token) give the same tokens."""
    from timm.models.convnext import ConvNeXt as TimmConvNeXt

    a = dataclasses.replace(ARCHS["demo"], stem=4)  # timm keeps a 32-px stride whatever the stem: the reference's
    with seeded(1):
        ref = TimmConvNeXt(depths=a.depths, dims=a.dims, patch_size=a.stem, ls_init_value=None, num_classes=0).eval()
    ours = ConvNeXt(a).eval()
    theirs = ref.state_dict()
    mapped = {}
    for k in ours.state_dict():
        parts = k.split(".")
        if parts[0] == "downsample_layers":
            i, j = int(parts[1]), parts[2]
            key = f"stem.{j}" if i == 0 else f"stages.{i}.downsample.{j}"
            mapped[k] = theirs[f"{key}.{parts[3]}"]
        elif parts[0] == "stages":
            name = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2"}[parts[3]]
            mapped[k] = theirs[f"stages.{parts[1]}.blocks.{parts[2]}.{name}.{parts[4]}"]
        else:  # the final LayerNorm: random affine, so that it is checked too
            mapped[k] = torch.randn(a.dims[-1])
    ours.load_state_dict(mapped)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = F.layer_norm(ref.forward_features(x).flatten(2).transpose(1, 2), (a.dims[-1],),
                            mapped["norm.weight"], mapped["norm.bias"], 1e-6)
        got = ours(x)
    assert got.shape == (2, 4, a.dims[-1])  # 64 px / 32: a 2 x 2 grid
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_the_reference_checkpoint_loads_and_bad_files_are_refused(tmp_path):
    """The released file's layout: a torch pickle {"model": state_dict (keys under "module."), "args": Namespace,
    ...}, with entries the network does not use; written here at the tiny widths."""
    with seeded(3):
        net = ConvNeXtTarget(ARCHS["tiny"]).eval()
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    state["module.backbone.head.weight"] = torch.randn(10, 32)  # a classifier the target does not use
    path = tmp_path / "convnext_xlarge_alpha0.75_fullckpt.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="convnext_xlarge", lr=4e-3), "epoch": 99}, path)

    cfg = EncoderConfig(name="cnx", kind="convnext", arch="tiny", image_size=32, weights=str(path))
    enc = FrozenEncoder(cfg)
    images = _images(3)
    tokens, pooled = enc.encode(images)
    x = images.permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = net(x)
    assert tokens.shape == (3, 4, 32) and enc.tokens_shape == (4, 32)
    torch.testing.assert_close(tokens, want)
    torch.testing.assert_close(pooled, want.mean(1))
    assert not torch.allclose(tokens, FrozenEncoder(cfg.model_copy(update={"weights": None})).encode(images)[0])

    del state["module.maps_projector.6.weight"]
    torch.save({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(ConfigError, match=r"partial.pth lacks 1 weights .*'maps_projector.6.weight'"):
        FrozenEncoder(cfg.model_copy(update={"weights": str(tmp_path / "partial.pth")}))
    with pytest.raises(ConfigError, match=r"convnext_xlarge_alpha0.75_fullckpt.pth: backbone.* has shape .*wrong arch"):
        FrozenEncoder(cfg.model_copy(update={"arch": "demo", "image_size": 64}))
    with pytest.raises(ConfigError, match=r"encoder 'convnext-xl-mindeye2' needs `weights`"):
        FrozenEncoder(EncoderConfig(name="convnext-xl-mindeye2", kind="convnext", arch="xlarge"))


def test_soft_cont_loss_is_soft_cross_entropy_both_ways():
    torch.manual_seed(0)
    s, t, a = (F.normalize(torch.randn(12, 8), dim=-1) for _ in range(3))
    tt, st = t @ a.T / 0.2, s @ a.T / 0.2
    want = (F.cross_entropy(st, tt.softmax(-1)) + F.cross_entropy(st.T, tt.T.softmax(-1))) / 2
    torch.testing.assert_close(soft_cont_loss(s, t, a, 0.2), want)
    # the student that matches the teacher scores lower than a random one
    assert soft_cont_loss(t, t, a, 0.2) < soft_cont_loss(s, t, a, 0.2)


def test_blur_augment_draws_per_image_and_keeps_the_pixel_range():
    x = torch.rand(1, 3, 32, 32).expand(6, -1, -1, -1)
    out = blur_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert len({round(float((o - x[0]).abs().mean()), 6) for o in out}) == 6  # six different draws
    again = blur_augment(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)  # a seeded generator reproduces them
    # every draw crops 90 % of the area and resizes back: never the identity
    assert all((o - x[0]).abs().mean() > 1e-3 for o in out)


def test_the_train_loop_adds_a_fresh_augmented_view_every_step(tiny_store):
    """BatchPreparer: the clean ConvNeXt tokens are cached per image, the augmented ones drawn again every step;
    prediction (training=False) never builds the encoder."""
    from raydecode.data.store import open_store

    store = open_store(tiny_store)
    ids = torch.tensor(store.read_shard(store.manifest.shards_of("stimuli")[0])["image_id"].to_pylist()[:6])
    targets = {"cnx": {"encoder": "convnext-tiny", "source": "compute"}}
    prep = BatchPreparer(targets, torch.device("cpu"), torch.float32, tiny_store, None)
    b1, b2 = prep({"image_id": ids}), prep({"image_id": ids})
    assert b1["cnx_tokens"].shape == b1["cnx_aug_tokens"].shape == (6, 4, 32)
    torch.testing.assert_close(b1["cnx_tokens"], b2["cnx_tokens"])
    assert not torch.allclose(b1["cnx_aug_tokens"], b2["cnx_aug_tokens"])
    assert "cnx_aug_tokens" not in prep({"image_id": ids}, augment=False)
    pred = BatchPreparer(targets, torch.device("cpu"), torch.float32, tiny_store, None, training=False)
    assert not pred.augmented and pred.cache is None and set(pred({"image_id": ids})) == {"image_id"}


def test_the_auxiliary_head_learns_the_convnext_tokens(tiny_store):
    """MindEye2's low-level branch, trained on the aux loss alone with the loop's targets: the loss falls and the
    head's tokens come to identify their own image's ConvNeXt tokens among the batch's."""
    from raydecode.data.store import open_store

    spec = get_method("mindeye2")
    cfg = spec.config("tiny").model_copy(update={"blurry_dropout": 0.0})
    store = open_store(tiny_store)
    ids = torch.tensor(store.read_shard(store.manifest.shards_of("stimuli")[0])["image_id"].to_pylist()[:16])
    prep = BatchPreparer({"cnx": {"encoder": cfg.aux_encoder, "source": "compute"}}, torch.device("cpu"),
                         torch.float32, tiny_store, None)
    torch.manual_seed(0)
    model = spec.build_model(cfg, DatasetInfo([1], {1: 40}))
    h = torch.randn(16, cfg.hidden)  # one backbone output per image
    opt = torch.optim.Adam(model.lowlevel.parameters(), lr=3e-3)

    def rows(x):
        return F.normalize(x.reshape(-1, x.shape[-1]), dim=-1)

    excess = []  # the loss above its floor: the soft labels' entropy, reached when the student is the teacher
    for _ in range(60):
        batch = prep({"image_id": ids})
        teacher, aug = rows(batch["cnx_tokens"]), rows(batch["cnx_aug_tokens"])
        loss = soft_cont_loss(rows(model.lowlevel(h)[1]), teacher, aug, cfg.aux_temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        excess.append(float(loss.detach() - soft_cont_loss(teacher, teacher, aug, cfg.aux_temperature)))
    assert np.mean(excess[-10:]) < 0.5 * np.mean(excess[:5])
    with torch.no_grad():
        pred = F.normalize(model.lowlevel(h)[1].flatten(1), dim=-1)
        true = F.normalize(prep({"image_id": ids})["cnx_tokens"].flatten(1), dim=-1)
    top1 = float(((pred @ true.T).argmax(1) == torch.arange(16)).float().mean())
    assert top1 >= 0.5  # chance 1/16

    # and the full objective reports it
    full = {"betas": torch.randn(4, 40), "subject": torch.ones(4, dtype=torch.long),
            "clip_tokens": torch.randn(4, cfg.clip_tokens[0] * cfg.clip_tokens[1]),
            "vae_tokens": torch.randn(4, *cfg.vae_latents), **{k: v[:4] for k, v in prep({"image_id": ids}).items()
                                                                if k.startswith("cnx_")}}
    _, parts = spec.loss(model, full, Progress(0, 1, 0, 10))
    assert parts["loss_aux"] > 0


def test_the_aux_encoder_must_match_the_low_level_grid():
    spec = get_method("mindeye2")
    with pytest.raises(ConfigError, match=r"'convnext-demo' gives a 4 x 4 token grid at 64 px; lowlevel_size is 2"):
        spec.config("tiny", {"aux_encoder": "convnext-demo"})
    with pytest.raises(ConfigError, match=r"aux_encoder 'vae-tiny' is a vae encoder"):
        spec.config("tiny", {"aux_encoder": "vae-tiny"})
