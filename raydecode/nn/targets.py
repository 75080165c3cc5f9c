"""A batch's frozen targets: the store's embedding columns, or image embeddings computed once per image id; and,
for encoders that ``augment`` (MindEye2's ConvNeXt target), the tokens of an augmented view drawn every step."""

from __future__ import annotations

import torch

from raydecode.data.pipeline import StimulusLookup, embedding_column
from raydecode.nn.encoders import FrozenEncoder, TargetCache, augments, encoder_config


class BatchPreparer:
    """Adds frozen targets (``<key>_tokens`` / ``<key>_pooled``) and moves a batch to the device and dtype.

    Targets come from the store's embedding columns (joined by the pipeline) or are computed here, once
    per image id: the images (and captions) of ids not seen yet are read from the store's stimulus shards.
    An encoder that ``augments`` also adds ``<key>_aug_tokens``: every step, each image of the batch (read again
    from the stimulus shards) through a fresh draw of the encoder's augmentation. Those targets feed training
    losses only: with ``training=False`` (prediction, evaluation) they are left out, their encoders never built.
    ``local_cache``: the images are read through the node-local cache (``data.local_cache``)."""

    def __init__(self, targets: dict[str, dict], device: torch.device, dtype: torch.dtype,
                 store_uri: str, s3: dict | None, training: bool = True, local_cache: str | None = None):
        self.device, self.dtype = device, dtype
        augmenting = {k for k, t in targets.items() if augments(encoder_config(t["encoder"]))}
        self.dropped = set()
        if not training:
            self.dropped = {embedding_column(targets[k]["encoder"], part) for k in augmenting
                            if targets[k]["source"] == "store" for part in ("tokens", "pooled")}
            targets = {k: t for k, t in targets.items() if k not in augmenting}
            augmenting = set()
        self.from_store = {k: t["encoder"] for k, t in targets.items() if t["source"] == "store"}
        encoders = {k: FrozenEncoder(encoder_config(t["encoder"])).to(device)
                    for k, t in targets.items() if t["source"] == "compute" or k in augmenting}
        self.augmented = {k: encoders[k] for k in augmenting}
        computed = {k: e for k, e in encoders.items() if targets[k]["source"] == "compute"}
        self.cache = TargetCache(computed) if computed else None
        self.images = StimulusLookup(store_uri, s3, True, [], 8, local_cache) if encoders else None
        self.embedding_column = embedding_column

    def _images(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.images({"image_id": ids.numpy()})["image"])

    def _captions(self, ids: torch.Tensor) -> list[str]:
        return self.images.captions(ids.numpy())

    def __call__(self, batch: dict[str, torch.Tensor], augment: bool = True) -> dict[str, torch.Tensor]:
        """``augment=False``: no augmented views (a test batch of a training run)."""
        for col in self.dropped:
            batch.pop(col, None)
        for key, enc in self.from_store.items():
            for part in ("tokens", "pooled"):
                batch[f"{key}_{part}"] = batch.pop(self.embedding_column(enc, part))
        if self.cache is not None:
            batch.update(self.cache(batch["image_id"], batch.get("image"), self._images,
                                    load_captions=self._captions))
        if self.augmented and augment:
            images = batch["image"] if "image" in batch else self._images(batch["image_id"])
            for key, enc in self.augmented.items():
                batch[f"{key}_aug_tokens"] = enc.encode_augmented(images)
        batch.pop("image", None)
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items()}
