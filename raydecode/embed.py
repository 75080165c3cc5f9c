"""``raydecode embed``: frozen image targets (OpenCLIP tokens, CLIP feature levels, VAE latents) written into a store.

For each encoder, one ``embeddings/<encoder>/part-NNNNN.parquet`` per stimulus
shard (same file name, same image ids, sorted), computed in one Ray Data job over
the stimulus shards: PNG decoding in CPU tasks, then an actor pool holding the
frozen encoders (:class:`~raydecode.nn.encoders.FrozenEncoder`; each image's
caption goes along for those that read it), one GPU per
actor where the cluster has GPUs, CPU otherwise. The driver streams the results
back in order and writes each shard whole as soon as all its images have arrived
(:class:`~raydecode.data.store.StoreWriter`: validated, atomic), then rewrites
the manifest LAST with the new shards and the ``embeddings[<encoder>]`` entry, so
an interrupted embed never looks complete.

Idempotent: an encoder the manifest already lists with the same provenance
(kind, arch, weights, image size, seed) is skipped; with a different one it is
refused. Shards an interrupted run finished carry their encoder's entry in their
parquet metadata and are kept by the next run with the same encoder.
"""

from __future__ import annotations

import io
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError
from tqdm.auto import tqdm

from raydecode.config import format_validation_error
from raydecode.data.schema import EncoderInfo, Manifest, ShardInfo, embeddings_schema
from raydecode.data.store import Store, StoreWriter, open_store
from raydecode.errors import ConfigError, StoreError, UserError, user_errors_from_ray
from raydecode.nn.encoders import ENCODERS, EncoderConfig, FrozenEncoder, encoder_config
from raydecode.runtime import Demand, cluster_shape, init_ray, require
from raydecode.storage import S3Options

METADATA_KEY = b"raydecode.encoder"  # parquet metadata of an embeddings shard: its EncoderInfo as JSON
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class EmbedResult:
    manifest: Manifest
    status: str  # "written", "completed" (kept shards of an interrupted run) or "unchanged"
    written: list[str]  # encoders added to the store
    skipped: list[str]  # encoders already in the store with the same provenance
    shards_written: int
    shards_kept: int
    images: int  # images in the store
    images_encoded: int  # images run through the encoders by this call
    device: str  # "gpu", "cpu" or "" (nothing to compute)
    seconds: float
    encoders: dict[str, EncoderInfo] = field(default_factory=dict)  # the requested encoders' entries
    store: str = ""  # the store's URI


def resolve_encoders(refs: list[Any]) -> list:
    """Encoder names or mappings -> :class:`EncoderConfig` s; a bad one is a one-line ConfigError."""
    if not refs:
        raise ConfigError(f"no encoders given: pass --encoder NAME (one of {', '.join(ENCODERS)}) "
                          "or list `encoders` in the config")
    cfgs = []
    for n, ref in enumerate(refs):
        try:
            cfg = encoder_config(ref)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(EncoderConfig, exc, f"encoders.{n}").replace("\n", "; ")) from exc
        if not _NAME.match(cfg.name):
            raise ConfigError(f"encoder name {cfg.name!r}: use letters, digits, '.', '_' and '-' (it names a store folder)")
        cfgs.append(cfg)
    names = [c.name for c in cfgs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"encoder {', '.join(map(repr, dupes))} is listed more than once")
    return cfgs


def provenance(cfg) -> dict:
    """What made an encoder's embeddings, as recorded in :class:`EncoderInfo` (and compared on re-runs)."""
    random_vae = cfg.kind == "vae" and cfg.weights is None
    return {
        "kind": cfg.kind, "arch": cfg.arch, "weights": cfg.weights, "image_size": cfg.image_size, "seed": cfg.seed,
        "tiny_channels": tuple(cfg.tiny_channels) if random_vae else None,
    }


def encoder_info(cfg, tokens_shape: tuple[int, ...], pooled_dim: int) -> EncoderInfo:
    return EncoderInfo(name=cfg.name, tokens_shape=tuple(int(n) for n in tokens_shape), pooled_dim=int(pooled_dim),
                       **provenance(cfg))


def shard_path(encoder: str, stimulus_shard: ShardInfo) -> str:
    """``embeddings/<encoder>/<the stimulus shard's file name>``."""
    return f"embeddings/{encoder}/{posixpath.basename(stimulus_shard.path)}"


def _describe(prov: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in prov.items() if v is not None)


def _shard_encoder(metadata: pq.FileMetaData) -> EncoderInfo | None:
    raw = (metadata.schema.to_arrow_schema().metadata or {}).get(METADATA_KEY)
    try:
        return EncoderInfo.model_validate_json(raw) if raw else None
    except ValidationError:
        return None


# -- the Ray Data job ----------------------------------------------------------------------


def read_stimuli(batch: dict[str, np.ndarray], filesystem) -> pa.Table:
    """Stimulus shard paths -> their (image_id, image, caption) rows, read with pyarrow through the store's
    filesystem."""
    tables = []
    for path in batch["path"]:
        try:
            with filesystem.open_input_file(path) as f:
                tables.append(pq.read_table(f, columns=["image_id", "image", "caption"]))
        except Exception as exc:
            raise StoreError(f"{path}: unreadable stimulus shard ({str(exc).splitlines()[0] if str(exc) else exc!r})") from exc
    return pa.concat_tables(tables)


def decode_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PNG bytes -> uint8 HxWx3 (stacked when all images have one size, else an object array)."""
    from PIL import Image

    images = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch["image"]]
    if len({im.shape for im in images}) <= 1:
        stacked = np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)
    else:
        stacked = np.empty(len(images), dtype=object)
        stacked[:] = images
    return {"image_id": batch["image_id"], "image": stacked, "caption": batch["caption"]}


def _token_column(name: str) -> str:
    return f"tokens.{name}"


def _pooled_column(name: str) -> str:
    return f"pooled.{name}"


class EncodeImages:
    """Ray Data actor: holds the frozen encoders; a batch of images (and their captions) -> float16 tokens and
    pooled vectors per encoder."""
    def __init__(self, configs: list[dict], device: str, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = device
        self.error: UserError | None = None
        try:
            self.encoders = {c["name"]: FrozenEncoder(EncoderConfig(**c)).to(device) for c in configs}
        except UserError as exc:  # e.g. missing weights: raised from the first batch, where Ray keeps the cause
            self.error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        if self.error is not None:
            raise self.error

        images, captions = batch["image"], batch["caption"]
        n = len(batch["image_id"])
        if images.dtype == object:  # images of different sizes: encode each size on its own
            groups: dict[tuple, list[int]] = {}
            for i, im in enumerate(images):
                groups.setdefault(im.shape, []).append(i)
            parts = [(np.array(ix), np.stack([images[i] for i in ix])) for ix in groups.values()]
        else:
            parts = [(np.arange(n), images)]
        out: dict[str, np.ndarray] = {"image_id": batch["image_id"]}
        for name, enc in self.encoders.items():
            tokens = np.empty((n, *enc.tokens_shape), np.float16)
            pooled = np.empty((n, enc.pooled_dim), np.float16)
            for ix, ims in parts:
                t, p = enc.encode(torch.from_numpy(np.ascontiguousarray(ims)), [str(c) for c in captions[ix]])
                tokens[ix] = t.cpu().numpy().astype(np.float16)
                pooled[ix] = p.cpu().numpy().astype(np.float16)
            out[_token_column(name)] = tokens
            out[_pooled_column(name)] = pooled
        return out


@dataclass(frozen=True)
class EmbedCompute:
    """Where the encoders run: asked of Ray (and its autoscaler), not read off the cluster at one instant."""
    ray_address: str | None = None
    use_gpu: bool | None = None  # None: when the cluster can have GPUs
    actors: int | None = None  # None: one per GPU the cluster can have; on CPU from its CPUs
    wait_for_nodes_s: float = 600.0


def _compute_resources(compute: EmbedCompute) -> tuple[str, Any, dict, int | None]:
    """(device, actor pool, actor resources, torch threads): one GPU per actor where the cluster can have GPUs (the
    autoscaler brings them as the pool asks); otherwise CPU actors sized to leave CPUs for reading and decoding."""
    from ray.data import ActorPoolStrategy

    shape = cluster_shape()
    gpu = shape.has("GPU") if compute.use_gpu is None else compute.use_gpu
    if gpu:
        actors = compute.actors or max(1, int(shape.total("GPU")))
        require(Demand("embed", [{"GPU": 1.0}], hint="set use_gpu: false or add GPU nodes"), compute.wait_for_nodes_s)
        return "gpu", ActorPoolStrategy(min_size=1, max_size=actors), {"num_gpus": 1}, None
    cpus = int(max((n.get("CPU", 0) for n in shape.nodes), default=1))  # the largest node holds one actor's threads
    per_actor = max(1, min(4, cpus // 2))
    actors = compute.actors or max(1, int(shape.total("CPU")) // (2 * per_actor))
    require(Demand("embed", [{"CPU": float(per_actor)}], extra=[{"CPU": 1.0}],
                   hint="add a node with more CPUs"), compute.wait_for_nodes_s)
    return "cpu", ActorPoolStrategy(min_size=1, max_size=actors), {"num_cpus": per_actor}, per_actor


def _embeddings_table(ids: np.ndarray, tokens: np.ndarray, pooled: np.ndarray, info: EncoderInfo) -> pa.Table:
    def fixed(values: np.ndarray) -> pa.FixedSizeListArray:
        flat = np.ascontiguousarray(values, np.float16).reshape(len(values), -1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), flat.shape[1])

    table = pa.table({"image_id": pa.array(ids, pa.int32()), "tokens": fixed(tokens), "pooled": fixed(pooled)})
    table = table.cast(embeddings_schema(info.tokens_shape, info.pooled_dim))
    return table.replace_schema_metadata({METADATA_KEY: info.model_dump_json().encode()})


def _encode_and_write(
    store: Store, writer: StoreWriter, cfgs: list, pending: dict[str, list[ShardInfo]],
    infos: dict[str, EncoderInfo], batch_size: int, progress: bool, compute: EmbedCompute,
) -> tuple[int, int, str]:
    """Run the Ray Data job over the stimulus shards some encoder still needs; write each finished shard."""
    import ray.data

    init_ray(compute.ray_address)
    need = sorted({s.path for shards in pending.values() for s in shards})
    stim = [s for s in store.manifest.shards_of("stimuli") if s.path in need]
    stim.sort(key=lambda s: s.image_id_min)
    device, pool, resources, threads = _compute_resources(compute)
    # one item per stimulus shard (listed in the manifest: nothing is listed in the bucket)
    ds = ray.data.from_items([{"path": store.location(s).path} for s in stim], override_num_blocks=len(stim))
    ds = ds.map_batches(read_stimuli, fn_kwargs={"filesystem": store.root.fs}, batch_size=1, batch_format="numpy")
    ds = ds.map_batches(decode_images, batch_size=batch_size, batch_format="numpy")
    ds = ds.map_batches(
        EncodeImages,
        fn_constructor_args=([c.model_dump() for c in cfgs], "cuda" if device == "gpu" else "cpu", threads),
        batch_size=batch_size, batch_format="numpy", compute=pool, **resources,
    )
    ds.context.execution_options.preserve_order = True  # shards complete one after another: bounded driver memory

    lows = np.array([s.image_id_min for s in stim], np.int64)
    buffers: dict[str, list[dict[str, np.ndarray]]] = {s.path: [] for s in stim}
    counts = {s.path: 0 for s in stim}
    written = encoded = 0

    def flush(sh: ShardInfo) -> int:
        parts = buffers.pop(sh.path)
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(batch["image_id"], kind="stable")
        ids = batch["image_id"][order]
        n = 0
        for cfg in cfgs:
            if sh not in pending[cfg.name]:
                continue
            tokens, pooled = batch[_token_column(cfg.name)][order], batch[_pooled_column(cfg.name)][order]
            info = encoder_info(cfg, tokens.shape[1:], pooled.shape[1])
            if infos.setdefault(cfg.name, info) != info:
                raise StoreError(f"encoder {cfg.name!r} produced {info.tokens_shape} tokens for {sh.path}, "
                                 f"{infos[cfg.name].tokens_shape} for another shard")
            writer.write_shard(shard_path(cfg.name, sh), "embeddings", _embeddings_table(ids, tokens, pooled, info),
                               encoder_info=info, encoder=cfg.name,
                               image_id_min=sh.image_id_min, image_id_max=sh.image_id_max)
            n += 1
        return n

    bar = tqdm(total=sum(s.rows for s in stim), desc="embed", unit="image", disable=not progress)
    with bar, user_errors_from_ray():  # a user error in an encoder actor reaches the user as itself
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ids = batch["image_id"]
            which = np.searchsorted(lows, ids, side="right") - 1
            for k in np.unique(which):
                sel = which == k
                sh = stim[int(k)] if k >= 0 else None
                if sh is None or sh.path not in buffers or ids[sel].max() > sh.image_id_max:
                    raise StoreError(f"embed: image ids {ids[sel][:3].tolist()} belong to no stimulus shard of {store.uri}")
                buffers[sh.path].append({c: v[sel] for c, v in batch.items()})
                counts[sh.path] += int(sel.sum())
                if counts[sh.path] == sh.rows:
                    written += flush(sh)
            encoded += len(ids)
            bar.update(len(ids))
    short = {p: c for p, c in counts.items() if p in buffers}
    if short:
        p, c = next(iter(short.items()))
        raise StoreError(f"embed: {store.root.join(p).uri} yielded {c} images, the manifest lists more; "
                         f"run `raydecode info --verify {store.uri}`")
    return written, encoded, device


def run_embed(
    store_uri: str,
    encoders: list,
    s3: S3Options | None = None,
    batch_size: int = 64,
    progress: bool = True,
    compute: EmbedCompute | None = None,
) -> EmbedResult:
    """Write the embeddings of every stimulus image for each of ``encoders`` (names, mappings or
    :class:`EncoderConfig` s) into the store at ``store_uri``; manifest last. Starts (or joins) Ray only
    when there is something to compute."""
    t0 = time.time()
    cfgs = resolve_encoders(encoders)
    store = open_store(store_uri, s3)
    m = store.manifest
    todo, skipped = [], []
    for cfg in cfgs:
        have = m.embeddings.get(cfg.name)
        if have is None:
            todo.append(cfg)
        elif have.provenance() != provenance(cfg):
            made = _describe(have.provenance()) or "unrecorded settings"
            raise StoreError(
                f"store {store.uri} already holds embeddings {cfg.name!r} made with {made}; "
                f"refusing to replace them with {_describe(provenance(cfg))} (give this encoder another name)"
            )
        else:
            skipped.append(cfg.name)
    readers = [c.name for c in todo if c.kind == "clip-levels"]
    if readers and "captions" in m.absent:
        raise StoreError(f"store {store.uri} has no captions (its manifest lists them absent); encoder {readers[0]!r} "
                         "reads them: ingest with --coco DIR (COCO 2017 annotations)")
    stim = m.shards_of("stimuli")
    if not stim:
        raise StoreError(f"store {store.uri} has no stimulus shards to embed")
    unranged = [s.path for s in stim if s.image_id_min is None or s.image_id_max is None]
    if unranged:
        raise StoreError(f"{store.root.join('manifest.json').uri}: stimulus shard {unranged[0]} has no "
                         "image_id_min/image_id_max (re-run the ingest with this raydecode)")
    if not todo:
        return EmbedResult(m, "unchanged", [], skipped, 0, 0, m.n_images, 0, "", time.time() - t0,
                           {c.name: m.embeddings[c.name] for c in cfgs}, store.uri)

    writer = StoreWriter.extending(store)
    infos: dict[str, EncoderInfo] = {}
    pending: dict[str, list[ShardInfo]] = {}
    kept = 0
    for cfg in todo:
        pending[cfg.name] = []
        for sh in stim:
            def same_encoder(md: pq.FileMetaData, cfg=cfg, sh=sh) -> bool:
                info = _shard_encoder(md)
                if (info is None or info.name != cfg.name or info.provenance() != provenance(cfg)
                        or md.num_rows != sh.rows or infos.get(cfg.name, info) != info):
                    return False
                infos[cfg.name] = info
                return True

            found = writer.existing_shard(shard_path(cfg.name, sh), "embeddings", accept=same_encoder, encoder=cfg.name,
                                          image_id_min=sh.image_id_min, image_id_max=sh.image_id_max)
            if found is not None:
                kept += 1
            else:
                pending[cfg.name].append(sh)
    written = encoded = 0
    device = ""
    if any(pending.values()):
        written, encoded, device = _encode_and_write(store, writer, todo, pending, infos, batch_size, progress,
                                                    compute or EmbedCompute())
    manifest = writer.commit(embeddings={c.name: infos[c.name] for c in todo})
    return EmbedResult(
        manifest, "completed" if kept else "written", [c.name for c in todo], skipped, written, kept,
        manifest.n_images, encoded, device, time.time() - t0, {c.name: manifest.embeddings[c.name] for c in cfgs},
        store.uri,
    )
