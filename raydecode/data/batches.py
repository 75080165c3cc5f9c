"""Ray Data's numpy batches as torch tensors: the one conversion every consumer of the pipeline uses."""

from __future__ import annotations

import numpy as np
import torch


def collate(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy batch -> tensors; string columns (e.g. ``split``) are dropped, ids become int64."""
    out = {}
    for name, values in batch.items():
        if values.dtype == object or values.dtype.kind in "US":
            continue
        values = np.ascontiguousarray(values)
        t = torch.from_numpy(values if values.flags.writeable else values.copy())  # Ray hands out read-only arrays
        if t.dtype in (torch.int8, torch.int16, torch.int32) and name != "image":
            t = t.long()
        out[name] = t
    return out
