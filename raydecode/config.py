"""Stage configs: one pydantic model per stage, loaded from YAML, ``--set a.b=c`` overrides.

Every stage shares the top-level keys ``store``, ``workdir``, ``tracking_uri``,
``run_name`` and ``s3`` (:class:`StageConfig`), so one ``--set store=...``
retargets any stage. Unknown keys and invalid values are refused with a
message naming the key and, where there is a fixed set, the allowed values.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from raydecode.errors import ConfigError
from raydecode.storage import S3Options, userinfo, without_userinfo

# -- what a stage reads --------------------------------------------------------------------


class DataSelection(BaseModel):
    """What a stage reads from the store (the ``data`` block of training configs)."""

    model_config = ConfigDict(extra="forbid")

    subjects: list[int] | None = Field(None, description="subject ids (default: all in the store but hold_out)")
    hold_out: list[int] = Field(default_factory=list, description="subjects never read: leave-one-subject-out "
                                                                "pretraining, e.g. [1] to pretrain the model Duala / "
                                                                "MindEye2 then adapt to subject 1")
    sessions: list[int] | None = Field(None, description="sessions to read, e.g. [1] for the 1-hour setting")
    train_trials: int | None = Field(None, ge=1, description="train split: each subject's first N train trials in "
                                                            "acquisition order (session, run, trial), e.g. MindLink's "
                                                            "500 / 1,500 / 4,000-sample new-subject settings")
    average_test_repeats: bool = Field(True, description="test split: average the repetitions of each image")
    keep_test_repeats: bool = Field(False, description="averaged test split: also keep each repetition's betas "
                                                       "(betas_repeats: 3 per image, fewer repeated, as MindEye2's "
                                                       "reference) for methods that average their outputs over them "
                                                       "(set from the method's columns)")
    single_test_trial_seed: int | None = Field(
        None, description="test split without averaging: one presentation per (subject, image), drawn with this "
                          "seed (Dynadiff's single-trial protocol); None: every presentation")
    shuffle: bool = Field(True, description="train split: files in a seeded random order (`seed`), rows mixed by the "
                                            "loop's local shuffle, seeded by optim.seed and the epoch")
    seed: int = Field(0, description="the train split's file order: with optim.seed and the epoch it fixes the data "
                                     "order, so a resumed run reads exactly the rows it had left")
    categories: bool = Field(True, description="join each image's 80-way multi-hot categories")
    images: bool = Field(False, description="join stimulus images (uint8 HxWx3)")
    embeddings: list[str] = Field(default_factory=list, description="join these encoders' frozen embeddings from the store")
    stimulus_cache_shards: int = Field(4, ge=1, description="decoded stimulus shards each read process keeps in memory "
                                                             "(least recently used first out; see local_cache)")
    local_cache: str | None = Field(
        None, description="an absolute directory on each node's local disk: stimulus images and stored embeddings "
                          "are decoded there once per node and memory-mapped by every process (NSD scale: a random "
                          "trial order reads every shard; raydecode.data.shardcache)")
    read_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data read task (read, decode, stimulus lookup)")
    read_concurrency: int | None = Field(
        None, ge=1, description="the most read tasks at once, cluster-wide (Ray Data's concurrency; default: as many "
                                "as the free CPUs hold at data.read_cpus each). With read_cpus under 1, more read "
                                "tasks run than a node keeps worker processes (one per CPU): Ray stops the extra ones "
                                "after a streamed epoch and starts them, and their stimulus lookups, again the next")
    materialize: bool | None = Field(
        None, description="training: read the selected train trials once into Ray's object store instead of "
                          "re-reading the store every epoch (default: when their shards total under 2 GiB)")

    @model_validator(mode="before")
    @classmethod
    def _retired_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lookup_cpus" in data:
            warnings.warn("data.lookup_cpus is no longer used and is ignored: stimulus lookups run in the read tasks "
                          "(data.read_cpus)", FutureWarning, stacklevel=2)
            data = {k: v for k, v in data.items() if k != "lookup_cpus"}
        return data

    @field_validator("local_cache")
    @classmethod
    def _node_local_path(cls, path: str | None) -> str | None:
        if path is None:
            return None
        path = os.path.expanduser(path)
        if not os.path.isabs(path):  # each process resolves it on its own node: a relative path differs per process
            raise ValueError(f"{path!r} is relative: give an absolute directory on every node's local disk "
                             "(e.g. /tmp/raydecode-cache or a local NVMe mount)")
        return path


class WindowConfig(BaseModel):
    """Which part of the time series after each image onset a model sees."""

    model_config = ConfigDict(extra="forbid")

    start_s: float = Field(3.0, description="window start after the image onset (s); Dynadiff: 3")
    duration_s: float = Field(8.0, gt=0, description="window length (s); Dynadiff: 8 (6 TRs at TR 1.3 s)")
    detrend: Literal["cosine", "none"] = Field("cosine", description="per-voxel cosine-drift removal per run")
    high_pass_hz: float = Field(0.01, gt=0, description="cosine drift regressors below this frequency")
    zscore: bool = Field(True, description="z-score every voxel over its run")

    def n_samples(self, tr_s: float) -> int:
        return max(1, int(round(self.duration_s / tr_s)))

    def first_index(self, onset_s: np.ndarray, tr_s: float, shift: int = 0) -> np.ndarray:
        """Index of each window's first volume (volume i is acquired at i * TR)."""
        return np.round((np.asarray(onset_s, np.float64) + self.start_s) / tr_s).astype(np.int64) + int(shift)

    def end_s(self, tr_s: float, shift: int = 0) -> float:
        """Where the (shifted) window ends relative to the onset: Dynadiff's x-axis, t + delta + d."""
        return self.start_s + shift * tr_s + self.n_samples(tr_s) * tr_s


# MLFLOW_TRACKING_URI as this process started: mlflow.set_tracking_uri() writes the variable itself, so a later read
# would return the previous stage's URI, not the user's
ENV_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None


WAIT_FOR_NODES = ("a cluster without an autoscaler: how long to wait for nodes that fit before refusing (with one, "
                  "its node types decide at once; raydecode.runtime)")


class StageConfig(BaseModel):
    """Keys every stage has."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field("work/store", description="store URI: a path, file:// or s3://bucket/prefix")
    workdir: str = Field("work", description="local outputs (logs, summaries, the default MLflow database)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else "
                                                       "sqlite:///<workdir>/mlflow.db")
    run_name: str | None = Field(None, description="MLflow run name; the same name resumes a stage")
    s3: S3Options = Field(default_factory=S3Options)

    @field_serializer("tracking_uri")
    def _no_password(self, uri: str | None) -> str | None:  # a user:password@ never leaves this object
        return without_userinfo(uri) if uri else uri

    def export_credentials(self) -> None:
        """Credentials given in this config go to this process's environment, nowhere else: S3 settings as ``AWS_*``,
        a tracking URI's ``user:password@`` as ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` (MLflow's basic auth).
        A local Ray started after this inherits them; a cluster's nodes bring their own."""
        env = self.s3.env()  # with the endpoint and region, for tools that read only variables (MLflow's boto3)
        user, password = userinfo(self.tracking_uri or ENV_TRACKING_URI or "")
        env.update({k: v for k, v in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password))
                    if v})
        os.environ.update(env)

    def resolved_tracking_uri(self) -> str:
        """The tracking URI to use, without any ``user:password@`` (see :meth:`export_credentials`)."""
        if self.tracking_uri:
            return without_userinfo(self.tracking_uri)
        if ENV_TRACKING_URI:  # e.g. a cluster's MLflow server, from its ConfigMap / the job's environment
            return without_userinfo(ENV_TRACKING_URI)
        return f"sqlite:///{os.path.abspath(os.path.join(self.workdir, 'mlflow.db'))}"


class IngestSyntheticConfig(StageConfig):
    """``raydecode ingest synthetic``: a synthetic NSD with planted structure, written to ``store``."""

    preset: Literal["tiny", "demo", "paper"] = "tiny"
    seed: int = 0
    timeseries: bool = Field(True, description="also write per-run BOLD time series (Dynadiff)")
    subjects: list[int] | None = Field(None, description="subset of subjects 1..8 (default: all)")


class IngestReleaseConfig(StageConfig):
    """Keys of every ingest of a published release: where it is and how the ingest's Ray tasks run."""

    source: str = Field(description="the release's root: a path, file:// or s3://bucket/prefix")
    source_s3: S3Options | None = Field(
        None, description="how to reach the source bucket (default: the `s3` block); the public NSD bucket reads with "
                          "`anonymous: true`")
    subjects: list[int] | None = Field(None, description="subjects 1..8 (default: every subject the release holds)")
    coco: str | None = Field(None, description="COCO 2017 annotations (a dir with instances_/captions_{train,val}2017"
                                               ".json): categories and captions; without, the manifest lists them absent")
    roi_files: list[str] = Field(default_factory=lambda: ["prf-visualrois", "Kastner2015", "streams"],
                                 description="ROI volumes beside nsdgeneral that label voxels (first label wins)")
    images_per_shard: int = Field(500, ge=1)
    ray_address: str | None = Field(None, description="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    task_cpus: float = Field(1.0, gt=0, description="CPUs of each shard's Ray task")
    task_memory_gb: float | None = Field(None, gt=0, description="memory Ray reserves for each shard's task (NSD "
                                                                 "betas: ~3 GB a session)")
    task_wait_s: float = Field(600.0, gt=0, description="how long to wait for a node that can run a task (an "
                                                        "autoscaler adding one) before refusing")

    def source_options(self) -> S3Options:
        return self.source_s3 or self.s3


class IngestNSDConfig(IngestReleaseConfig):
    """``raydecode ingest nsd``: the NSD release as published (betas, masks, images, time series) -> ``store``."""

    sessions: list[int] | None = Field(None, description="NSD session numbers (default: every session the release "
                                                          "has for each subject)")
    timeseries: bool = Field(False, description="also the per-run BOLD time series and design files (Dynadiff)")
    normalize: Literal["session-zscore", "none"] = Field(
        "session-zscore", description="betas: z-score each voxel within a session (MindEye2's release) or keep "
                                      "percent signal change")


class IngestMindEye2Config(IngestReleaseConfig):
    """``raydecode ingest mindeye2``: MindEye2's preprocessed release (pscotti/mindeyev2 layout) -> ``store``."""

    nsd: str | None = Field(None, description="an NSD release root: nsdgeneral masks give voxel coordinates and ROI "
                                              "labels, nsd_stim_info_merged.csv matches COCO annotations")


class InfoConfig(StageConfig):
    """``raydecode info``: summarise a store, optionally verifying every shard."""

    verify: bool = False


class EmbedConfig(StageConfig):
    """``raydecode embed``: frozen image targets (every stimulus through each encoder) written into ``store``."""

    encoders: list[str | dict[str, Any]] = Field(
        default_factory=list,
        description="encoder names (openclip-bigg, sd-vae, openclip-tiny, vae-tiny, openclip-demo, vae-demo) "
        "or full encoder mappings (name, kind, arch, weights, image_size, seed)",
    )
    batch_size: int = Field(64, ge=1, description="images per encoder call")
    ray_address: str | None = Field(None, description="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    use_gpu: bool | None = Field(None, description="one GPU per encoder actor; default: when the cluster can have "
                                                   "GPUs (its autoscaler's node types, else its nodes)")
    actors: int | None = Field(None, ge=1, description="most encoder actors at once (Ray Data scales the pool up to "
                                                       "it); default: one per GPU the cluster can have, on CPU from "
                                                       "its CPUs")
    wait_for_nodes_s: float = Field(600.0, ge=0, description=WAIT_FOR_NODES)


class DemoConfig(StageConfig):
    """``raydecode demo``: the whole pipeline on embedded defaults (local Ray, local store, sqlite MLflow)."""

    workdir: str = "work/demo"
    store: str = "work/demo/store"
    preset: Literal["tiny", "demo"] = "demo"
    seed: int = 0


CLAIMS = ("mindeye2", "duala", "mindlink", "clip_mused", "dynadiff")


class ClaimsConfig(StageConfig):
    """``raydecode claims``: each implemented paper's central claim re-run on a synthetic store (two arms of real
    training runs, scored per test image in one process), with a paired bootstrap interval and a verdict; one MLflow
    run holds the table, the arms are its child runs."""

    workdir: str = "work/claims"
    store: str = Field("work/claims/store", description="a synthetic store of the preset (ingested when missing)")
    experiment: str = Field("raydecode-claims", description="MLflow experiment")
    run_name: str | None = "claims"
    ray_address: str | None = Field(None, description="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    preset: Literal["tiny", "demo"] = Field("tiny", description="model and store sizes, and each claim's training "
                                                                "budget (raydecode.app.claims.RECIPES)")
    claims: list[Literal[CLAIMS]] = Field(default_factory=lambda: list(CLAIMS),  # type: ignore[valid-type]
                                          description="which papers' claims to run")
    repeats: int = Field(1, ge=1, description="training runs per arm (seeds optim.seed + r); the per-image scores "
                                              "are averaged over them before the bootstrap")
    bootstrap: int = Field(2000, ge=100, description="paired bootstrap resamples of the test images")
    seed: int = 0
    pretrained: str | None = Field(None, description="the MindEye2 checkpoint MindEye2's and Duala's claims adapt "
                                                     "to subject 8 (trained without it); default: pretrained here")
    num_workers: int = Field(1, ge=1, description="Ray Train workers per run")
    concurrency: int = Field(2, ge=1, description="training runs side by side (each holds num_workers x 0.25 CPU "
                                                  "and 0.25 for its stimulus lookup); their start-ups overlap")


C = TypeVar("C", bound=BaseModel)


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def set_dotted(data: dict, key: str, value: Any, what: str = "--set", merge: bool = False) -> None:
    """``data[a][b][c] = value`` for ``key`` ``a.b.c``, creating sections on the way; a key through a value is
    refused (``what`` names where the key came from). ``merge``: a dict value updates a dict already there."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"{what} {key}: '{part}' is a value, not a section")
        node = nxt
    if merge and isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]] = {**node[parts[-1]], **value}
    else:
        node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides (values parsed as YAML: ``3``, ``true``, ``[1, 2]``) to a nested dict."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. --set store=s3://bucket/nsd)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        set_dotted(data, key, _parse_value(raw))
    return data


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (sub)model at ``loc`` (without the unknown key itself)."""
    cur: Any = model
    for part in loc[:-1]:
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cur is None:
            return []
    return sorted(getattr(cur, "model_fields", {}).keys())


def format_validation_error(model: type[BaseModel], exc: ValidationError, source: str) -> str:
    """One line per problem, naming the key and what is allowed."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(root)"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            lines.append(f"{source}: unknown key '{key}'; allowed keys: {', '.join(allowed)}")
        elif err["type"] == "missing":
            field = model.model_fields.get(str(loc[0])) if len(loc) == 1 else None
            what = f" ({field.description})" if field is not None and field.description else ""
            lines.append(f"{source}: key '{key}' is required{what}")
        elif err["type"] in ("literal_error", "enum"):
            expected = err.get("ctx", {}).get("expected", "")
            lines.append(f"{source}: key '{key}': invalid value {value!r}; allowed values: {expected}")
        else:
            lines.append(f"{source}: key '{key}': invalid value {value!r} ({err['msg']})")
    return "\n".join(lines)


def load_config(schema: type[C], path: str | None = None, overrides: list[str] | None = None, **flags) -> C:
    """Validate a stage config: the YAML file, then explicit CLI flags (e.g. ``--out``), then ``--set``
    overrides, each winning over the one before. A schema with ``reads_file_of`` (``compare``) also takes that
    stage's config file (``jobs/evaluate.yaml``): the keys only that stage knows are skipped."""
    data: dict = {}
    source = "config"
    if path:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        shared_with = getattr(schema, "reads_file_of", None)
        if shared_with is not None:
            theirs = set(shared_with.model_fields) - set(schema.model_fields)
            loaded = {k: v for k, v in loaded.items() if k not in theirs}
        data.update(loaded)
    data.update(flags)
    data = apply_overrides(data, overrides or [])
    try:
        cfg = schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(schema, exc, source)) from exc
    cfg.export_credentials()  # before any local Ray starts: its workers inherit them, no payload carries them
    return cfg


# -- training (pretrain / fine-tune; Duala and Dynadiff reuse these blocks) -----------------


class OptimConfig(BaseModel):
    """Optimizer and schedule (a torch AdamW handed to DeepSpeed)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1)
    samples_per_epoch: int | None = Field(
        None, ge=1, description="an epoch is this many samples, as MindEye2's reference counts them (30,000: 750 "
                                "trials x 40 sessions, whatever the subjects): the run makes epochs x "
                                "samples_per_epoch / train rows passes over the data (at least 1), warming up over "
                                "the first two epochs' samples. None: an epoch is one pass")
    batch_size: int = Field(32, ge=2, description="per worker (DeepSpeed micro-batch)")
    lr: float = Field(3e-4, gt=0, description="max lr of the OneCycle schedule")
    weight_decay: float = Field(1e-2, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = Field(
        "onecycle", description="onecycle: MindEye2's (warm-up over two epochs, cosine down); cosine: linear warm-up "
                                "over warmup_steps, then cosine to 0 (Dynadiff's); constant")
    warmup_steps: int = Field(1000, ge=0, description="schedule cosine: linear warm-up steps (Dynadiff: 1,000)")
    grad_clip: float = Field(1.0, ge=0)
    seed: int = 0
    shuffle_buffer: int = Field(256, ge=0, description="local shuffle buffer (rows) on top of Ray Data's file shuffle")


class ScalingConfig(BaseModel):
    """Ray Train workers."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.25, gt=0, description="CPUs Ray reserves per worker (default: two workers, "
                                                            "the data reads and the lookup fit a 2-core laptop; a "
                                                            "GPU node's CPUs / GPUs on a cluster)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement of the workers' bundles (STRICT_SPREAD: one worker per node)")
    wait_for_nodes_s: float = Field(600.0, ge=0, description=WAIT_FOR_NODES)


class DeepSpeedConfig(BaseModel):
    """DeepSpeed engine: ZeRO stage and precision; ``extra`` is merged into the generated DeepSpeed config."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    extra: dict[str, Any] = Field(default_factory=dict)


class CheckpointConfig(BaseModel):
    """DeepSpeed per-rank checkpoints reported to Ray Train, and where they go."""

    model_config = ConfigDict(extra="forbid")

    storage_path: str | None = Field(None, description="Ray Train storage (path or s3://); default <workdir>/runs")
    every_epochs: int = Field(1, ge=1)
    every_steps: int | None = Field(None, ge=1, description="also checkpoint every N optimizer steps")
    num_to_keep: int | None = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint (-1: unlimited)")


class FaultInjection(BaseModel):
    """Testing fault tolerance: kill one worker once, at a step (a marker file makes it happen only once), or make
    its loss NaN at that step."""

    model_config = ConfigDict(extra="forbid")

    rank: int = 1
    at_step: int = Field(ge=1)
    marker: str
    delay_s: float = Field(3.0, ge=0, description="the worker dies this long after reaching at_step")
    kind: Literal["kill", "nan_loss"] = Field("kill", description="kill: the worker process exits; nan_loss: the "
                                                                  "step's loss is NaN (a diverging run)")


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    every_epochs: int = Field(1, ge=1)
    candidates: int = Field(300, ge=2, description="retrieval candidate set (MindEye: 300)")
    draws: int = Field(30, ge=1)


class TrainConfig(StageConfig):
    """``raydecode pretrain``: one Ray Train + DeepSpeed job for any registered method."""

    run_name: str | None = "pretrain"
    experiment: str = Field("raydecode", description="MLflow experiment")
    ray_address: str | None = Field(None, description="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    method: str = "mindeye2"
    preset: Literal["tiny", "demo", "paper"] = "demo"
    model: dict[str, Any] = Field(default_factory=dict, description="overrides of the method preset's fields")
    data: DataSelection = Field(default_factory=DataSelection)
    init_from: str | None = Field(None, description="fine-tune: a consolidated checkpoint (final/ dir URI) to start from; "
                                                   "in a sweep, `{subject}` in it is each trial's subject (e.g. "
                                                   "runs/pretrain-wo{subject:02d}/final, a leave-one-out model each)")
    allow_seen_subjects: bool = Field(False, description="init_from may have been trained on this run's subjects "
                                                         "(continued training; its numbers are not a new-subject "
                                                         "result). Default: refused, naming them")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    fault_injection: FaultInjection | None = None

    def storage_path(self) -> str:
        return self.checkpoint.storage_path or os.path.abspath(os.path.join(self.workdir, "runs"))



class ParamSpace(BaseModel):
    """One swept key: exactly one of ``grid`` (every value), ``choice`` (sampled), ``uniform`` / ``loguniform``
    ([low, high], sampled)."""

    model_config = ConfigDict(extra="forbid")

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ParamSpace":
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {', '.join(given) or 'none'})")
        return self


class AshaConfig(BaseModel):
    """ASHA early stopping on the selection metric, one rung per ``grace_period`` x ``reduction_factor``^k epochs."""

    model_config = ConfigDict(extra="forbid")

    grace_period: int = Field(2, ge=1, description="epochs every trial runs before it can be stopped")
    reduction_factor: int = Field(2, ge=2)


class SweepConfig(TrainConfig):
    """``raydecode sweep``: per-subject adaptations x a search space, on Ray Tune; every trial is a training run
    (the ``pretrain`` stage's keys are the base of every trial) and an MLflow child run of the sweep's run."""

    run_name: str | None = "sweep"
    method: str = "duala"
    subjects: list[int] = Field(default_factory=lambda: [8], description="new subjects, each adapted on its own")
    space: dict[str, ParamSpace] = Field(default_factory=dict,
                                         description="dotted trial-config keys (model.margin, optim.lr, ...) -> values")
    search: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid/random: Tune's variant generator (num_samples draws of sampled keys); "
                            "optuna: OptunaSearch over sampled keys (no grid), one search per subject")
    num_samples: int = Field(1, ge=1)
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="optuna: each subject's search starts with these points (every space key "
                                          "-> a value, e.g. the paper's defaults); the rest of num_samples are sampled")
    asha: AshaConfig | None = None
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster's possible "
                                                                      "nodes fit (its autoscaler's node types, else "
                                                                      "its nodes)")
    trial_retries: int = Field(1, ge=0, description="a failed trial (a lost node, a worker health check) starts "
                                                    "again up to this many times, from its training run's last "
                                                    "checkpoint")
    metric: str = Field("retrieval.image_to_brain_top1", description="selects the best trial per subject")
    tie_break: str = "retrieval.brain_to_image_top1"
    promote: bool = Field(True, description="register the best trial per subject and apply the champion gate")


class ReconstructOptions(BaseModel):
    """Test-set reconstructions (DDIM with classifier-free guidance) and their metrics."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, ge=1, description="DDIM steps (default: the model's, Dynadiff 20)")
    guidance: float | None = Field(None, ge=0, description="classifier-free guidance (default: the model's, 3)")
    seed: int = Field(0, description="initial noise: one seed per (subject, image) derived from this")
    batch_size: int = Field(32, ge=1)
    size: int | None = Field(None, ge=8, description="images resized to this for PixCorr/SSIM (default: the "
                                                     "method's paper: Dynadiff 224, MindEye2 425)")
    grid_images: int = Field(16, ge=1, description="stimulus/reconstruction pairs in the grid PNG")
    max_images: int | None = Field(None, ge=1, description="reconstruct at most this many test images (the first by "
                                                          "subject and image id; metrics on them); None: all")
    single_trial: bool = Field(True, description="also reconstruct one random single-trial window per test image")


class TimeResolvedOptions(BaseModel):
    """Time-resolved decoding (Dynadiff Sec. 3.1): the trained ("general") model on shifted windows
    W(t + k*TR, d) (the evaluation suite's ``shift+k`` protocols), and optionally "specialized" models trained at
    shifted windows (a sweep over ``model.window.start_s``)."""

    model_config = ConfigDict(extra="forbid")

    shifts: list[int] = Field(default_factory=lambda: list(range(-3, 4)), description="k, in TRs")
    reconstruct: bool = Field(False, description="also reconstruct at every shift (PixCorr/SSIM per shift); "
                                                 "the test diffusion loss is always measured")
    specialized: list[int] = Field(default_factory=list, description="train one model per shift k (TRs): a sweep "
                                                                     "over model.window.start_s, per subject")


class DiffusionDecodeConfig(TrainConfig):
    """``raydecode dynadiff``: train a diffusion decoder (the ``pretrain`` stage's keys), reconstruct the test set
    (grid PNG, PixCorr/SSIM, averaged and single-trial), time-resolved curves, then register and gate the model."""

    run_name: str | None = "dynadiff"
    method: str = "dynadiff"
    reconstruct: ReconstructOptions = Field(default_factory=ReconstructOptions)
    time_resolved: TimeResolvedOptions = Field(default_factory=TimeResolvedOptions)
    checkpoint_uri: str | None = Field(None, description="`dynadiff reconstruct`: the final/ checkpoint to evaluate "
                                                         "(default: <storage>/<run_name>/final)")
    promote: bool = Field(True, description="register the model (raydecode-<method>-subjNN) and apply the gate")
    metric: str = Field("recon.pixcorr", description="what the champion gate compares (higher is better)")
    tie_break: str = "test.image_gain"
    evaluate: dict[str, Any] = Field(
        default_factory=dict, description="the evaluation suite's keys for this stage's evaluation (raydecode "
                                          "evaluate's config, e.g. metric_nets: null for the papers' metric networks, "
                                          "actors, tsne); by default PixCorr/SSIM and the test losses only")


class RetrievalOptions(BaseModel):
    """MindEye's retrieval protocol: top-1 among ``candidates`` random test samples, averaged over ``draws``."""

    model_config = ConfigDict(extra="forbid")

    candidates: int = Field(300, ge=2, description="candidate set size (MindEye: 300 of the 1000 shared images)")
    draws: int = Field(30, ge=1)
    seed: int = 0


class EvalReconstructOptions(ReconstructOptions):
    """Reconstructions in ``raydecode evaluate`` (``single_trial`` is decided by ``protocols`` there)."""

    enabled: bool = Field(True, description="reconstruct images (methods that generate them, or CLIP-space methods "
                                            "when `decoder` is set)")
    shifted: bool = Field(False, description="also reconstruct in the time-shifted protocols (shift+k)")


class EvaluateConfig(StageConfig):
    """``raydecode evaluate``: a trained model on the store's test split (shared images), averaged repetitions and
    single trials, as Ray Data batch inference (an actor pool; GPUs when the cluster has them): retrieval, the
    reconstruction metrics, semantic metrics, plots; one MLflow evaluation run linked to the model's run."""

    model: str | None = Field(None, description="models:/name@alias, models:/name/version, runs:/<id>/model or a "
                                                "final/ checkpoint URI")
    experiment: str = Field("raydecode-evaluate", description="MLflow experiment of evaluation runs")
    run_name: str | None = Field(None, description="default: evaluate <model>")
    ray_address: str | None = Field(None, description="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    subjects: list[int] | None = Field(None, description="default: the model's subjects")
    protocols: list[str] = Field(
        default_factory=lambda: ["averaged", "single"],
        description="averaged: repetitions averaged per image (MindEye2); single: one drawn presentation per image "
                    "(Dynadiff); shift+K / shift-K: averaged, on windows shifted by K TRs (methods that read "
                    "time-series windows: time-resolved decoding). Metrics of a protocol other than averaged are "
                    "named <kind>.<protocol>.<name> (shift+2: shift2, shift-2: shift-2)")
    retrieval: RetrievalOptions = Field(default_factory=RetrievalOptions)
    reconstruct: EvalReconstructOptions = Field(default_factory=EvalReconstructOptions)
    decoder: str | dict[str, Any] | None = Field(
        None, description="methods that predict image embeddings: the image generator (raydecode.evaluate.unclip: a "
                          "preset name, tiny or demo, or a config with `path` to a diffusers directory; "
                          "{kind: ip-adapter, ...}: SD 1.5 + IP-Adapter Plus, raydecode.evaluate.ipadapter); "
                          "None: no reconstructions")
    metric_nets: list[dict[str, Any]] | None = Field(
        None, description="metric networks (raydecode.evaluate.feature_metrics.MetricNet); default: the method's "
                          "paper's (MindEye2's six; Dynadiff's at 224 px with CLIP-12), random unless `weights`")
    allow_random_weights: bool = Field(False, description="evaluate a paper-preset model with metric networks "
                                                          "that have no weights (their numbers mean nothing; the run "
                                                          "is tagged raydecode.random_metric_nets). Default: refused")
    tsne: bool = Field(True, description="t-SNE of the backbone embeddings, by subject and by class")
    batch_size: int = Field(32, ge=1, description="rows per inference batch")
    actors: int = Field(1, ge=1, description="inference actors (one model each)")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs Ray reserves per inference actor (default fits a "
                                                         "2-core laptop beside the reads)")
    use_gpu: bool | None = Field(None, description="one GPU per actor; default: when the cluster can have GPUs "
                                                   "(its autoscaler's node types, else its nodes)")
    wait_for_nodes_s: float = Field(600.0, ge=0, description=WAIT_FOR_NODES)
    data: DataSelection = Field(default_factory=DataSelection, description="read_cpus of the test read")

    @field_validator("protocols")
    @classmethod
    def _known_protocols(cls, value: list[str]) -> list[str]:
        for p in value:
            protocol_shift(p)
        if len(set(value)) != len(value) or not value:
            raise ValueError(f"give each protocol once, at least one (got {value})")
        return value


def protocol_shift(protocol: str) -> int | None:
    """The TR shift of a ``shift+K`` / ``shift-K`` protocol (None for ``averaged`` / ``single``)."""
    if protocol in ("averaged", "single"):
        return None
    m = re.fullmatch(r"shift([+-])(\d+)", protocol)
    if m is None or int(m.group(2)) == 0:
        raise ValueError(f"protocol {protocol!r}: allowed values: averaged, single, shift+K, shift-K (K > 0 TRs)")
    return int(m.group(2)) * (1 if m.group(1) == "+" else -1)


def protocol_infix(protocol: str) -> str:
    """The protocol's part of a metric name (MLflow names allow no ``+``): single, shift2, shift-2."""
    return protocol.replace("+", "")


class CompareConfig(StageConfig):
    """``raydecode compare``: the papers' Table 1 for several evaluated models, read from their evaluation runs."""

    # `compare --config jobs/evaluate.yaml`: the evaluation's config names the store and the tracking server
    reads_file_of: ClassVar[type[BaseModel]] = EvaluateConfig
    models: list[str] = Field(default_factory=list)
    experiment: str = Field("raydecode-evaluate", description="MLflow experiment of evaluation runs")


# -- the stage table: which config each stage reads (cli, submit, --print-config) ---------------------------------

STAGE_CONFIGS: dict[tuple[str, ...], type[StageConfig]] = {
    ("ingest", "synthetic"): IngestSyntheticConfig, ("ingest", "nsd"): IngestNSDConfig,
    ("ingest", "mindeye2"): IngestMindEye2Config, ("embed",): EmbedConfig, ("info",): InfoConfig,
    ("pretrain",): TrainConfig, ("sweep",): SweepConfig, ("dynadiff",): DiffusionDecodeConfig,
    ("dynadiff", "train"): DiffusionDecodeConfig, ("dynadiff", "reconstruct"): DiffusionDecodeConfig,
    ("evaluate",): EvaluateConfig, ("compare",): CompareConfig, ("promote",): StageConfig, ("demo",): DemoConfig,
    ("claims",): ClaimsConfig,
}


def commented_yaml(cfg: BaseModel, indent: int = 0) -> str:
    """``cfg`` as YAML with every key's description as a comment above it (``--print-config``); credentials that
    are set print as ``"***"``."""
    import textwrap

    pad = " " * indent
    lines: list[str] = []
    dumped = cfg.model_dump(mode="json")
    for name, field in type(cfg).model_fields.items():
        if field.description:
            lines += [f"{pad}# {line}" for line in textwrap.wrap(field.description, 116 - indent)]
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            lines.append(commented_yaml(value, indent + 2))
            continue
        shown = ("***" if value is not None else None) if field.exclude else dumped[name]  # credentials
        if isinstance(shown, dict) and shown:
            text = yaml.safe_dump({name: shown}, default_flow_style=False, sort_keys=False).rstrip()
        else:
            flat = yaml.safe_dump(shown, default_flow_style=True, width=10**6).strip()
            text = f"{name}: {flat.removesuffix('...').strip()}"
        lines += [pad + line for line in text.splitlines()]
    return "\n".join(lines)
