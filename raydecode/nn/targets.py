"""A batch's frozen targets: the store's embedding columns, or image embeddings computed once per image id."""

from __future__ import annotations

import torch

from raydecode.data.pipeline import StimulusLookup, embedding_column
from raydecode.nn.encoders import FrozenEncoder, TargetCache, encoder_config


class BatchPreparer:
    """Adds frozen targets (``<key>_tokens`` / ``<key>_pooled``) and moves a batch to the device and dtype.

    Targets come from the store's embedding columns (joined by the pipeline) or are computed here, once
    per image id: the images (and captions) of ids not seen yet are read from the store's stimulus shards."""

    def __init__(self, targets: dict[str, dict], device: torch.device, dtype: torch.dtype,
                 store_uri: str, s3: dict | None):
        self.device, self.dtype = device, dtype
        self.from_store = {k: t["encoder"] for k, t in targets.items() if t["source"] == "store"}
        computed = {k: FrozenEncoder(encoder_config(t["encoder"])).to(device)
                    for k, t in targets.items() if t["source"] == "compute"}
        self.cache = TargetCache(computed) if computed else None
        self.images = StimulusLookup(store_uri, s3, True, [], 8) if computed else None
        self.embedding_column = embedding_column

    def _images(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.images({"image_id": ids.numpy()})["image"])

    def _captions(self, ids: torch.Tensor) -> list[str]:
        return self.images.captions(ids.numpy())

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for key, enc in self.from_store.items():
            for part in ("tokens", "pooled"):
                batch[f"{key}_{part}"] = batch.pop(self.embedding_column(enc, part))
        if self.cache is not None:
            batch.update(self.cache(batch["image_id"], batch.get("image"), self._images,
                                    load_captions=self._captions))
        batch.pop("image", None)
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items()}
