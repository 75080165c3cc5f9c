"""Retrieval (MindEye protocol): top-1 brain->image and image->brain by cosine similarity.

For each group (a subject's test images), ``candidates`` samples are drawn at
random ``draws`` times (MindEye: 300 of the 1000 shared images, 30 draws); within
a draw, a brain embedding is correct when its own image is the most similar of the
candidates (and vice versa). Groups with no more than ``candidates`` samples use
all of them in one exact draw. Chance is 1 / candidate-set size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _top1(brain: torch.Tensor, image: torch.Tensor) -> tuple[float, float]:
    sim = brain @ image.T
    target = torch.arange(len(sim), device=sim.device)
    return (sim.argmax(1) == target).float().mean().item(), (sim.argmax(0) == target).float().mean().item()


def retrieval_top1(brain: torch.Tensor, image: torch.Tensor, groups: torch.Tensor | np.ndarray | None = None,
                   candidates: int = 300, draws: int = 30, seed: int = 0) -> dict[str, float]:
    """``brain``/``image``: (N, ...) paired rows. Returns brain_to_image_top1, image_to_brain_top1, chance,
    candidates and 95% intervals over draws (``*_ci95``, half-widths) when draws are random."""
    brain = F.normalize(torch.as_tensor(brain).float().flatten(1), dim=-1)
    image = F.normalize(torch.as_tensor(image).float().flatten(1), dim=-1)
    groups = np.zeros(len(brain), np.int64) if groups is None else np.asarray(groups)
    rng = np.random.default_rng(seed)
    b2i, i2b, chance, sizes = [], [], [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) < 2:
            continue
        size = min(candidates, len(idx))
        n_draws = 1 if size == len(idx) else draws
        for _ in range(n_draws):
            pick = idx if n_draws == 1 else rng.choice(idx, size, replace=False)
            a, b = _top1(brain[pick], image[pick])
            b2i.append(a)
            i2b.append(b)
            chance.append(1.0 / size)
            sizes.append(size)
    if not b2i:
        raise ValueError("retrieval needs at least 2 samples in a group")
    out = {"brain_to_image_top1": float(np.mean(b2i)), "image_to_brain_top1": float(np.mean(i2b)),
           "chance": float(np.mean(chance)), "candidates": float(np.mean(sizes))}
    if len(b2i) > 1:
        out["brain_to_image_top1_ci95"] = float(1.96 * np.std(b2i, ddof=1) / np.sqrt(len(b2i)))
        out["image_to_brain_top1_ci95"] = float(1.96 * np.std(i2b, ddof=1) / np.sqrt(len(i2b)))
    return out
