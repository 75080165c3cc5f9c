"""The NSD store contract: Arrow schemas of every shard kind and the manifest.

Layout (see DESIGN.md, "Store layout")::

    <store>/manifest.json                          written LAST
    <store>/voxels/subject=NN.parquet              voxel, i, j, k, roi
    <store>/trials/subject=NN/part-SSSSS.parquet   one row per trial, one shard per session
    <store>/timeseries/subject=NN/part-SSSSS.parquet   one row per run, one shard per session
    <store>/stimuli/part-NNNNN.parquet             one row per image, sorted by image_id
    <store>/embeddings/<encoder>/part-NNNNN.parquet    image_id, tokens, pooled
    <store>/stats/<run>/...                        derived statistics

Betas are stored as a fixed-size list of float16 whose length is the subject's
voxel count, so every reader knows the width without reading a row. Embeddings
likewise: ``tokens`` is the encoder's token array flattened row-major (its shape
is the manifest's ``embeddings[<encoder>].tokens_shape``), ``pooled`` a vector.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
BEGUN = ".ingest-begun.json"  # an ingest in progress: its source and parameters, until the manifest is written
SPLITS = ("train", "test")
SOURCES = ("synthetic", "nsd", "mindeye2")
SHARD_KINDS = ("voxels", "trials", "timeseries", "stimuli", "embeddings")

# The 80 COCO object categories, in COCO's order (NSD images are COCO images).
COCO_CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
N_CATEGORIES = len(COCO_CATEGORIES)


def primary_category(multi_hot: np.ndarray) -> np.ndarray:
    """One class per image for class-level statistics and losses: the first of its categories in COCO order
    (``person`` first when present); -1 for an image without categories."""
    hot = np.asarray(multi_hot) > 0
    return np.where(hot.any(axis=-1), hot.argmax(axis=-1), -1).astype(np.int64)


def repetitions(image_ids: np.ndarray) -> np.ndarray:
    """The ``repetition`` column: for each trial in presentation order, which showing (1, 2, 3, ...) of its image."""
    rep = np.zeros(len(image_ids), np.int8)
    seen: dict[int, int] = {}
    for t, i in enumerate(np.asarray(image_ids).tolist()):
        seen[i] = seen.get(i, 0) + 1
        rep[t] = seen[i]
    return rep


def subject_dir(subject: int) -> str:
    return f"subject={subject:02d}"


def voxels_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("voxel", pa.int32(), nullable=False),  # position in the subject's beta vector
            pa.field("i", pa.int16(), nullable=False),
            pa.field("j", pa.int16(), nullable=False),
            pa.field("k", pa.int16(), nullable=False),
            pa.field("roi", pa.string(), nullable=False),
        ]
    )


def trials_schema(n_voxels: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("subject", pa.int16(), nullable=False),
            pa.field("session", pa.int16(), nullable=False),  # 1-based, as in NSD
            pa.field("run", pa.int16(), nullable=False),  # 1-based within the session
            pa.field("trial", pa.int32(), nullable=False),  # 1-based within the session
            pa.field("image_id", pa.int32(), nullable=False),
            pa.field("repetition", pa.int8(), nullable=False),  # 1..3: which showing of this image
            pa.field("split", pa.string(), nullable=False),
            pa.field("onset_s", pa.float32(), nullable=False),  # stimulus onset within the run
            pa.field("betas", pa.list_(pa.float16(), n_voxels), nullable=False),
        ]
    )


def timeseries_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("subject", pa.int16(), nullable=False),
            pa.field("session", pa.int16(), nullable=False),
            pa.field("run", pa.int16(), nullable=False),
            pa.field("tr_s", pa.float32(), nullable=False),
            pa.field("n_voxels", pa.int32(), nullable=False),
            pa.field("n_tr", pa.int32(), nullable=False),
            # voxel x time, row-major: bold[v * n_tr + t]
            pa.field("bold", pa.list_(pa.float16()), nullable=False),
            # image shown at each TR's onset window (-1: blank), length n_tr
            pa.field("design", pa.list_(pa.int32()), nullable=False),
            pa.field("trial", pa.list_(pa.int32()), nullable=False),  # trials of this run (session numbering)
            pa.field("trial_onset_s", pa.list_(pa.float32()), nullable=False),
            pa.field("trial_image_id", pa.list_(pa.int32()), nullable=False),
        ]
    )


def stimuli_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.int32(), nullable=False),
            pa.field("image", pa.binary(), nullable=False),  # PNG bytes, RGB
            pa.field("height", pa.int16(), nullable=False),
            pa.field("width", pa.int16(), nullable=False),
            pa.field("categories", pa.list_(pa.uint8(), N_CATEGORIES), nullable=False),  # multi-hot
            pa.field("caption", pa.string(), nullable=False),
            pa.field("shared", pa.bool_(), nullable=False),  # one of the test images every subject saw
        ]
    )


def embeddings_schema(tokens_shape: tuple[int, ...], pooled_dim: int) -> pa.Schema:
    """One row per image: ``tokens`` flattened row-major from ``tokens_shape``, ``pooled`` of ``pooled_dim``."""
    width = 1
    for n in tokens_shape:
        width *= int(n)
    return pa.schema(
        [
            pa.field("image_id", pa.int32(), nullable=False),
            pa.field("tokens", pa.list_(pa.float16(), width), nullable=False),
            pa.field("pooled", pa.list_(pa.float16(), int(pooled_dim)), nullable=False),
        ]
    )


def schema_for(kind: str, n_voxels: int | None = None, encoder: EncoderInfo | None = None) -> pa.Schema:
    if kind == "voxels":
        return voxels_schema()
    if kind == "trials":
        assert n_voxels is not None
        return trials_schema(n_voxels)
    if kind == "timeseries":
        return timeseries_schema()
    if kind == "stimuli":
        return stimuli_schema()
    if kind == "embeddings":
        assert encoder is not None
        return embeddings_schema(encoder.tokens_shape, encoder.pooled_dim)
    raise ValueError(f"no fixed schema for shard kind {kind!r}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ShardInfo(_Strict):
    path: str  # relative to the store root
    kind: Literal["voxels", "trials", "timeseries", "stimuli", "embeddings"]
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str
    subject: int | None = None
    session: int | None = None
    encoder: str | None = None  # embeddings only
    image_id_min: int | None = None  # stimuli/embeddings: shards are sorted by image_id
    image_id_max: int | None = None

    @field_validator("path")
    @classmethod
    def _inside_the_store(cls, path: str) -> str:
        """A manifest names files under its root only: a relative POSIX path without '.', '..' or empty parts."""
        parts = path.split("/")
        if path.startswith("/") or "\\" in path or ":" in parts[0] or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{path!r} is not a path inside the store (relative, no '..', '.' or empty parts)")
        return path


class SubjectInfo(_Strict):
    subject: int
    voxels: int = Field(gt=0)
    grid_shape: tuple[int, int, int]
    sessions: int = Field(ge=0)
    runs: int = Field(ge=0)
    trials: dict[str, int]  # per split
    images: dict[str, int]  # distinct images per split


class EncoderInfo(_Strict):
    name: str
    tokens_shape: tuple[int, ...]
    pooled_dim: int
    # provenance: what made these embeddings (compared when `embed` runs again; None: not recorded)
    kind: str | None = None
    arch: str | None = None
    weights: str | None = None
    image_size: int | None = None
    seed: int | None = None
    tiny_channels: tuple[int, ...] | None = None  # vae 'tiny' (random weights) only

    def provenance(self) -> dict:
        return {k: getattr(self, k) for k in ("kind", "arch", "weights", "image_size", "seed", "tiny_channels")}


class SourceFile(_Strict):
    """One file of the release a store was ingested from: its path under the source root, size and checksum."""

    path: str
    bytes: int = Field(ge=0)
    sha256: str


class Manifest(_Strict):
    schema_version: int
    source: Literal["synthetic", "nsd", "mindeye2"]
    source_params: dict = Field(default_factory=dict)  # e.g. preset and seed; compared on re-runs
    created_by: str
    tr_s: float | None = None
    image_size: tuple[int, int]
    n_images: int
    categories: list[str]
    subjects: list[SubjectInfo]
    shared_test_image_ids: list[int]
    embeddings: dict[str, EncoderInfo] = Field(default_factory=dict)
    shards: list[ShardInfo]
    # ingests of a release: every file read, with its size and checksum (empty for synthetic stores)
    source_files: list[SourceFile] = Field(default_factory=list)
    # what the source did not have, e.g. "categories", "captions", "voxel coordinates", "trial onsets"
    absent: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        ids = [s.subject for s in self.subjects]
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise ValueError(f"subjects {twice} are listed more than once")
        paths = [s.path for s in self.shards]
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise ValueError(f"shards {repeated[:3]} are listed more than once")
        for shard in self.shards:
            if shard.subject is not None and shard.subject not in ids:
                raise ValueError(f"shard {shard.path!r} names subject {shard.subject}, which is not among the "
                                 f"manifest's subjects {ids}")
        return self

    def subject(self, subject: int) -> SubjectInfo:
        for s in self.subjects:
            if s.subject == subject:
                return s
        raise KeyError(subject)

    @property
    def subject_ids(self) -> list[int]:
        return [s.subject for s in self.subjects]

    def shards_of(
        self,
        kind: str,
        subjects: list[int] | None = None,
        sessions: list[int] | None = None,
        encoder: str | None = None,
    ) -> list[ShardInfo]:
        out = [s for s in self.shards if s.kind == kind]
        if subjects is not None:
            out = [s for s in out if s.subject in subjects]
        if sessions is not None:
            out = [s for s in out if s.session in sessions]
        if encoder is not None:
            out = [s for s in out if s.encoder == encoder]
        return out
