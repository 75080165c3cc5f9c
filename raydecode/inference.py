"""One inference path: a loaded model and the batch preparation it trained with, turning the pipeline's numpy rows
into the method's predictions and test values (eval mode, no gradients, no Ray, no DeepSpeed).

Every consumer of a trained model runs it through :class:`ModelRunner`: the evaluation suite's Ray Data actors
(:mod:`raydecode.evaluate.suite`, which also scores the Dynadiff stage's models) and the class statistics Duala
adapts with (:func:`run_class_statistics`, one Ray Data actor here).
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import torch

from raydecode.checkpoint import (
    CONFIG_FILE,
    METRICS_FILE,
    Consolidated,
    ModelRef,
    load_consolidated,
    load_model,
    read_json,
)
from raydecode.config import DataSelection
from raydecode.data.batches import collate
from raydecode.data.pipeline import trials_dataset
from raydecode.data.schema import N_CATEGORIES, primary_category
from raydecode.data.stats import INFO_FILE, StatsResult, class_statistics, load_stats, write_stats
from raydecode.errors import StoreError, user_errors_from_ray
from raydecode.methods.spec import Reconstructs
from raydecode.nn.targets import BatchPreparer
from raydecode.storage import S3Options, resolve


class ModelRunner:
    """``loaded`` (a :class:`~raydecode.checkpoint.Consolidated`) on ``device``; with ``targets``, batches get the
    frozen targets its training computed or read (from ``store``), so test losses are the training's."""

    def __init__(self, loaded: Consolidated, store: str | None = None, s3: S3Options | None = None,
                 device: str = "cpu", targets: bool = True):
        self.loaded, self.spec, self.model = loaded, loaded.spec, loaded.model
        self.device = torch.device(device)
        self.prepare = (BatchPreparer(loaded.config["targets"], self.device, torch.float32, store,
                                      s3.model_dump() if s3 else None, training=False) if targets else None)

    @classmethod
    def load(cls, ref: ModelRef | str, s3: S3Options | None = None, device: str = "cpu", store: str | None = None,
             targets: bool = True) -> ModelRunner:
        """From a model reference (registry, run) or a checkpoint URI."""
        loaded = load_consolidated(ref, s3, device) if isinstance(ref, str) else load_model(ref, s3, device)
        return cls(loaded, store, s3, device, targets)

    def batch(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Numpy rows -> the model's batch (targets added, images dropped, on the device)."""
        data = collate(rows)
        if self.prepare is not None:
            return self.prepare(data)
        return {k: v.to(self.device) for k, v in data.items()}

    @torch.no_grad()
    def predict(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.spec.predict(self.model, batch)

    @torch.no_grad()
    def test_values(self, batch: dict) -> dict[str, torch.Tensor]:
        """The method's per-row test values (e.g. Dynadiff's denoising losses); none for most methods."""
        return self.spec.test_values(self.model, batch)

    @torch.no_grad()
    def reconstruct(self, batch: dict, seeds: np.ndarray, steps: int | None, guidance: float | None) -> np.ndarray:
        return self.spec.get(Reconstructs).reconstruct(self.model, batch, seeds, steps, guidance).cpu().numpy()


# -- class statistics (Duala's source statistics) ------------------------------------------------------------------


class _ClassSums:
    """Ray Data actor: a checkpoint's embeddings of a batch -> per (subject, class) sums of normalised embeddings."""

    def __init__(self, checkpoint: str, s3: dict | None, spaces: list[str], subjects: list[int]):
        torch.set_num_threads(1)
        self.runner = ModelRunner.load(checkpoint, S3Options(**(s3 or {})), targets=False)
        self.spaces, self.subjects = spaces, subjects

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        data = self.runner.batch({k: np.array(batch[k]) for k in ("betas", "subject")})  # writable copies for torch
        labels = primary_category(batch["categories"])
        pred = self.runner.predict(data)
        out: dict[str, np.ndarray] = {}
        row = np.array([self.subjects.index(int(s)) for s in batch["subject"]]) * N_CATEGORIES + labels
        keep = labels >= 0
        cells = len(self.subjects) * N_CATEGORIES
        out["counts"] = np.bincount(row[keep], minlength=cells)[None].astype(np.float64)
        for space in self.spaces:
            if space not in pred:
                raise StoreError(f"method {self.runner.spec.name!r} predicts no {space!r} embedding "
                                 f"(it has: {', '.join(sorted(pred))})")
            emb = torch.nn.functional.normalize(pred[space].float().flatten(1), dim=-1).numpy()
            sums = np.zeros((cells, emb.shape[1]))
            np.add.at(sums, row[keep], emb[keep])
            out[space] = sums[None]
        return out


def stats_uri(store_uri: str, checkpoint: str, subjects: list[int], spaces: list[str], min_samples: int,
              s3: S3Options | None = None) -> str:
    """Where the statistics of this checkpoint over these subjects live: ``<store>/stats/<run>-<key>``."""
    ck = resolve(checkpoint, s3)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, METRICS_FILE):  # what the run was and where it ended: changes with any retrain
        digest.update(ck.join(name).read_bytes())
    digest.update(json.dumps([sorted(subjects), sorted(spaces), min_samples]).encode())
    run = ck.path.rstrip("/").split("/")[-2] if ck.path.rstrip("/").endswith("final") else "checkpoint"
    return resolve(store_uri, s3).join("stats", f"{run}-{digest.hexdigest()[:12]}").uri


def run_class_statistics(store_uri: str, checkpoint: str, spaces: list[str], subjects: list[int] | None = None,
                         min_samples: int = 3, s3: S3Options | None = None, cpus: float = 0.25,
                         batch_size: int = 256) -> StatsResult:
    """Compute (or reuse) the class statistics of ``checkpoint`` over ``subjects`` (default: the subjects it
    was trained on) in the embedding ``spaces`` its method predicts: the train trials stream through one Ray Data
    actor holding the model; the driver adds up its per-batch sums (:mod:`raydecode.data.stats`)."""
    from ray.data import ActorPoolStrategy

    t0 = time.time()
    config = read_json(checkpoint, CONFIG_FILE, s3)
    subjects = sorted(subjects or config["info"]["subjects"])
    uri = stats_uri(store_uri, checkpoint, subjects, spaces, min_samples, s3)
    if resolve(uri, s3).join(INFO_FILE).exists():
        tensors, info = load_stats(uri, s3)
        return StatsResult(uri, "unchanged", tensors, info, time.time() - t0)

    sel = DataSelection(subjects=subjects, categories=True, read_cpus=cpus)
    ds = trials_dataset(store_uri, "train", sel, s3).dataset.map_batches(
        _ClassSums, fn_constructor_args=(checkpoint, s3.model_dump() if s3 else None, spaces, subjects),
        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=1), num_cpus=cpus)
    totals: dict[str, np.ndarray] = {}
    with user_errors_from_ray():
        for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k, v in part.items():
                totals[k] = totals.get(k, 0) + v.sum(0)
    counts = torch.from_numpy(totals["counts"]).view(len(subjects), N_CATEGORIES)
    tensors: dict[str, torch.Tensor] = {}
    for space in spaces:
        sums = torch.from_numpy(totals[space]).view(len(subjects), N_CATEGORIES, -1)
        for name, value in class_statistics(sums, counts, min_samples).items():
            tensors[f"{space}.{name}"] = value.contiguous()
    info = {"checkpoint": checkpoint, "subjects": subjects, "spaces": spaces, "min_samples": min_samples,
            "trials": int(counts.sum()), "valid_classes": {s: int(v) for s, v in
                                                            zip(subjects, (counts >= min_samples).sum(1).tolist())}}
    write_stats(uri, tensors, info, s3)
    return StatsResult(uri, "written", tensors, info, time.time() - t0)
