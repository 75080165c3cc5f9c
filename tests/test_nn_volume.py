"""The 3D-volume torch parts (raydecode.nn.volume): the shared patch frame, positional encodings, gradient reversal,
the Perceiver resampler and MindLink's token-level alignment loss. CPU, seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raydecode.nn.volume import (
    GradientReversal,
    PerceiverResampler,
    SubjectAdversary,
    VolumeLayout,
    local_infonce,
    positional_encoding_3d,
)


def roi(rng: np.random.Generator, box: tuple[int, int, int], offset: tuple[int, int, int], n: int) -> np.ndarray:
    """(n, 3) distinct int16 voxel coordinates inside ``box``, shifted by ``offset`` (a subject's native grid)."""
    flat = rng.choice(int(np.prod(box)), size=n, replace=False)
    return (np.stack(np.unravel_index(flat, box), axis=1) + np.array(offset)).astype(np.int16)


@pytest.fixture
def coords() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {1: roi(rng, (23, 17, 30), (5, 7, 3), 900), 2: roi(rng, (19, 25, 12), (40, 2, 9), 600)}


def mixed_batch(layout: VolumeLayout, subjects: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) betas, zero beyond each row's voxel count, and (B,) subject numbers."""
    g = torch.Generator().manual_seed(seed)
    betas = torch.zeros(len(subjects), layout.width)
    for r, s in enumerate(subjects):
        betas[r, : layout.n_voxels[s]] = torch.randn(layout.n_voxels[s], generator=g)
    return betas, torch.tensor(subjects)


def dense_patches(layout: VolumeLayout, coords: np.ndarray, values: torch.Tensor) -> torch.Tensor:
    """The reference: a dense shared-frame volume (bounding-box corner at 0), cut into patches, kept ones only."""
    p = layout.patch_size
    vol = torch.zeros(layout.shape)
    c = torch.as_tensor(coords.astype(np.int64) - coords.min(0))
    vol[c[:, 0], c[:, 1], c[:, 2]] = values
    gx, gy, gz = layout.grid
    cubes = vol.reshape(gx, p, gy, p, gz, p).permute(0, 2, 4, 1, 3, 5).reshape(gx * gy * gz, p**3)
    return cubes[layout.patch_ids]


def test_mixed_batch_round_trips_and_matches_the_dense_volume(coords):
    layout = VolumeLayout(coords, patch_size=10)
    assert layout.width == 900 and layout.n_voxels == {1: 900, 2: 600}
    assert all(s % 10 == 0 for s in layout.shape) and layout.grid == (3, 3, 3)  # max extent 23/25/30, rounded up
    betas, subjects = mixed_batch(layout, [2, 1, 1, 2, 1])
    patches = layout.to_patches(betas, subjects)
    assert patches.shape == (5, layout.n_patches, 1000)
    for r, s in enumerate(subjects.tolist()):
        n = layout.n_voxels[s]
        assert torch.equal(patches[r], dense_patches(layout, coords[s], betas[r, :n]))
    assert torch.equal(layout.from_patches(patches, subjects), betas)
    # one subject for the whole batch; extra zero-padding columns are ignored
    wide = torch.nn.functional.pad(betas[subjects == 2], (0, 37))
    assert torch.equal(layout.to_patches(wide, 2), patches[subjects == 2])
    assert torch.equal(layout.from_patches(patches[subjects == 2], 2), betas[subjects == 2, :600])


def test_patches_keep_gradients_and_dtype(coords):
    layout = VolumeLayout(coords, patch_size=10)
    betas, subjects = mixed_batch(layout, [1, 2])
    betas.requires_grad_(True)
    w = torch.randn(2, layout.n_patches, 1000)
    (layout.to_patches(betas, subjects) * w).sum().backward()
    assert torch.equal(betas.grad, layout.from_patches(w, subjects))
    assert layout.to_patches(betas.detach().half(), subjects).dtype == torch.float16


def test_patch_set_is_shared_and_every_kept_patch_holds_a_voxel(coords):
    layout = VolumeLayout(coords, patch_size=10)
    held = layout.voxel_mask(1).any(-1) | layout.voxel_mask(2).any(-1)
    assert held.all() and layout.voxel_mask(torch.tensor([1, 2])).shape == (2, layout.n_patches, 1000)
    assert torch.equal(layout.patch_ids, layout.patch_ids.sort().values) and len(layout.patch_ids.unique()) == len(
        layout.patch_ids)
    # a third subject, on another native grid, whose voxels fall inside subject 1's patches: the same patch set
    rng = np.random.default_rng(1)
    c1 = coords[1].astype(np.int64)
    keep = np.union1d(rng.choice(len(c1), 300, replace=False), c1.argmin(0))  # keep the bounding-box corner
    third = {**coords, 3: (c1[keep] + np.array([60, -4, 11])).astype(np.int16)}
    bigger = VolumeLayout(third, patch_size=10)
    assert bigger.n_patches == layout.n_patches and torch.equal(bigger.patch_ids, layout.patch_ids)
    added = layout.with_subject(3, third[3])
    assert torch.equal(added.patch_ids, layout.patch_ids)
    betas, subjects = mixed_batch(bigger, [3, 1, 2])
    assert torch.equal(added.to_patches(betas, subjects), bigger.to_patches(betas, subjects))


def test_new_subject_outside_the_patches_is_refused_or_dropped(coords):
    layout = VolumeLayout(coords, patch_size=10)
    far = np.array([[0, 0, 0], [29, 29, 29], [0, 29, 0]])
    with pytest.raises(ValueError, match="subject 9"):
        layout.with_subject(9, far)
    dropped = layout.with_subject(9, far, drop_outside=True)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    back = dropped.from_patches(dropped.to_patches(x, 9), 9)
    kept = dropped.voxel_mask(9).sum().item()
    assert back.shape == (1, 3) and 0 < kept < 3
    assert (back == x).sum().item() == kept and (back == 0).sum().item() == 3 - kept


def test_layout_has_no_parameters_and_round_trips_through_json(coords):
    layout = VolumeLayout(coords, patch_size=10)
    assert list(layout.parameters()) == [] and layout.state_dict() == {}
    d = json.loads(json.dumps(layout.to_dict()))
    again = VolumeLayout.from_dict(d)
    assert again.to_dict() == layout.to_dict()
    betas, subjects = mixed_batch(layout, [1, 2, 2])
    assert torch.equal(again.to_patches(betas, subjects), layout.to_patches(betas, subjects))
    assert torch.equal(again.patch_centers(), layout.patch_centers())


def test_layout_refuses_bad_input(coords):
    with pytest.raises(ValueError, match="duplicate"):
        VolumeLayout({1: np.array([[0, 0, 0], [0, 0, 0]])})
    with pytest.raises(ValueError, match="subject 4"):
        VolumeLayout({4: np.zeros((5, 2), dtype=np.int16)})
    layout = VolumeLayout(coords, patch_size=10)
    with pytest.raises(ValueError, match=r"\[7\]"):
        layout.to_patches(torch.zeros(2, 900), torch.tensor([1, 7]))
    with pytest.raises(ValueError, match="900"):
        layout.to_patches(torch.zeros(2, 800), torch.tensor([1, 2]))


def test_positional_encodings_are_distinct_per_patch(coords):
    layout = VolumeLayout(coords, patch_size=5)
    centers = layout.patch_centers()
    assert centers.shape == (layout.n_patches, 3)
    pe = positional_encoding_3d(centers, 48)
    assert pe.shape == (layout.n_patches, 48)
    dist = torch.cdist(pe, pe) + torch.eye(len(pe))
    assert dist.min() > 1e-3
    with pytest.raises(ValueError, match="dim=10"):
        positional_encoding_3d(centers, 10)


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(4, 3)
    y = GradientReversal.apply(x, 0.5)
    assert torch.equal(y, x)
    (grad,) = torch.autograd.grad((y * w).sum(), x)
    assert torch.allclose(grad, -0.5 * w)


def _adversary_grads(mode: str, z: torch.Tensor, labels: torch.Tensor):
    torch.manual_seed(0)
    adv = SubjectAdversary(6, 8, layers=2, mode=mode)
    z = z.clone().requires_grad_(True)
    term, ce = adv(z, labels, torch.tensor([0, 2, 5]))
    term.backward()
    return adv, z.grad, ce


def test_the_subject_adversary_reverses_or_confuses():
    """Reversal: the embedding's gradient is minus the classifier's own. Confusion: the classifier's weights get only
    its cross-entropy's gradient, the embedding only the pull to a uniform output over the present classes."""
    gen = torch.Generator().manual_seed(1)
    z, labels = torch.randn(16, 6, generator=gen), torch.tensor([0, 2, 5, 0] * 4)
    rev, z_rev, ce_rev = _adversary_grads("reversal", z, labels)
    plain = z.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(rev.logits(plain), labels).backward()
    assert torch.allclose(z_rev, -plain.grad, atol=1e-6)

    conf, z_conf, ce = _adversary_grads("confusion", z, labels)
    assert torch.allclose(ce, ce_rev)  # the same classifier (same seed), the same cross-entropy logged
    head = {n: p.grad.clone() for n, p in conf.named_parameters()}
    for p in conf.parameters():
        p.grad = None
    torch.nn.functional.cross_entropy(conf.logits(z), labels).backward()
    for n, p in conf.named_parameters():  # the blinding term adds nothing to the classifier's gradient
        assert torch.allclose(head[n], p.grad, atol=1e-6), n
    # descending the embedding's gradient makes the output over present classes more uniform
    def spread(x):
        return torch.log_softmax(conf.logits(x)[:, [0, 2, 5]], -1).mean().neg()
    with torch.no_grad():
        assert spread(z - 0.05 * z_conf / z_conf.norm()) < spread(z)
    assert [n for n, _ in conf.named_parameters()] == ["weight0", "bias0", "weight1", "bias1"]
    with pytest.raises(ValueError, match="'blind'"):
        SubjectAdversary(6, 8, mode="blind")


def test_resampler_output_shape_and_size_do_not_depend_on_input_tokens():
    torch.manual_seed(0)
    model = PerceiverResampler(dim_in=12, dim=32, depth=2, n_latents=4, heads=2, dim_head=8)
    count = sum(p.numel() for p in model.parameters())
    for n in (1, 7, 50):
        x = torch.randn(3, n, 12, requires_grad=True)
        out = model(x)
        assert out.shape == (3, 4, 32)
        out.sum().backward()
        assert x.grad.abs().sum() > 0
    assert sum(p.numel() for p in model.parameters()) == count
    assert PerceiverResampler(12, 32, 2, 4, 2, dim_head=8, dim_out=16)(torch.randn(2, 5, 12)).shape == (2, 4, 16)


@pytest.mark.parametrize("negatives", ["batch", "tokens"])
def test_local_infonce_prefers_matched_tokens_and_passes_gradients(negatives):
    torch.manual_seed(0)
    image = torch.randn(8, 16, 32)
    brain = (image + 0.3 * torch.randn_like(image)).requires_grad_(True)
    matched = local_infonce(brain, image, temperature=0.1, negatives=negatives)
    shuffled = local_infonce(brain, image[torch.randperm(8)], temperature=0.1, negatives=negatives)
    assert matched.ndim == 0 and matched < shuffled
    matched.backward()
    assert brain.grad is not None and torch.isfinite(brain.grad).all() and brain.grad.abs().sum() > 0
    image = image.requires_grad_(True)
    local_infonce(torch.randn(8, 16, 32), image, negatives=negatives).backward()
    assert image.grad.abs().sum() > 0


def test_local_infonce_refuses_mismatched_tokens():
    with pytest.raises(ValueError, match="image tokens"):
        local_infonce(torch.randn(2, 4, 8), torch.randn(3, 4, 8))
    with pytest.raises(ValueError, match="negatives"):
        local_infonce(torch.randn(2, 4, 8), torch.randn(2, 4, 8), negatives="all")


def frame_positions(layout: VolumeLayout, subject: int) -> torch.Tensor:
    """(n_voxels, 3) each voxel's place in the shared frame, read back from the layout's scatter index."""
    p, index = layout.patch_size, layout.index(subject)
    corner = layout.patch_centers()[index // p**3] - p / 2
    r = index % p**3
    return (corner + torch.stack([r // p**2, (r // p) % p, r % p], 1)).long()


def test_the_box_frame_stretches_every_subject_onto_one_box(coords):
    """frame 'box': each subject's ROI bounding box spans the same voxels, so the same patch means the same
    relative place (both boxes' extremes land on the box's faces); a subject added later is placed exactly as it
    would have been from the start, the round trip stays exact, and a box too small to keep voxels apart is
    refused, naming the subject."""
    box = (30, 30, 30)  # larger than both bounding boxes (23 x 17 x 30 and 19 x 25 x 12) on every axis
    layout = VolumeLayout(coords, patch_size=10, box=box)
    assert layout.shape == box and layout.box == box
    for s in coords:
        pos = frame_positions(layout, s)
        assert pos.min(0).values.tolist() == [0, 0, 0] and pos.max(0).values.tolist() == [29, 29, 29], s
    corner = VolumeLayout(coords, patch_size=10)
    assert frame_positions(corner, 2).max(0).values.tolist() == [18, 24, 11]  # unstretched: its own extent
    betas, subjects = mixed_batch(layout, [1, 2, 2, 1])
    assert torch.equal(layout.from_patches(layout.to_patches(betas, subjects), subjects), betas)
    again = VolumeLayout.from_dict(json.loads(json.dumps(layout.to_dict())))
    assert again.box == box and torch.equal(again.to_patches(betas, subjects), layout.to_patches(betas, subjects))
    later = VolumeLayout({1: coords[1]}, patch_size=10, box=box).with_subject(2, coords[2], drop_outside=True)
    kept = later.index(2) < later.n_patches * 1000
    assert kept.sum() > 0 and torch.equal(frame_positions(later, 2)[kept], frame_positions(layout, 2)[kept])
    with pytest.raises(ValueError, match="subject 1: its ROI bounding box .* does not fit"):
        VolumeLayout(coords, patch_size=10, box=(8, 8, 8))
