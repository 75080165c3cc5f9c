"""The evaluation suite's metrics on constructed inputs: PixCorr / SSIM (against scikit-image), the retrieval
protocol with a known answer, the single-trial protocol's draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydecode.evaluate.images import pixcorr, reconstruction_metrics, ssim
from raydecode.evaluate.retrieval import retrieval_top1


def _images(n: int, size: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, size // 8, size // 8, 3))
    smooth = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def test_identical_images_score_one_and_unrelated_ones_near_zero():
    a, b = _images(6), _images(6, seed=1)
    assert reconstruction_metrics(a, a) == pytest.approx({"pixcorr": 1.0, "ssim": 1.0}, abs=1e-6)
    assert reconstruction_metrics(a, a, size=425) == pytest.approx({"pixcorr": 1.0, "ssim": 1.0}, abs=1e-6)
    assert abs(pixcorr(a, b).mean()) < 0.2 and ssim(a, b).mean() < 0.3
    noisy = np.clip(a.astype(int) + np.random.default_rng(2).integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    assert 0.3 < pixcorr(a, noisy).mean() < 1 and ssim(a, b).mean() < ssim(a, noisy).mean() < 1


def test_ssim_agrees_with_scikit_image():
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    a, b = _images(4, 48), _images(4, 48, seed=5)
    ours = ssim(a, b)
    ref = [structural_similarity(rgb2gray(x), rgb2gray(y), gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=1.0) for x, y in zip(a, b)]
    assert ours == pytest.approx(ref, abs=1e-3)
    pc = pixcorr(a, b)
    assert pc == pytest.approx([np.corrcoef(x.ravel() / 255.0, y.ravel() / 255.0)[0, 1] for x, y in zip(a, b)],
                               abs=1e-5)


def test_retrieval_protocol_has_a_known_answer():
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.normal(size=(400, 32)), dtype=torch.float32)
    perfect = retrieval_top1(image, image, candidates=300, draws=30)
    assert perfect["brain_to_image_top1"] == perfect["image_to_brain_top1"] == 1.0
    assert perfect["chance"] == pytest.approx(1 / 300) and perfect["candidates"] == 300
    assert perfect["brain_to_image_top1_ci95"] == 0.0
    shuffled = retrieval_top1(image[torch.randperm(400)], image, candidates=300, draws=30)
    assert shuffled["brain_to_image_top1"] < 0.02 and shuffled["image_to_brain_top1"] < 0.02
    noisy = retrieval_top1(image + 1.2 * torch.randn(400, 32), image, candidates=300, draws=30)
    assert 0.05 < noisy["brain_to_image_top1"] < 1 and noisy["brain_to_image_top1_ci95"] > 0
    # groups: each subject's rows retrieve among their own; groups no larger than the candidate set are exact
    groups = np.repeat([1, 2], 200)
    both = retrieval_top1(image, image[torch.cat([torch.arange(200), torch.arange(200, 400).roll(1)])], groups)
    assert both["brain_to_image_top1"] == pytest.approx(0.5) and both["candidates"] == 200


def test_single_trial_protocol_draws_one_presentation_per_image(tiny_store):
    from raydecode.config import DataSelection
    from raydecode.data.pipeline import read_split

    sel = DataSelection(subjects=[1], categories=False, average_test_repeats=False)
    every = read_split(tiny_store, "test", sel)
    one = read_split(tiny_store, "test", sel.model_copy(update={"single_test_trial_seed": 0}))
    again = read_split(tiny_store, "test", sel.model_copy(update={"single_test_trial_seed": 0}))
    other = read_split(tiny_store, "test", sel.model_copy(update={"single_test_trial_seed": 1}))
    ids = np.unique(every["image_id"])
    assert sorted(one["image_id"]) == sorted(ids)  # one row per test image
    for a, b in zip((one, one), (again, other)):
        assert set(map(tuple, np.stack([a["image_id"], a["repetition"]], 1))) <= \
            set(map(tuple, np.stack([every["image_id"], every["repetition"]], 1)))
    assert np.array_equal(one["betas"], again["betas"])  # the draw is fixed by the seed
    assert (one["repetition"][np.argsort(one["image_id"])] != other["repetition"][np.argsort(other["image_id"])]).any()
    # a drawn row is a real presentation, not an average
    first = np.flatnonzero((every["image_id"] == one["image_id"][0]) & (every["repetition"] == one["repetition"][0]))
    assert np.array_equal(every["betas"][first[0]], one["betas"][0])
