"""The ``raydecode`` console script: ``raydecode <stage> --config FILE [--set k=v ...] [--summary PATH]``.

Each stage validates its config (:mod:`raydecode.config`), runs library code,
prints a short human-readable summary and, with ``--summary``, writes a
:class:`~raydecode.report.StageResult` as JSON. A :class:`~raydecode.errors.UserError`
becomes one ``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
import time

from raydecode.config import DemoConfig, IngestSyntheticConfig, InfoConfig, load_config
from raydecode.errors import UserError
from raydecode.report import StageResult


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="stage config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set store=s3://lab/nsd-store (repeatable)")
    p.add_argument("--summary", metavar="PATH", help="write the stage's result as one JSON object")


def _cli_defaults(**kv) -> dict:
    return {k: v for k, v in kv.items() if v is not None}


# -- stages --------------------------------------------------------------------------------


def stage_ingest_synthetic(args) -> StageResult:
    from raydecode.data.info import describe
    from raydecode.data.ingest import run_ingest, synthetic_plan
    from raydecode.data.store import Store
    from raydecode.storage import resolve

    cfg = load_config(IngestSyntheticConfig, args.config, args.overrides,
                      **_cli_defaults(preset=args.preset, store=args.out, seed=args.seed))
    plan = synthetic_plan(cfg.preset, cfg.seed, cfg.timeseries, cfg.subjects)
    res = run_ingest(plan, cfg.store, cfg.s3)
    store = Store(resolve(cfg.store, cfg.s3), res.manifest, cfg.s3)
    print(describe(store))
    verb = {"written": "wrote", "completed": "completed an interrupted ingest:", "unchanged": "store already complete; wrote"}[res.status]
    print(f"\ningest   {verb} {res.written} shard(s), kept {res.skipped}, in {res.seconds:.1f} s")
    m = res.manifest
    return StageResult(
        stage="ingest", status=res.status,
        metrics={
            "shards_written": res.written, "shards_skipped": res.skipped, "seconds": round(res.seconds, 3),
            "subjects": len(m.subjects), "images": m.n_images, "bytes": store.total_bytes(),
            "trials_train": sum(s.trials.get("train", 0) for s in m.subjects),
            "trials_test": sum(s.trials.get("test", 0) for s in m.subjects),
        },
        artifacts={"store": store.uri, "manifest": store.root.join("manifest.json").uri},
    )


def stage_info(args) -> StageResult:
    from tqdm.auto import tqdm

    from raydecode.data.info import describe, describe_problems
    from raydecode.data.store import open_store

    cfg = load_config(InfoConfig, args.config, args.overrides,
                      **_cli_defaults(store=args.uri, verify=True if args.verify else None))
    store = open_store(cfg.store, cfg.s3, check=not cfg.verify)
    print(describe(store))
    metrics = {"subjects": len(store.manifest.subjects), "shards": len(store.manifest.shards),
               "bytes": store.total_bytes()}
    status = "ok"
    if cfg.verify:
        problems = store.verify(progress=lambda it: tqdm(it, desc="verify", unit="shard"))
        print("\n" + describe_problems(problems, len(store.manifest.shards)))
        metrics["problems"] = len(problems)
        if problems:
            status = "failed"
    return StageResult(stage="info", status=status, metrics=metrics, artifacts={"store": store.uri})


def stage_demo(args) -> StageResult:
    from raydecode.demo import run_demo

    cfg = load_config(DemoConfig, args.config, args.overrides)
    return run_demo(cfg)


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raydecode", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    ingest = sub.add_parser("ingest", help="write a store: synthetic NSD (later: raw NSD, MindEye2 release)")
    isub = ingest.add_subparsers(dest="source", required=True, metavar="SOURCE")
    syn = isub.add_parser("synthetic", help="synthetic NSD with planted structure")
    _common(syn)
    syn.add_argument("--preset", choices=["tiny", "demo", "paper"], help="sizes (default tiny)")
    syn.add_argument("--out", metavar="URI", help="output store (path, file:// or s3://); the config's `store`")
    syn.add_argument("--seed", type=int)
    syn.set_defaults(func=stage_ingest_synthetic)

    info = sub.add_parser("info", help="summarise a store; --verify checks every shard")
    info.add_argument("uri", nargs="?", metavar="URI", help="store URI (default: the config's `store`)")
    info.add_argument("--verify", action="store_true", help="read every shard and check it against the manifest")
    _common(info)
    info.set_defaults(func=stage_info)

    demo = sub.add_parser("demo", help="the whole pipeline on embedded defaults (what `make demo` runs)")
    _common(demo)
    demo.set_defaults(func=stage_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        result: StageResult = args.func(args)
    except UserError as exc:
        msg = str(exc)
        print(f"error: {msg}", file=sys.stderr)
        if args.summary:
            StageResult(stage=args.stage, status="error", artifacts={}, metrics={}).write(args.summary)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.summary:
        result.write(args.summary)
    print(f"\n{result.stage}: {result.status} in {time.time() - t0:.1f} s"
          + (f"; summary {args.summary}" if args.summary else ""))
    return 0 if result.status not in ("failed", "error") else 1


if __name__ == "__main__":
    sys.exit(main())
