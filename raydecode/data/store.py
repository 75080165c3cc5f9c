"""Reading, writing and verifying an NSD store (local directory or S3 prefix).

Writers are idempotent and atomic: each shard is validated, then written whole
(temporary file + rename, or a single S3 PUT), and ``manifest.json`` is written
last. A store without a manifest is incomplete; re-running the same ingest
completes it, skipping the shards already there.

Readers open the manifest first and check it and the shards' schemas before any
training starts, refusing a mismatch with a message naming the file and field.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

import raydecode
from raydecode.data.schema import (
    BEGUN,
    MANIFEST,
    N_CATEGORIES,
    SCHEMA_VERSION,
    SPLITS,
    EncoderInfo,
    Manifest,
    ShardInfo,
    SubjectInfo,
    schema_for,
)
from raydecode.errors import ConfigError, StorageError, StoreError
from raydecode.storage import Location, S3Options, resolve


@dataclass
class Problem:
    """One thing wrong with one file of a store."""

    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def _pydantic_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(root)"
    return f"field '{field}': {err['msg']}"


# ---------------------------------------------------------------------------------------
# Validation of shard contents, shared by the writer (before writing) and by `info --verify`.
# ---------------------------------------------------------------------------------------


def _schema_problem(expected: pa.Schema, actual: pa.Schema) -> str | None:
    exp = {f.name: f.type for f in expected}
    act = {f.name: f.type for f in actual}
    for name, typ in exp.items():
        if name not in act:
            return f"missing field '{name}' ({typ})"
        if act[name] != typ:
            if name == "betas" and pa.types.is_fixed_size_list(act[name]) and pa.types.is_fixed_size_list(typ):
                return f"field 'betas' has {act[name].list_size} values per trial, expected {typ.list_size} (the subject's voxel count)"
            if name in ("tokens", "pooled") and pa.types.is_fixed_size_list(act[name]) and pa.types.is_fixed_size_list(typ):
                return f"field '{name}' has {act[name].list_size} values per image, expected {typ.list_size} (the manifest's encoder shape)"
            return f"field '{name}' has type {act[name]}, expected {typ}"
    extra = sorted(set(act) - set(exp))
    if extra:
        return f"unexpected field(s) {', '.join(extra)}"
    return None


def _nonfinite(values: pa.Array) -> int:
    arr = values.to_numpy(zero_copy_only=False)
    return int(arr.size - np.isfinite(arr).sum())


def validate_table(
    kind: str,
    table: pa.Table,
    subject: SubjectInfo | None = None,
    session: int | None = None,
    stimulus_ids: set[int] | None = None,
    encoder: EncoderInfo | None = None,
) -> list[str]:
    """Problems with one shard's contents (empty if it follows the contract).

    ``encoder`` (embeddings): the manifest's entry, whose shapes the shard must have."""
    if kind == "embeddings" and encoder is None:
        return ["embeddings shard of an encoder that is not in the manifest's 'embeddings'"]
    expected = schema_for(kind, subject.voxels if (subject and kind == "trials") else None, encoder)
    problem = _schema_problem(expected, table.schema)
    if problem:
        return [problem]
    problems: list[str] = []
    if kind in ("trials", "timeseries"):
        assert subject is not None
        bad = pc.not_equal(table["subject"], subject.subject)
        if pc.any(bad).as_py():
            problems.append(f"field 'subject' holds values other than {subject.subject}")
        if session is not None and pc.any(pc.not_equal(table["session"], session)).as_py():
            problems.append(f"field 'session' holds values other than {session}")
    return problems + _CONTENT_CHECKS[kind](table, subject, stimulus_ids)


def _nonfinite_problem(table: pa.Table, name: str) -> list[str]:
    flat = table[name].combine_chunks().flatten() if table.num_rows else pa.array([], pa.float16())
    n_bad = _nonfinite(flat)
    return [f"field '{name}' holds {n_bad} NaN/Inf values"] if n_bad else []


def _sorted_ids_problem(ids: np.ndarray) -> list[str]:
    if len(ids) and (np.diff(ids) <= 0).any():
        return ["field 'image_id' is not strictly increasing (shards are sorted by image_id)"]
    return []


def _check_trials(table: pa.Table, subject, stimulus_ids) -> list[str]:
    problems = []
    splits = set(table["split"].unique().to_pylist())
    if not splits <= set(SPLITS):
        problems.append(f"field 'split' holds {sorted(splits - set(SPLITS))}, allowed: {', '.join(SPLITS)}")
    problems += _nonfinite_problem(table, "betas")
    if stimulus_ids is not None:
        missing = sorted(set(table["image_id"].unique().to_pylist()) - stimulus_ids)
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            problems.append(f"field 'image_id' points at {len(missing)} image(s) missing from stimuli: {shown}")
    return problems


def _check_timeseries(table: pa.Table, subject, stimulus_ids) -> list[str]:
    problems = []
    n_vox = table["n_voxels"].to_numpy()
    n_tr = table["n_tr"].to_numpy()
    if (n_vox != subject.voxels).any():
        problems.append(f"field 'n_voxels' differs from the subject's {subject.voxels} voxels")
    if (pc.list_value_length(table["bold"]).to_numpy() != n_vox * n_tr).any():
        problems.append("field 'bold' length is not n_voxels * n_tr")
    if (pc.list_value_length(table["design"]).to_numpy() != n_tr).any():
        problems.append("field 'design' length is not n_tr")
    return problems + _nonfinite_problem(table, "bold")


def _check_stimuli(table: pa.Table, subject, stimulus_ids) -> list[str]:
    problems = _sorted_ids_problem(table["image_id"].to_numpy())
    cats = table["categories"].combine_chunks().flatten().to_numpy(zero_copy_only=False) if table.num_rows else []
    if len(cats) and (np.asarray(cats) > 1).any():
        problems.append(f"field 'categories' is not {N_CATEGORIES}-way multi-hot (values other than 0/1)")
    return problems


def _check_embeddings(table: pa.Table, subject, stimulus_ids) -> list[str]:
    ids = table["image_id"].to_numpy()
    problems = _sorted_ids_problem(ids) + _nonfinite_problem(table, "tokens") + _nonfinite_problem(table, "pooled")
    if stimulus_ids is not None:
        missing = sorted(set(ids.tolist()) - stimulus_ids)
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            problems.append(f"field 'image_id' holds {len(missing)} id(s) that are not stimuli: {shown}")
    return problems


def _check_voxels(table: pa.Table, subject, stimulus_ids) -> list[str]:
    assert subject is not None
    problems = []
    if table.num_rows != subject.voxels:
        problems.append(f"{table.num_rows} rows, expected one per voxel ({subject.voxels})")
    elif not np.array_equal(table["voxel"].to_numpy(), np.arange(subject.voxels)):
        problems.append("field 'voxel' is not 0..voxels-1 in order")
    for axis, size in zip("ijk", subject.grid_shape):
        c = table[axis].to_numpy()
        if len(c) and (c.min() < 0 or c.max() >= size):
            problems.append(f"field '{axis}' falls outside the grid shape {tuple(subject.grid_shape)}")
    return problems


# what each kind of shard must hold beyond its schema
_CONTENT_CHECKS = {"trials": _check_trials, "timeseries": _check_timeseries, "stimuli": _check_stimuli,
                   "embeddings": _check_embeddings, "voxels": _check_voxels}


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=256)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------


class Store:
    """An opened store: its root location and validated manifest."""

    def __init__(self, root: Location, manifest: Manifest, s3: S3Options | None = None):
        self.root = root
        self.manifest = manifest
        self.s3 = s3

    @property
    def uri(self) -> str:
        return self.root.uri

    def location(self, shard: ShardInfo | str) -> Location:
        return self.root.join(shard.path if isinstance(shard, ShardInfo) else shard)

    def check_subjects(self, subjects: Iterable[int] | None, hold_out: Iterable[int] = ()) -> list[int]:
        """The requested subjects, or all but ``hold_out``; an unknown id, or a subject both requested and held
        out, is an error naming it."""
        known = self.manifest.subject_ids
        hold_out = [int(s) for s in hold_out]
        requested = [int(s) for s in subjects] if subjects is not None else None
        unknown = [s for s in (requested or []) + hold_out if s not in known]
        if unknown:
            raise StoreError(
                f"unknown subject {', '.join(map(str, unknown))} in store {self.uri}; "
                f"available: {', '.join(map(str, known))}"
            )
        if requested is None:
            requested = [s for s in known if s not in hold_out]
            if not requested:
                raise ConfigError(f"data.hold_out {hold_out}: holds out every subject of store {self.uri}")
        both = [s for s in requested if s in hold_out]
        if both:
            raise ConfigError(f"data.subjects and data.hold_out both name subject {', '.join(map(str, both))}")
        return requested

    def sessions_of(self, subject: int) -> list[int]:
        """The session numbers the store holds for ``subject`` (NSD's numbering: an ingest of a subset keeps it)."""
        return sorted({s.session for s in self.manifest.shards_of("trials", subjects=[subject]) if s.session is not None})

    def check_sessions(self, subjects: list[int], sessions: Iterable[int] | None) -> list[int] | None:
        if sessions is None:
            return None
        sessions = [int(s) for s in sessions]
        for subj in subjects:
            have = self.sessions_of(subj)
            bad = [s for s in sessions if s not in have]
            if bad:
                if not have:
                    held = "no sessions"
                elif have == list(range(have[0], have[-1] + 1)):
                    held = f"sessions {have[0]}..{have[-1]}"
                else:
                    held = "sessions " + ", ".join(map(str, have))
                raise StoreError(f"session {', '.join(map(str, bad))} out of range for subject {subj} in {self.uri} ({held})")
        return sessions

    def read_shard(self, shard: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        loc = self.location(shard)
        try:
            with loc.open_input_file() as f:
                return pq.read_table(f, columns=columns)
        except StorageError:
            raise
        except Exception as exc:
            raise StoreError(f"{loc.uri}: unreadable parquet shard ({exc})") from exc

    def voxel_table(self, subject: int) -> pa.Table:
        """For every position of the subject's beta vector: voxel, i, j, k, roi; the grid shape is in the
        manifest and in the table's schema metadata (``grid_shape``: "X,Y,Z")."""
        self.check_subjects([subject])
        (shard,) = self.manifest.shards_of("voxels", subjects=[subject])
        table = self.read_shard(shard)
        grid = ",".join(map(str, self.manifest.subject(subject).grid_shape))
        return table.replace_schema_metadata({**(table.schema.metadata or {}), b"grid_shape": grid.encode()})

    def check_schemas(
        self, kinds: Iterable[str] = ("trials",), subjects: list[int] | None = None, encoders: list[str] | None = None
    ) -> None:
        """Read each relevant shard's footer (not its data) and compare its schema with the contract.

        ``encoders``: which encoders' embeddings shards to check (default: all in the manifest)."""
        for kind in kinds:
            shards = self.manifest.shards_of(kind, subjects=subjects)
            if kind == "embeddings" and encoders is not None:
                shards = [s for s in shards if s.encoder in encoders]
            for shard in shards:
                loc = self.location(shard)
                try:
                    with loc.open_input_file() as f:
                        schema = pq.read_schema(f)
                except StorageError:
                    raise
                except Exception as exc:
                    raise StoreError(f"{loc.uri}: unreadable parquet shard ({exc})") from exc
                subj = self.manifest.subject(shard.subject) if shard.subject is not None else None
                encoder = None
                if kind == "embeddings":
                    encoder = self.manifest.embeddings.get(shard.encoder or "")
                    if encoder is None:
                        raise StoreError(f"{loc.uri}: encoder {shard.encoder!r} is not in the manifest's 'embeddings'")
                problem = _schema_problem(schema_for(kind, subj.voxels if subj else None, encoder), schema)
                if problem:
                    raise StoreError(f"{loc.uri}: {problem}")

    def stimulus_ids(self) -> set[int]:
        ids: set[int] = set()
        for shard in self.manifest.shards_of("stimuli"):
            ids.update(self.read_shard(shard, columns=["image_id"])["image_id"].to_pylist())
        return ids

    def verify(self, progress: Callable[[Iterable], Iterable] | None = None) -> list[Problem]:
        """Read every shard and check it against the manifest and the contract.

        Existence, byte size, checksum, row count, schema, finite values of the right
        length, trials that point at existing stimuli, and embeddings of exactly the
        stimulus images, with the shapes the manifest gives their encoder."""
        problems: list[Problem] = []
        shards = self.manifest.shards
        listed = {s.path for s in shards}
        stimulus_ids: set[int] = set()
        embedded: dict[str, set[int]] = {}  # encoder -> image ids its shards hold
        unread: set[str | None] = set()  # encoders with a shard that could not be read (reported already)
        trial_keys: dict[int, set[tuple[int, int, int]]] = {}  # subject -> (session, run, trial) seen
        split_images: dict[str, set[int]] = {"train": set(), "test": set()}
        # stimuli first, so trials and embeddings can be checked against them
        ordered = sorted(shards, key=lambda s: (s.kind != "stimuli", s.kind != "voxels", s.path))
        it = progress(ordered) if progress else ordered
        for shard in it:
            loc = self.location(shard)
            try:
                data = loc.read_bytes()
            except StorageError as exc:
                problems.append(Problem(loc.uri, "missing" if "missing file" in str(exc) else str(exc)))
                unread.add(shard.encoder)
                continue
            if len(data) != shard.bytes:
                problems.append(Problem(loc.uri, f"{len(data)} bytes, manifest says {shard.bytes} (truncated or replaced)"))
            if hashlib.sha256(data).hexdigest() != shard.sha256:
                problems.append(Problem(loc.uri, "sha256 checksum differs from the manifest"))
            try:
                table = pq.read_table(io.BytesIO(data))
            except Exception as exc:
                problems.append(Problem(loc.uri, f"unreadable parquet ({exc})"))
                unread.add(shard.encoder)
                continue
            if table.num_rows != shard.rows:
                problems.append(Problem(loc.uri, f"{table.num_rows} rows, manifest says {shard.rows}"))
            if shard.kind == "stimuli":
                stimulus_ids.update(table["image_id"].to_pylist())
            if shard.kind == "embeddings" and shard.encoder in self.manifest.embeddings:
                embedded.setdefault(shard.encoder, set()).update(table["image_id"].to_pylist())
                ids = table["image_id"].to_numpy()
                if len(ids) and shard.image_id_min is not None and shard.image_id_max is not None and (
                    ids.min() < shard.image_id_min or ids.max() > shard.image_id_max
                ):
                    problems.append(Problem(loc.uri, f"image ids outside the manifest's range "
                                                     f"{shard.image_id_min}..{shard.image_id_max}"))
            subj = None
            if shard.subject is not None:
                try:
                    subj = self.manifest.subject(shard.subject)
                except KeyError:
                    problems.append(Problem(loc.uri, f"subject {shard.subject} is not in the manifest"))
                    continue
            if shard.kind == "trials" and shard.subject is not None and not (
                    {"session", "run", "trial", "split", "image_id"} - set(table.column_names)):
                problems += _trial_problems(loc.uri, table, trial_keys.setdefault(shard.subject, set()), split_images)
            for msg in validate_table(
                shard.kind,
                table,
                subj,
                shard.session,
                stimulus_ids if shard.kind in ("trials", "embeddings") else None,
                self.manifest.embeddings.get(shard.encoder or "") if shard.kind == "embeddings" else None,
            ):
                problems.append(Problem(loc.uri, msg))
        # every encoder in the manifest covers exactly the stimulus images
        manifest_uri = self.root.join(MANIFEST).uri
        leaked = split_images["train"] & split_images["test"]
        if leaked:
            shown = ", ".join(map(str, sorted(leaked)[:5])) + (" ..." if len(leaked) > 5 else "")
            problems.append(Problem(manifest_uri, f"{len(leaked)} image(s) shown in both the train and the test split "
                                                  f"(test images leak into training): {shown}"))
        for name in self.manifest.embeddings:
            if not self.manifest.shards_of("embeddings", encoder=name):
                problems.append(Problem(manifest_uri, f"encoder {name!r} is listed in 'embeddings' but has no shards"))
                continue
            missing = stimulus_ids - embedded.get(name, set())
            if missing and name not in unread:
                shown = ", ".join(map(str, sorted(missing)[:5])) + (" ..." if len(missing) > 5 else "")
                problems.append(Problem(manifest_uri, f"embeddings of encoder {name!r} miss {len(missing)} stimulus image(s): {shown}"))
        # files in the store's data folders that the manifest does not list
        for folder in ("trials", "timeseries", "stimuli", "voxels", "embeddings"):
            for f in self.root.join(folder).list_files():
                rel = f.uri[len(self.root.uri.rstrip("/")) + 1 :]
                if rel not in listed and not rel.rsplit("/", 1)[-1].startswith("."):
                    problems.append(Problem(f.uri, "not listed in the manifest"))
        return problems

    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.manifest.shards)

    def manifest_sha256(self) -> str:
        """Checksum of the manifest as written (changes with any shard, including added embeddings)."""
        return hashlib.sha256(self.root.join(MANIFEST).read_bytes()).hexdigest()

    def test_set_digest(self, subjects: Iterable[int]) -> str:
        """Identity of the subjects' test trials and their images: the checksums of their trial shards and of the
        stimulus shards. Two evaluations with the same digest saw the same test set."""
        subjects = sorted(subjects)
        shards = self.manifest.shards_of("trials", subjects=subjects) + self.manifest.shards_of("stimuli")
        digest = hashlib.sha256(json.dumps([subjects, sorted((s.path, s.sha256) for s in shards)]).encode())
        return digest.hexdigest()[:16]


def read_manifest(root: Location) -> Manifest | None:
    """The manifest at ``root``, or None if there is none. Invalid manifests are errors naming the field."""
    loc = root.join(MANIFEST)
    if not loc.exists():
        return None
    raw = loc.read_bytes()
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise StoreError(f"{loc.uri}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from exc
    except json.JSONDecodeError as exc:
        raise StoreError(f"{loc.uri}: not valid JSON ({exc})") from exc
    if isinstance(data, dict) and data.get("schema_version") not in (None, SCHEMA_VERSION):
        raise StoreError(
            f"{loc.uri}: field 'schema_version' is {data.get('schema_version')!r}; "
            f"this raydecode reads version {SCHEMA_VERSION}"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise StoreError(f"{loc.uri}: {_pydantic_problem(exc)}") from exc


def open_store(uri: str, s3: S3Options | None = None, check: bool = True) -> Store:
    """Open a store, validating its manifest (and, with ``check``, every trials shard's schema)."""
    root = resolve(uri, s3)
    manifest = read_manifest(root)
    if manifest is None:
        if any(True for _ in root.list_files()):
            raise StoreError(
                f"{root.uri} is an incomplete store: shards but no {MANIFEST} "
                "(an interrupted ingest); re-run the same ingest command to complete it"
            )
        raise StoreError(f"{root.uri} is empty: no {MANIFEST} and no shards (is this the right prefix?)")
    store = Store(root, manifest, s3)
    if check:
        store.check_schemas(("voxels", "trials", "stimuli"))
    return store


def write_shard(
    root: Location,
    path: str,
    kind: str,
    table: pa.Table,
    subject_info: SubjectInfo | None = None,
    stimulus_ids: set[int] | None = None,
    encoder_info: EncoderInfo | None = None,
    **meta,
) -> ShardInfo:
    """Validate ``table`` against the contract and write it whole under ``root`` (any process: the driver or a Ray
    task); refuse it naming the file and the field. The caller adds the returned entry to the manifest."""
    loc = root.join(path)
    problems = validate_table(kind, table, subject_info, meta.get("session"), stimulus_ids, encoder_info)
    if problems:
        raise StoreError(f"{loc.uri}: {'; '.join(problems)}")
    data = _parquet_bytes(table)
    loc.write_bytes_atomic(data)
    return ShardInfo(path=path, kind=kind, rows=table.num_rows, bytes=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), **meta)


# ---------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------


def _trial_problems(uri: str, table: pa.Table, seen: set[tuple[int, int, int]],
                    split_images: dict[str, set[int]]) -> list[Problem]:
    """A trials shard's rows against the subject's rows already read: each (session, run, trial) once; the
    images of each split collected (a test image must never be a train image, whichever subject saw it)."""
    keys = list(zip(*(table[c].to_pylist() for c in ("session", "run", "trial"))))
    repeated = len(keys) - len(set(keys)) + len(set(keys) & seen)
    seen.update(keys)
    for split, ids in split_images.items():
        mask = pc.equal(table["split"], split)
        ids.update(pc.filter(table["image_id"], mask).to_pylist())
    if not repeated:
        return []
    return [Problem(uri, f"{repeated} trial row(s) repeat a (session, run, trial) of their subject")]


class StoreWriter:
    """Writes a store's shards, then its manifest.

    ``status`` is ``"complete"`` when a manifest made with the same source
    parameters already exists (the re-run is a no-op), ``"partial"`` when shards
    exist without a manifest (they are kept and completed), ``"new"`` otherwise.

    :meth:`extending` makes a writer that adds shards to a complete store (e.g.
    embeddings): ``status`` ``"extending"``; :meth:`commit` rewrites the manifest,
    last, with the store's shards plus the new ones.
    """

    def __init__(self, root: Location, source: str, source_params: dict):
        self.root = root
        self.source = source
        self.source_params = source_params
        self.shards: list[ShardInfo] = []
        existing = read_manifest(root)
        if existing is not None:
            if existing.source != source or existing.source_params != source_params:
                raise StoreError(
                    f"{root.uri} already holds a {existing.source} store made with {existing.source_params}; "
                    f"refusing to overwrite it with {source} {source_params} (choose another output)"
                )
            self.status = "complete"
            self.existing = existing
        else:
            self.existing = None
            self.status = "partial" if any(True for _ in root.list_files()) else "new"
            begun = self._begun()
            if self.status == "partial" and begun is not None and begun != {"source": source,
                                                                            "source_params": source_params}:
                raise StoreError(
                    f"{root.join(BEGUN).uri}: an interrupted ingest of a {begun.get('source')} store made with "
                    f"{begun.get('source_params')} is here; refusing to complete it with {source} {source_params} "
                    "(re-run with the same parameters, or choose another output)")

    def _begun(self) -> dict | None:
        loc = self.root.join(BEGUN)
        if not loc.exists():
            return None
        try:
            return json.loads(loc.read_bytes())
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"{loc.uri}: not the JSON an interrupted ingest leaves; delete it if the store's "
                             "shards are from the same source parameters") from None

    def begin(self) -> None:
        """Record what this store is made from before its first shard (kept until the manifest is written), so an
        interrupted ingest is completed only with the same source and parameters."""
        if self.status in ("new", "partial") and self._begun() is None:
            self.root.join(BEGUN).write_bytes_atomic(
                json.dumps({"source": self.source, "source_params": self.source_params}, indent=1).encode())

    @classmethod
    def extending(cls, store: Store) -> "StoreWriter":
        """A writer that adds shards to the complete ``store``; nothing is visible to readers until :meth:`commit`."""
        m = store.manifest
        writer = cls(store.root, m.source, m.source_params)
        writer.status = "extending"
        return writer

    def existing_shard(
        self, path: str, kind: str, accept: Callable[[pq.FileMetaData], bool] | None = None, **meta
    ) -> ShardInfo | None:
        """The shard at ``path`` if an earlier (interrupted) run wrote it, else None.

        Writes are atomic, so a shard that exists and parses is whole. ``accept``:
        a further check of its parquet metadata (e.g. that it was made by the same
        encoder, from the same source files); a leftover it refuses is rewritten (it may also raise)."""
        if self.status not in ("partial", "extending"):
            return None
        loc = self.root.join(path)
        if not loc.exists():
            return None
        data = loc.read_bytes()
        try:
            metadata = pq.read_metadata(io.BytesIO(data))
        except Exception:
            return None  # unreadable leftovers are rewritten
        if accept is not None and not accept(metadata):
            return None
        rows = metadata.num_rows
        info = ShardInfo(
            path=path, kind=kind, rows=rows, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), **meta
        )
        self.shards.append(info)
        return info

    def write_shard(
        self,
        path: str,
        kind: str,
        table: pa.Table,
        subject_info: SubjectInfo | None = None,
        stimulus_ids: set[int] | None = None,
        encoder_info: EncoderInfo | None = None,
        **meta,
    ) -> ShardInfo:
        """Validate ``table`` against the contract and write it whole; refuse it naming the field."""
        info = write_shard(self.root, path, kind, table, subject_info, stimulus_ids, encoder_info, **meta)
        self.shards.append(info)
        return info

    def add(self, info: ShardInfo) -> None:
        """Record a shard written elsewhere (a Ray task's :func:`write_shard`)."""
        self.shards.append(info)

    def finalize(self, **fields) -> Manifest:
        """Write manifest.json (last): the store becomes complete."""
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            source=self.source,
            source_params=self.source_params,
            created_by=f"raydecode {raydecode.__version__}",
            shards=sorted(self.shards, key=lambda s: s.path),
            **fields,
        )
        manifest = self._write_manifest(manifest)
        self.root.join(BEGUN).delete()
        return manifest

    def commit(self, embeddings: dict[str, EncoderInfo] | None = None) -> Manifest:
        """Extending writer: rewrite the manifest (last) with the store's shards plus the ones
        written or kept here, and ``embeddings`` entries added. The manifest is read again
        first, so entries another writer committed in the meantime are kept."""
        assert self.status == "extending", "commit() is for a writer made by StoreWriter.extending()"
        current = read_manifest(self.root)
        if current is None or current.source != self.source or current.source_params != self.source_params:
            raise StoreError(f"{self.root.join(MANIFEST).uri} changed while shards were being added; run again")
        new = {s.path for s in self.shards}
        shards = [s for s in current.shards if s.path not in new] + self.shards
        manifest = Manifest.model_validate({
            **current.model_dump(),
            "embeddings": {**current.embeddings, **(embeddings or {})},
            "shards": sorted(shards, key=lambda s: s.path),
        })
        return self._write_manifest(manifest)

    def _write_manifest(self, manifest: Manifest) -> Manifest:
        self.root.join(MANIFEST).write_bytes_atomic(
            json.dumps(manifest.model_dump(mode="json"), indent=1).encode()
        )
        self.status = "complete"
        return manifest
