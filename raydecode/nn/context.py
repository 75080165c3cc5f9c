"""What a model is built for (:class:`DatasetInfo`) and where its training is (:class:`Progress`): the two values
every method's builder and loss receive."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data it is built for."""

    subjects: list[int]
    voxels: dict[int, int]  # voxels per subject (betas are zero-padded to max(voxels))
    n_classes: int = 80
    tr_s: float | None = None  # repetition time of the store's time series (None: the store has none)
    # each subject's voxel coordinates (n_voxels, 3) on its grid (i, j, k of the store's voxel table), for methods
    # that read the 3D volume (the capability ReadsVolume); None for the others
    coords: dict[int, np.ndarray] | None = None
    # each subject's voxel ROI labels (the store's voxel table ``roi``), for methods that read ROIs (FitsRoiPCA)
    rois: dict[int, list[str]] | None = None

    @property
    def width(self) -> int:
        return max(self.voxels.values())

    def to_dict(self) -> dict:
        out = {"subjects": list(self.subjects), "voxels": {str(k): v for k, v in self.voxels.items()},
               "n_classes": self.n_classes, "tr_s": self.tr_s}
        if self.coords is not None:  # i0, j0, k0, i1, ... per subject (a checkpoint rebuilds its volume layout)
            out["coords"] = {str(k): np.asarray(v).reshape(-1).tolist() for k, v in self.coords.items()}
        if self.rois is not None:
            out["rois"] = {str(k): list(v) for k, v in self.rois.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        coords, rois = d.get("coords"), d.get("rois")
        return cls(list(d["subjects"]), {int(k): int(v) for k, v in d["voxels"].items()}, int(d.get("n_classes", 80)),
                   d.get("tr_s"), {int(k): np.asarray(v, np.int64).reshape(-1, 3) for k, v in coords.items()}
                   if coords is not None else None,
                   {int(k): list(v) for k, v in rois.items()} if rois is not None else None)


@dataclass(frozen=True)
class Progress:
    """Where training is, for schedules (e.g. BiMixCo for the first third, then SoftCLIP)."""

    epoch: int
    epochs: int
    step: int
    total_steps: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))
