"""Per-subject PCA of each ROI group, fitted on a run's train trials only (CLIP-MUSED's ROI tokens).

:func:`fit_roi_pca` streams the selected train trials (``split == 'train'``, the run's ``data`` selection, so
``data.train_trials`` and ``data.sessions`` apply; test trials never enter) once through Ray Data and accumulates,
per subject and ROI group, the voxel sums and cross-products in float64. Each group's components are the top
eigenvectors of its covariance (sign fixed: the largest loading of each is positive); a group with fewer voxels
(or trials) than ``width`` gets zero rows past its rank, as the paper zero-pads lower-dimensional ROIs.

Tensors, keyed for :class:`~raydecode.methods.spec.FitsRoiPCA`'s ``attach``::

    <subject>.<group>.mean         (voxels_in_group,)          float32
    <subject>.<group>.components   (width, voxels_in_group)    float32

``group`` is the group's index in the method's ``groups``. Saved as safetensors beside the run
(:func:`write_pca` / :func:`load_pca`).
"""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from raydecode.config import DataSelection
from raydecode.data.pipeline import trials_dataset
from raydecode.errors import ConfigError
from raydecode.storage import S3Options, resolve

PCA_FILE = "roi_pca.safetensors"


def group_indices(labels: list[str], groups: list[list[str]], subject: int) -> list[np.ndarray]:
    """Per group, the indices of ``subject``'s voxels whose ROI label is in it (refused when a group is empty)."""
    labels = np.asarray(labels, dtype=object)
    out = []
    for group in groups:
        idx = np.flatnonzero(np.isin(labels, group))
        if not len(idx):
            raise ConfigError(f"model.roi_groups {group}: subject {subject} has no voxel with these ROI labels "
                              f"(its labels: {sorted(set(labels.tolist()))})")
        out.append(idx)
    return out


def top_components(total: np.ndarray, outer: np.ndarray, n: int, width: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean, (width, voxels) principal axes and the share of the variance they keep, from the sum ``total`` and
    cross-product sum ``outer`` of ``n`` rows: the covariance's eigenvectors by decreasing variance, rows past
    min(voxels, n - 1) zero."""
    mean = total / n
    cov = outer / n - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(values)[::-1]
    rank = min(len(mean), max(n - 1, 0), width)
    axes = vectors[:, order[:rank]].T
    axes *= np.sign(axes[np.arange(rank), np.abs(axes).argmax(1)])[:, None]
    comps = np.zeros((width, len(mean)))
    comps[:rank] = axes
    variance = float(values.sum())
    kept = float(values[order[:rank]].sum() / variance) if variance > 0 else 0.0
    return mean, comps, kept


class RoiMoments:
    """Per subject and group: the trial count, voxel sums and cross-product sums (float64), added batch by batch."""

    def __init__(self, rois: dict[int, list[str]], groups: list[list[str]]):
        self.index = {s: group_indices(labels, groups, s) for s, labels in rois.items()}
        self.sums = {s: [[0, np.zeros(len(i)), np.zeros((len(i), len(i)))] for i in idx]
                     for s, idx in self.index.items()}

    def add(self, subject: int, betas: np.ndarray) -> None:
        """``betas`` (trials, voxels of at least the subject's count; padding past it is ignored)."""
        betas = np.asarray(betas, np.float64)
        for acc, idx in zip(self.sums[subject], self.index[subject]):
            x = betas[:, idx]
            acc[0] += len(x)
            acc[1] += x.sum(0)
            acc[2] += x.T @ x

    def components(self, width: int) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, info = {}, {"width": width, "trials": {}, "explained": {}}
        for s, groups in sorted(self.sums.items()):
            n = groups[0][0]
            if n < 2:
                raise ConfigError(f"subject {s}: {n} train trials in the selection; the ROI PCA needs at least 2")
            info["trials"][s], info["explained"][s] = int(n), []
            for g, (count, total, outer) in enumerate(groups):
                mean, comps, kept = top_components(total, outer, count, width)
                info["explained"][s].append(kept)
                tensors[f"{s}.{g}.mean"] = torch.from_numpy(mean.astype(np.float32))
                tensors[f"{s}.{g}.components"] = torch.from_numpy(comps.astype(np.float32))
        return tensors, info


def fit_roi_pca_arrays(betas: dict[int, np.ndarray], rois: dict[int, list[str]], groups: list[list[str]],
                       width: int) -> dict[str, torch.Tensor]:
    """The PCA tensors from train betas already in memory (subject -> (trials, voxels))."""
    moments = RoiMoments({s: rois[s] for s in betas}, groups)
    for s, x in betas.items():
        moments.add(s, x)
    return moments.components(width)[0]


def fit_roi_pca(store_uri: str, selection: DataSelection, rois: dict[int, list[str]], groups: list[list[str]],
                width: int, s3: S3Options | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The PCA tensors of every selected subject and group, streamed from the store's train trials, and a summary
    (train trials per subject, the share of each group's variance the components keep)."""
    sel = selection.model_copy(update={"subjects": sorted(rois), "categories": False, "images": False,
                                       "embeddings": [], "shuffle": False})
    moments = RoiMoments(rois, groups)
    ds = trials_dataset(store_uri, "train", sel, s3).dataset.select_columns(["subject", "betas"])
    for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        betas = np.stack(batch["betas"]) if batch["betas"].dtype == object else batch["betas"]
        for s in np.unique(batch["subject"]):
            moments.add(int(s), betas[batch["subject"] == s])
    return moments.components(width)


def write_pca(uri: str, tensors: dict[str, torch.Tensor], s3: S3Options | None = None) -> str:
    loc = resolve(uri, s3).join(PCA_FILE)
    loc.write_bytes_atomic(save_safetensors({k: v.contiguous() for k, v in tensors.items()}))
    return loc.uri


def load_pca(uri: str, s3: S3Options | None = None) -> dict[str, torch.Tensor]:
    return load_safetensors(resolve(uri, s3).read_bytes())
