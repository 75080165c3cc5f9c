"""`raydecode info`: a readable summary of a store, and `--verify`."""

from __future__ import annotations

from raydecode.data.store import Problem, Store
from raydecode.report import human_bytes, table


def describe(store: Store) -> str:
    m = store.manifest
    params = " ".join(f"{k}={v}" for k, v in m.source_params.items() if k != "subjects")
    kinds = {}
    for s in m.shards:
        n, b = kinds.get(s.kind, (0, 0))
        kinds[s.kind] = (n + 1, b + s.bytes)
    lines = [
        f"store    {store.uri}",
        f"source   {m.source} {params}  (schema v{m.schema_version}, {m.created_by})",
        f"images   {m.n_images:,} ({len(m.shared_test_image_ids):,} shared test), "
        f"{m.image_size[0]}x{m.image_size[1]} px, {len(m.categories)} categories"
        + (f"; TR {m.tr_s:g} s" if m.tr_s else ""),
        f"shards   {len(m.shards):,}, {human_bytes(store.total_bytes())}: "
        + ", ".join(f"{k} {n} ({human_bytes(b)})" for k, (n, b) in sorted(kinds.items())),
    ]
    if m.embeddings:
        lines.append("embeddings " + ", ".join(f"{k} tokens {tuple(e.tokens_shape)} pooled {e.pooled_dim}"
                                                for k, e in m.embeddings.items()))
    rows = []
    for s in m.subjects:
        rows.append([
            f"{s.subject:02d}", s.voxels, "x".join(map(str, s.grid_shape)), s.sessions, s.runs,
            s.trials.get("train", 0), s.trials.get("test", 0), s.images.get("train", 0), s.images.get("test", 0),
        ])
    tot = lambda i: sum(r[i] for r in rows)  # noqa: E731
    rows.append(["all", tot(1), "", tot(3), tot(4), tot(5), tot(6), tot(7), tot(8)])
    lines += ["", table(["subject", "voxels", "grid", "sessions", "runs", "train trials", "test trials",
                          "train images", "test images"], rows)]
    return "\n".join(lines)


def describe_problems(problems: list[Problem], n_shards: int) -> str:
    if not problems:
        return f"verify   all {n_shards} shards match the manifest (existence, size, checksum, rows, schema, values)"
    files = sorted({p.file for p in problems})
    lines = [f"verify   {len(problems)} problem(s) in {len(files)} file(s):"]
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines)
