"""Torch parts for semantic decoding from ROI tokens (CLIP-MUSED, "CLIP-guided Multi-subject Visual Neural
Information Semantic Decoding"): the per-subject ROI PCA as a module (:class:`RoiPCA`), ROI tokens on a template
grid shared by all subjects (:class:`RoiTemplate`), representational similarity
matrices and the RSA loss (Eq. 10-11, :func:`rsa_loss`) and the orthogonality constraint (Eq. 15,
:func:`orthogonality`). Pure torch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def cosine_rsm(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, B): the cosine similarity between every pair of rows (each flattened)."""
    x = F.normalize(x.flatten(1).float(), dim=-1)
    return x @ x.T


def rsa_loss(brain: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """||M_feature - M_brain||_F^2 / B^2 between the two representations' cosine RSMs of one batch."""
    b = len(brain)
    return ((cosine_rsm(feature) - cosine_rsm(brain)) ** 2).sum() / b**2


def orthogonality(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """||z_llv z_hlv^T||_F^2 / B^2 (every pair of the batch's low- and high-level tokens)."""
    b = len(low)
    return ((low.float() @ high.float().T) ** 2).sum() / b**2


class RoiPCA(nn.Module):
    """Each subject's voxels, group by group (``index[s][g]``: voxel indices), centred and projected on that
    subject's principal axes: ``forward(betas (B, W), subject (B,)) -> (B, groups, width)``.

    The means and components are buffers (zero until :meth:`load` fills them from
    :func:`raydecode.data.pca.fit_roi_pca`), saved in checkpoints; the voxel indices are rebuilt from the
    ``DatasetInfo``'s ROI labels."""

    def __init__(self, index: dict[int, list[np.ndarray]], width: int):
        super().__init__()
        self.subjects, self.groups, self.width = sorted(index), len(next(iter(index.values()))), width
        for s, groups in index.items():
            for g, idx in enumerate(groups):
                self.register_buffer(self._name(s, g, "index"), torch.as_tensor(idx, dtype=torch.long),
                                     persistent=False)
                self.register_buffer(self._name(s, g, "mean"), torch.zeros(len(idx)))
                self.register_buffer(self._name(s, g, "components"), torch.zeros(width, len(idx)))

    @staticmethod
    def _name(subject: int, group: int, what: str) -> str:
        return f"s{subject}_g{group}_{what}"

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """``<subject>.<group>.mean`` / ``.components`` tensors (shapes checked) into the buffers."""
        for s in self.subjects:
            for g in range(self.groups):
                for what in ("mean", "components"):
                    key, buf = f"{s}.{g}.{what}", getattr(self, self._name(s, g, what))
                    if key not in tensors:
                        raise ValueError(f"ROI PCA: no {key!r} (subjects {self.subjects}, {self.groups} groups)")
                    if tuple(tensors[key].shape) != tuple(buf.shape):
                        raise ValueError(f"ROI PCA {key!r}: shape {tuple(tensors[key].shape)}, the model's is "
                                         f"{tuple(buf.shape)}")
                    buf.copy_(tensors[key])

    def forward(self, betas: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
        out = betas.new_zeros(len(betas), self.groups, self.width)
        for s in self.subjects:
            rows = (subject == s).nonzero().flatten()
            if not len(rows):
                continue
            x = betas[rows]
            for g in range(self.groups):
                idx = getattr(self, self._name(s, g, "index"))
                mean = getattr(self, self._name(s, g, "mean")).to(x.dtype)
                comps = getattr(self, self._name(s, g, "components")).to(x.dtype)
                out[rows, g] = (x[:, idx] - mean) @ comps.T
        return out


class RoiTemplate(nn.Module):
    """Each subject's voxels, group by group, averaged into the cells of one ``grid``^3 template shared by all
    subjects: ``forward(betas (B, W), subject (B,)) -> (B, groups, grid**3)``.

    A subject's voxel coordinates are mapped to the template by its ROI mask's bounding box (each axis to [0, 1],
    cut into ``grid`` cells), so the same token entry means the same relative place of the same ROI in every
    subject (no registration); cells where a subject's group has no voxel read 0. Unlike a per-subject PCA, whose
    axes differ from subject to subject, the entries line up across subjects, so shared weights can use what one
    subject taught them on another. Nothing is fitted: the cell of every voxel is rebuilt from the dataset info
    (non-persistent buffers)."""

    def __init__(self, coords: dict[int, np.ndarray], index: dict[int, list[np.ndarray]], grid: int):
        super().__init__()
        self.subjects, self.groups, self.grid = sorted(index), len(next(iter(index.values()))), grid
        self.width = grid**3
        dump = self.groups * self.width  # voxels outside every group land in one dropped slot
        for s in self.subjects:
            c = np.asarray(coords[s], np.float64)
            unit = (c - c.min(0)) / np.maximum(c.max(0) - c.min(0), 1)
            q = np.minimum((unit * grid).astype(np.int64), grid - 1)
            cell = (q[:, 0] * grid + q[:, 1]) * grid + q[:, 2]
            slot = np.full(len(c), dump, np.int64)
            for g, idx in enumerate(index[s]):
                slot[idx] = g * self.width + cell[idx]
            count = np.bincount(slot, minlength=dump + 1).astype(np.float32)
            self.register_buffer(f"s{s}_slot", torch.as_tensor(slot), persistent=False)
            self.register_buffer(f"s{s}_inv", torch.as_tensor(1.0 / np.maximum(count, 1.0)), persistent=False)

    def forward(self, betas: torch.Tensor, subject: torch.Tensor) -> torch.Tensor:
        out = betas.new_zeros(len(betas), self.groups * self.width + 1)
        for s in self.subjects:
            rows = (subject == s).nonzero().flatten()
            if not len(rows):
                continue
            slot, inv = getattr(self, f"s{s}_slot"), getattr(self, f"s{s}_inv").to(betas.dtype)
            cells = betas.new_zeros(len(rows), len(inv)).index_add_(1, slot, betas[rows][:, : len(slot)])
            out[rows] = cells * inv
        return out[:, :-1].view(len(betas), self.groups, self.width)
