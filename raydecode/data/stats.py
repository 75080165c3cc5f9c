"""Class statistics of a trained model's embeddings, stored under ``<store>/stats/`` (Duala's source statistics).

A Ray Data job (:func:`raydecode.inference.run_class_statistics`) streams the source subjects' train trials (with
their categories) through a consolidated checkpoint, loaded once per actor, and sums the L2-normalised embeddings
the method's ``predict`` returns (e.g. ``latent``: after the ridge map, ``hidden``: after the backbone) per subject
and primary class. The driver turns the sums into :func:`class_statistics` and writes them, keyed by the
checkpoint, to::

    <store>/stats/<run>-<key>/class_stats.safetensors   <space>.<statistic> tensors (below)
    <store>/stats/<run>-<key>/stats.json                 checkpoint, subjects, spaces, counts (written last)

A second request for the same checkpoint, subjects and spaces reuses the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from raydecode.errors import StoreError
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


@dataclass
class StatsResult:
    uri: str
    status: str  # "written" | "unchanged"
    tensors: dict[str, torch.Tensor]
    info: dict
    seconds: float


def load_stats(uri: str, s3: S3Options | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    root = resolve(uri, s3)
    if not root.join(INFO_FILE).exists():
        raise StoreError(f"{root.uri}: no {INFO_FILE}: class statistics missing or incomplete")
    return load_safetensors(root.join(STATS_FILE).read_bytes()), json.loads(root.join(INFO_FILE).read_bytes())


def write_stats(uri: str, tensors: dict[str, torch.Tensor], info: dict, s3: S3Options | None = None) -> None:
    root = resolve(uri, s3)
    root.join(STATS_FILE).write_bytes_atomic(save_safetensors(tensors))
    root.join(INFO_FILE).write_bytes_atomic(json.dumps(info, indent=1).encode())  # last: marks completeness
