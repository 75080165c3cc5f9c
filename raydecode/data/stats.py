"""Class statistics of a trained model's embeddings, stored under ``<store>/stats/`` (Duala's source statistics).

A Ray Data job streams the source subjects' train trials (with their categories) through a consolidated
checkpoint, loaded once per actor, and sums the L2-normalised embeddings the method's ``predict`` returns
(e.g. ``latent``: after the ridge map, ``hidden``: after the backbone) per subject and primary class. The
driver turns the sums into :func:`class_statistics` and writes them, keyed by the checkpoint, to::

    <store>/stats/<run>-<key>/class_stats.safetensors   <space>.<statistic> tensors (below)
    <store>/stats/<run>-<key>/stats.json                 checkpoint, subjects, spaces, counts (written last)

A second request for the same checkpoint, subjects and spaces reuses the file.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from raydecode.data.schema import N_CATEGORIES, primary_category
from raydecode.errors import StoreError, user_errors_from_ray
from raydecode.storage import S3Options, resolve

STATS_FILE = "class_stats.safetensors"
INFO_FILE = "stats.json"


def class_statistics(sums: torch.Tensor, counts: torch.Tensor, min_samples: int = 3) -> dict[str, torch.Tensor]:
    """From per-(subject, class) sums of normalised embeddings ``sums`` (S, C, D) and ``counts`` (S, C):

    - ``prototypes`` (S, C, D): mean normalised embedding per subject and class;
    - ``valid`` (S, C): the class has at least ``min_samples`` samples for that subject;
    - ``similarity`` (S, C, C): cosine between a subject's prototypes (NaN where a class is not valid);
    - ``reference`` (C, C): the mean of the subjects' similarity matrices over the subjects where both
      classes are valid (NaN where none);
    - ``class_mean`` (C, D): per class, the mean prototype across the subjects where it is valid;
    - ``deviation`` (S, C, D): each subject's prototype minus the class mean (0 where not valid);
    - ``deviation_scale`` (C, D): per class and dimension, the RMS of the subjects' deviations.
    """
    sums, counts = sums.double(), counts.double()
    valid = counts >= min_samples
    protos = sums / counts.clamp(min=1)[..., None]
    unit = torch.nn.functional.normalize(protos, dim=-1)
    sim = unit @ unit.transpose(1, 2)
    pair = valid[:, :, None] & valid[:, None, :]
    sim = torch.where(pair, sim, torch.full_like(sim, float("nan")))
    n_pair = pair.sum(0)
    reference = torch.where(n_pair > 0, torch.nan_to_num(sim).sum(0) / n_pair.clamp(min=1),
                            torch.full_like(sim[0], float("nan")))
    w = valid.double()[..., None]
    n_valid = w.sum(0)
    class_mean = (protos * w).sum(0) / n_valid.clamp(min=1)
    deviation = (protos - class_mean[None]) * w
    deviation_scale = ((deviation ** 2).sum(0) / n_valid.clamp(min=1)).sqrt()
    out = {"prototypes": protos * w, "valid": valid, "similarity": sim, "reference": reference,
           "class_mean": class_mean, "deviation": deviation, "deviation_scale": deviation_scale,
           "counts": counts}
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


class _ClassSums:
    """Ray Data actor: the checkpoint's predict on a batch -> per (subject, class) sums of normalised embeddings."""

    def __init__(self, checkpoint: str, s3: dict | None, spaces: list[str], subjects: list[int], batch: int):
        from raydecode.checkpoint import load_consolidated

        torch.set_num_threads(1)
        self.ck = load_consolidated(checkpoint, S3Options(**(s3 or {})))
        self.spaces, self.subjects, self.batch = spaces, subjects, batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raydecode.data.batches import collate

        data = collate({k: np.array(batch[k]) for k in ("betas", "subject")})  # writable copies for torch
        labels = primary_category(batch["categories"])
        with torch.no_grad():
            pred = self.ck.spec.predict(self.ck.model, data)
        out: dict[str, np.ndarray] = {}
        row = np.array([self.subjects.index(int(s)) for s in batch["subject"]]) * N_CATEGORIES + labels
        keep = labels >= 0
        cells = len(self.subjects) * N_CATEGORIES
        out["counts"] = np.bincount(row[keep], minlength=cells)[None].astype(np.float64)
        for space in self.spaces:
            if space not in pred:
                raise StoreError(f"method {self.ck.spec.name!r} predicts no {space!r} embedding "
                                 f"(it has: {', '.join(sorted(pred))})")
            emb = torch.nn.functional.normalize(pred[space].float().flatten(1), dim=-1).numpy()
            sums = np.zeros((cells, emb.shape[1]))
            np.add.at(sums, row[keep], emb[keep])
            out[space] = sums[None]
        return out


@dataclass
class StatsResult:
    uri: str
    status: str  # "written" | "unchanged"
    tensors: dict[str, torch.Tensor]
    info: dict
    seconds: float


def stats_uri(store_uri: str, checkpoint: str, subjects: list[int], spaces: list[str], min_samples: int,
              s3: S3Options | None = None) -> str:
    """Where the statistics of this checkpoint over these subjects live: ``<store>/stats/<run>-<key>``."""
    from raydecode.checkpoint import CONFIG_FILE, METRICS_FILE

    ck = resolve(checkpoint, s3)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, METRICS_FILE):  # what the run was and where it ended: changes with any retrain
        digest.update(ck.join(name).read_bytes())
    digest.update(json.dumps([sorted(subjects), sorted(spaces), min_samples]).encode())
    run = ck.path.rstrip("/").split("/")[-2] if ck.path.rstrip("/").endswith("final") else "checkpoint"
    return resolve(store_uri, s3).join("stats", f"{run}-{digest.hexdigest()[:12]}").uri


def load_stats(uri: str, s3: S3Options | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    root = resolve(uri, s3)
    if not root.join(INFO_FILE).exists():
        raise StoreError(f"{root.uri}: no {INFO_FILE}: class statistics missing or incomplete")
    return load_safetensors(root.join(STATS_FILE).read_bytes()), json.loads(root.join(INFO_FILE).read_bytes())


def run_class_statistics(store_uri: str, checkpoint: str, spaces: list[str], subjects: list[int] | None = None,
                         min_samples: int = 3, s3: S3Options | None = None, cpus: float = 0.25,
                         batch_size: int = 256) -> StatsResult:
    """Compute (or reuse) the class statistics of ``checkpoint`` over ``subjects`` (default: the subjects it
    was trained on) in the embedding ``spaces`` its method predicts."""
    from ray.data import ActorPoolStrategy

    from raydecode.config import DataSelection
    from raydecode.data.pipeline import trials_dataset
    from raydecode.checkpoint import CONFIG_FILE, read_json

    t0 = time.time()
    config = read_json(checkpoint, CONFIG_FILE, s3)
    subjects = sorted(subjects or config["info"]["subjects"])
    uri = stats_uri(store_uri, checkpoint, subjects, spaces, min_samples, s3)
    root = resolve(uri, s3)
    if root.join(INFO_FILE).exists():
        tensors, info = load_stats(uri, s3)
        return StatsResult(uri, "unchanged", tensors, info, time.time() - t0)

    sel = DataSelection(subjects=subjects, categories=True, read_cpus=cpus, lookup_cpus=cpus)
    td = trials_dataset(store_uri, "train", sel, s3)
    s3_dump = s3.model_dump() if s3 else None
    ds = td.dataset.map_batches(
        _ClassSums, fn_constructor_args=(checkpoint, s3_dump, spaces, subjects, batch_size),
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
    root.join(STATS_FILE).write_bytes_atomic(save_safetensors(tensors))
    root.join(INFO_FILE).write_bytes_atomic(json.dumps(info, indent=1).encode())  # last: marks completeness
    return StatsResult(uri, "written", tensors, info, time.time() - t0)
