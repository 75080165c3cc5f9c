"""Torch parts for semantic decoding from ROI tokens (CLIP-MUSED, "CLIP-guided Multi-subject Visual Neural
Information Semantic Decoding"): the per-subject ROI PCA as a module (:class:`RoiPCA`), representational similarity
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
