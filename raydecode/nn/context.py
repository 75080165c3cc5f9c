"""What a model is built for (:class:`DatasetInfo`) and where its training is (:class:`Progress`): the two values
every method's builder and loss receive."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data it is built for."""

    subjects: list[int]
    voxels: dict[int, int]  # voxels per subject (betas are zero-padded to max(voxels))
    n_classes: int = 80
    tr_s: float | None = None  # repetition time of the store's time series (None: the store has none)

    @property
    def width(self) -> int:
        return max(self.voxels.values())

    def to_dict(self) -> dict:
        return {"subjects": list(self.subjects), "voxels": {str(k): v for k, v in self.voxels.items()},
                "n_classes": self.n_classes, "tr_s": self.tr_s}

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        return cls(list(d["subjects"]), {int(k): int(v) for k, v in d["voxels"].items()}, int(d.get("n_classes", 80)),
                   d.get("tr_s"))


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
