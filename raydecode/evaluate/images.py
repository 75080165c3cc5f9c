"""Reconstruction metrics and figures: PixCorr, SSIM, the stimulus-vs-reconstruction grid, time-resolved curves.

PixCorr and SSIM follow MindEye's protocol: both images resized to a common size
(``size``; 425 px in MindEye, 224 px in Dynadiff), PixCorr the Pearson correlation
of all pixel values of an image pair, SSIM on grayscale with a Gaussian window
(sigma 1.5, sample covariance off, data range 1: scikit-image's
``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``),
each averaged over the test images. The other metrics of the literature
(AlexNet, Inception, CLIP, EfficientNet, SwAV) belong with the evaluation suite.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F


def _float_images(images: np.ndarray | torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, size, size) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def pixcorr(stimuli, recons, size: int | None = None) -> np.ndarray:
    """Per-pair Pearson correlation of the pixel values (B,)."""
    a = _float_images(stimuli, size).flatten(1).double()
    b = _float_images(recons, size or stimuli.shape[1]).flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return F.cosine_similarity(a, b, dim=1, eps=1e-12).float().numpy()


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2125 * x[:, 0] + 0.7154 * x[:, 1] + 0.0721 * x[:, 2]).unsqueeze(1)  # skimage rgb2gray weights


def ssim(stimuli, recons, size: int | None = None, sigma: float = 1.5) -> np.ndarray:
    """Per-pair grayscale SSIM (B,), Gaussian window, population covariances, data range 1."""
    a = _gray(_float_images(stimuli, size)).double()
    b = _gray(_float_images(recons, size or stimuli.shape[1])).double()
    radius = int(3.5 * sigma + 0.5)  # scikit-image's truncate=3.5
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    g = g / g.sum()

    def blur(x):  # separable Gaussian filter, reflect-padded like scipy's default mode
        x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, g.view(1, 1, 1, -1))
        return F.conv2d(x, g.view(1, 1, -1, 1))

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    crop = radius  # scikit-image averages away from the borders
    return s[..., crop:-crop, crop:-crop].mean((1, 2, 3)).float().numpy()


def reconstruction_metrics(stimuli, recons, size: int | None = None) -> dict[str, float]:
    return {"pixcorr": float(np.mean(pixcorr(stimuli, recons, size))), "ssim": float(np.mean(ssim(stimuli, recons, size)))}


# -- figures -------------------------------------------------------------------------------


def grid_png(stimuli: np.ndarray, recons: np.ndarray, path: str, labels: list[str] | None = None,
             columns: int = 8) -> str:
    """Pairs of rows: stimuli above their reconstructions, ``columns`` images per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(stimuli)
    cols = min(columns, n)
    blocks = math.ceil(n / cols)
    fig, axes = plt.subplots(2 * blocks, cols, figsize=(1.4 * cols, 2.9 * blocks), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = 2 * (i // cols), i % cols
        axes[r, c].imshow(stimuli[i])
        axes[r + 1, c].imshow(recons[i])
        if labels:
            axes[r, c].set_title(labels[i], fontsize=7)
    for r in range(blocks):
        axes[2 * r, 0].text(-0.1, 0.5, "seen", transform=axes[2 * r, 0].transAxes, ha="right", va="center")
        axes[2 * r + 1, 0].text(-0.1, 0.5, "decoded", transform=axes[2 * r + 1, 0].transAxes, ha="right",
                                va="center")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def time_curve_png(curves: dict[str, list[tuple[float, float]]], metric: str, path: str,
                   stimulus_s: float = 3.0) -> str:
    """A metric against the window's end time (s after onset), one line per model (e.g. general / specialized);
    the stimulus presentation shaded (Dynadiff Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.axvspan(0, stimulus_s, color="0.85", label="stimulus on screen")
    for label, points in curves.items():
        xs, ys = zip(*sorted(points)) if points else ((), ())
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(xlabel="window end after image onset (s)", ylabel=metric, title="time-resolved decoding")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
