"""raydecode: cross-subject fMRI-to-image decoding on NSD, on Ray. raydecode STAGE --config FILE [--set k=v ...].

Each stage validates its config (:mod:`raydecode.config`), runs library code,
prints a short human-readable summary and, with ``--summary``, writes a
:class:`~raydecode.report.StageResult` as JSON. A :class:`~raydecode.errors.UserError`
becomes one ``error:`` line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from raydecode.config import ClaimsConfig, DemoConfig, InfoConfig, IngestSyntheticConfig, load_config
from raydecode.errors import ConfigError, UserError
from raydecode.report import StageResult, table

JOBS = "jobs"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="stage config (YAML); --print-config lists every key")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set store=s3://lab/nsd-store (repeatable)")
    p.add_argument("--summary", metavar="PATH", help="write the stage's result as one JSON object")
    p.add_argument("--print-config", action="store_true",
                   help="print the stage's config (defaults, then --config and --set) as YAML with every key "
                        "described, and exit")


def _stage(sub, name: str, help: str, examples: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A stage's parser: ``--help`` says what it does and which jobs/ configs show it."""
    epilog = ("examples: " + ", ".join(f"{JOBS}/{e}" for e in examples)) if examples else None
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", epilog=epilog)


def _stage_key(args) -> tuple[str, ...]:
    if args.stage == "submit":  # the submitted stage's config
        return tuple(w for w in args.what if not w.startswith("-"))
    key = [args.stage]
    for extra in ("source", "action"):
        if getattr(args, extra, None) and args.stage in ("ingest", "dynadiff"):
            key.append(getattr(args, extra))
    return tuple(key)


# stages that cannot run on defaults alone: without --config (or --set) they ask for one
NEEDS_CONFIG = {"pretrain": ("pretrain.yaml", "pretrain-nsd.yaml"), "sweep": ("sweep.yaml", "sweep-nsd.yaml"),
                "dynadiff": ("dynadiff.yaml", "dynadiff-nsd.yaml")}


def _cli_defaults(**kv) -> dict:
    return {k: v for k, v in kv.items() if v is not None}


# -- stages --------------------------------------------------------------------------------


def stage_ingest_synthetic(args) -> StageResult:
    from raydecode.data.ingest import synthetic_plan

    cfg = load_config(IngestSyntheticConfig, args.config, args.overrides,
                      **_cli_defaults(preset=args.preset, store=args.out, seed=args.seed))
    return _ingest(synthetic_plan(cfg.preset, cfg.seed, cfg.timeseries, cfg.subjects), cfg)


def stage_ingest_nsd(args) -> StageResult:
    from raydecode.config import IngestNSDConfig
    from raydecode.data.ingest import TaskOptions
    from raydecode.data.nsd import nsd_plan

    cfg = load_config(IngestNSDConfig, args.config, args.overrides, **_cli_defaults(
        source=args.source, store=args.out, subjects=args.subjects, sessions=args.sessions,
        timeseries=True if args.timeseries else None, normalize=args.normalize, coco=args.coco))
    plan = nsd_plan(cfg.source, cfg.source_options(), cfg.subjects, cfg.sessions, cfg.timeseries, cfg.normalize,
                    cfg.coco, tuple(cfg.roi_files), cfg.images_per_shard, TaskOptions(cfg.task_cpus, cfg.task_memory_gb, cfg.task_wait_s))
    return _ingest(plan, cfg)


def stage_ingest_mindeye2(args) -> StageResult:
    from raydecode.config import IngestMindEye2Config
    from raydecode.data.ingest import TaskOptions
    from raydecode.data.mindeye2 import mindeye2_plan

    cfg = load_config(IngestMindEye2Config, args.config, args.overrides, **_cli_defaults(
        source=args.source, store=args.out, subjects=args.subjects, nsd=args.nsd, coco=args.coco))
    plan = mindeye2_plan(cfg.source, cfg.source_options(), cfg.subjects, cfg.nsd, cfg.coco, tuple(cfg.roi_files),
                         cfg.images_per_shard, TaskOptions(cfg.task_cpus, cfg.task_memory_gb, cfg.task_wait_s))
    return _ingest(plan, cfg)


def _ingest(plan, cfg) -> StageResult:
    """Run an ingest plan (its shards as Ray tasks when the plan has them), print the store and the counts."""
    from raydecode.data.info import describe
    from raydecode.data.ingest import run_ingest
    from raydecode.data.store import Store
    from raydecode.report import human_bytes
    from raydecode.runtime import init_ray
    from raydecode.storage import resolve

    if plan.tasks is not None:
        init_ray(getattr(cfg, "ray_address", None))
    res = run_ingest(plan, cfg.store, cfg.s3)
    store = Store(resolve(cfg.store, cfg.s3), res.manifest, cfg.s3)
    print(describe(store))
    m = res.manifest
    if m.absent:
        print(f"absent   {', '.join(m.absent)} (not in the source)")
    verb = {"written": "wrote", "completed": "completed an interrupted ingest:", "unchanged": "store already complete; wrote"}[res.status]
    trials = sum(sum(s.trials.values()) for s in m.subjects)
    written_bytes = sum(s.bytes for s in m.shards)
    rate = ""
    if res.status != "unchanged" and res.seconds > 0:
        rate = f" ({trials / res.seconds:,.0f} trials/s, {written_bytes / 2**20 / res.seconds:,.1f} MB/s written)"
    print(f"\ningest   {verb} {res.written} shard(s), kept {res.skipped}, in {res.seconds:.1f} s{rate}")
    read = sum(f.bytes for f in m.source_files)
    if read:
        print(f"source   {len(m.source_files)} file(s), {human_bytes(read)}, checksums in the manifest")
    return StageResult(
        stage="ingest", status=res.status,
        metrics={
            "shards_written": res.written, "shards_skipped": res.skipped, "seconds": round(res.seconds, 3),
            "subjects": len(m.subjects), "images": m.n_images, "bytes": store.total_bytes(),
            "trials_train": sum(s.trials.get("train", 0) for s in m.subjects),
            "trials_test": sum(s.trials.get("test", 0) for s in m.subjects),
            "source_files": len(m.source_files), "source_bytes": read,
        },
        artifacts={"store": store.uri, "manifest": store.root.join("manifest.json").uri},
    )


def stage_embed(args) -> StageResult:
    from raydecode.config import EmbedConfig
    from raydecode.embed import EmbedCompute, run_embed
    from raydecode.report import table

    cfg = load_config(EmbedConfig, args.config, args.overrides,
                      **_cli_defaults(store=args.store, encoders=args.encoders))
    compute = EmbedCompute(cfg.ray_address, cfg.use_gpu, cfg.actors, cfg.wait_for_nodes_s)
    res = run_embed(cfg.store, cfg.encoders, cfg.s3, cfg.batch_size, compute=compute)  # Ray only if there is work
    rows = []
    for name, e in res.encoders.items():
        prov = " ".join(f"{k}={v}" for k, v in e.provenance().items() if v is not None and k != "tiny_channels")
        rows.append([name, "x".join(map(str, e.tokens_shape)), e.pooled_dim,
                     "written" if name in res.written else "unchanged", prov])
    print(f"store    {res.store} ({res.images:,} images)")
    print(table(["encoder", "tokens", "pooled", "status", "made with"], rows))
    where = f" on {res.device}" if res.device else ""
    print(f"\nembed    wrote {res.shards_written} shard(s) for {len(res.written)} encoder(s), kept {res.shards_kept} "
          f"from an interrupted run, {len(res.skipped)} encoder(s) unchanged; {res.images_encoded:,} images encoded"
          f"{where} in {res.seconds:.1f} s")
    return StageResult(
        stage="embed", status=res.status,
        metrics={
            "images": res.images, "images_encoded": res.images_encoded,
            "encoders_written": len(res.written), "encoders_skipped": len(res.skipped),
            "shards_written": res.shards_written, "shards_kept": res.shards_kept, "seconds": round(res.seconds, 3),
        },
        artifacts={"store": res.store, **{f"embeddings.{n}": f"{res.store.rstrip('/')}/embeddings/{n}" for n in res.encoders}},
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


def stage_pretrain(args) -> StageResult:
    from raydecode.config import TrainConfig
    from raydecode.train.launch import run_training

    cfg = load_config(TrainConfig, args.config, args.overrides)
    return run_training(cfg, stage="pretrain")


def stage_sweep(args) -> StageResult:
    from raydecode.config import SweepConfig
    from raydecode.sweep import run_sweep

    cfg = load_config(SweepConfig, args.config, args.overrides)
    return run_sweep(cfg)


def stage_dynadiff(args) -> StageResult:
    from raydecode.config import DiffusionDecodeConfig
    from raydecode.diffusion_decode import run_dynadiff, run_reconstruct_only

    cfg = load_config(DiffusionDecodeConfig, args.config, args.overrides,
                      **_cli_defaults(checkpoint_uri=args.checkpoint))
    return run_reconstruct_only(cfg) if args.action == "reconstruct" else run_dynadiff(cfg)


def stage_evaluate(args) -> StageResult:
    from raydecode.config import EvaluateConfig
    from raydecode.evaluate.suite import run_evaluate

    cfg = load_config(EvaluateConfig, args.config, args.overrides, **_cli_defaults(model=args.model, store=args.store))
    return run_evaluate(cfg)


def stage_compare(args) -> StageResult:
    from raydecode.config import CompareConfig
    from raydecode.evaluate.suite import run_compare

    cfg = load_config(CompareConfig, args.config, args.overrides, **_cli_defaults(models=args.models or None))
    return run_compare(cfg)


def stage_submit(args) -> StageResult:
    from raydecode.app.submit import submit

    out = submit(args.what, args.config, args.address, args.overrides, args.wait, args.submission_id,
                 entrypoint_num_cpus=args.entrypoint_cpus, install=args.install, env=args.env)
    return StageResult(stage="submit", status="ok", metrics={}, artifacts=out)


def stage_promote(args) -> StageResult:
    from raydecode import tracking
    from raydecode.config import StageConfig

    cfg = load_config(StageConfig, args.config, args.overrides)
    tracking.configure(cfg)
    d = tracking.promote(args.model, args.version)
    champ = d.champion
    print(table(["", "version", d.candidate["metric"] or "metric", d.candidate["tie_break"] or "tie-break", "test set"],
                [["candidate", d.version, d.candidate["value"], d.candidate["tie_value"], d.candidate["test_set"]]]
                + ([["champion (before)", champ["version"], champ["value"], champ["tie_value"], champ["test_set"]]]
                   if champ else [])))
    print(f"\n{d.name} v{d.version} -> {d.alias}: {d.reason}")
    return StageResult(stage="promote", status="ok", metrics={},
                       artifacts={"model": f"models:/{d.name}/{d.version}", "alias": d.alias, "reason": d.reason})


def stage_model_info(args) -> StageResult:
    import json

    from raydecode.modelinfo.info import model_info

    voxels = args.voxels or None
    overrides = load_config_overrides(args.overrides)
    if args.memory:
        from raydecode.modelinfo.memory import format_memory_plan, job_settings, memory_plan

        method, preset, gpus, batch = args.method, args.preset, args.gpus_set or 8, args.batch
        if args.config:  # a training job's settings; explicit flags still win for --gpus / --batch
            job = job_settings(args.config)
            method, preset, overrides = job["method"], job["preset"], {**job["overrides"], **overrides}
            gpus, batch = args.gpus_set or job["gpus"] or gpus, batch or job["batch"]
        plan = memory_plan(method, preset, voxels, overrides, gpus=gpus, gpu_sizes_gb=tuple(args.gpu_gb))
        print(json.dumps(plan, indent=2) if args.json else format_memory_plan(plan, batch))
        return StageResult(stage="model-info", status="ok", artifacts={},
                           metrics={"total": plan["params"], "trainable": plan["trainable"],
                                    **{f"zero{r['zero']}.states_gb": round(r["states_gb"], 3) for r in plan["zero"]}})
    info = model_info(args.method, args.preset, voxels, overrides=overrides)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        from raydecode.modelinfo.info import format_model_info

        print(format_model_info(info))
    return StageResult(stage="model-info", status="ok",
                       metrics={"total": info["total"], "trainable": info["trainable"]}, artifacts={})


def load_config_overrides(overrides: list[str]) -> dict:
    from raydecode.config import apply_overrides

    return apply_overrides({}, overrides)


def stage_demo(args) -> StageResult:
    from raydecode.app.demo import run_demo

    cfg = load_config(DemoConfig, args.config, args.overrides)
    return run_demo(cfg)


def stage_claims(args) -> StageResult:
    from raydecode.app.claims import run_claims

    overrides = list(args.overrides) + ([f"preset={args.preset}"] if args.preset else [])
    return run_claims(load_config(ClaimsConfig, args.config, overrides))


# -- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from raydecode import __version__

    parser = argparse.ArgumentParser(prog="raydecode", description=__doc__.split("\n")[0],
                                     epilog="every stage: raydecode STAGE --help; its config: raydecode STAGE "
                                            "--print-config; cluster jobs: jobs/README.md")
    parser.add_argument("--version", action="version", version=f"raydecode {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    _add_ingest(sub)
    _add_store_stages(sub)
    _add_training(sub)
    _add_evaluation(sub)
    _add_operations(sub)
    return parser


def _add_ingest(sub) -> None:
    """The ingest sources."""
    ingest = sub.add_parser("ingest", help="write a store: synthetic NSD, the NSD release, MindEye2's release")
    isub = ingest.add_subparsers(dest="source", required=True, metavar="SOURCE")
    syn = _stage(isub, "synthetic", "synthetic NSD with planted structure (tests, the demo)",
                 ("ingest-synthetic.yaml", "ingest-synthetic-nsd.yaml"))
    _common(syn)
    syn.add_argument("--preset", choices=["tiny", "demo", "paper"], help="sizes (default tiny)")
    syn.add_argument("--out", metavar="URI", help="output store (path, file:// or s3://); the config's `store`")
    syn.add_argument("--seed", type=int, help="the synthetic data's seed (default 0)")
    syn.set_defaults(func=stage_ingest_synthetic)

    nsd = _stage(isub, "nsd", "the NSD release as published (local dir or s3://): betas, masks, images, "
                 "optionally time series; one Ray task per subject and session", ("ingest-nsd.yaml",))
    _common(nsd)
    nsd.add_argument("--source", metavar="URI", help="the release root (holds nsddata/, nsddata_betas/, ...)")
    nsd.add_argument("--out", metavar="URI", help="output store (the config's `store`)")
    nsd.add_argument("--subjects", type=int, nargs="+", metavar="N", help="subjects (default: 1-8)")
    nsd.add_argument("--sessions", type=int, nargs="+", metavar="N", help="sessions (default: every one there)")
    nsd.add_argument("--timeseries", action="store_true", help="also the per-run BOLD time series (Dynadiff)")
    nsd.add_argument("--normalize", choices=["session-zscore", "none"],
                     help="betas: z-scored per voxel within each session (default), or percent signal change")
    nsd.add_argument("--coco", metavar="DIR", help="COCO 2017 annotations: categories and captions")
    nsd.set_defaults(func=stage_ingest_nsd)

    me2 = _stage(isub, "mindeye2", "MindEye2's preprocessed release (pscotti/mindeyev2 layout)",
                 ("ingest-mindeye2-nsd.yaml",))
    _common(me2)
    me2.add_argument("--source", metavar="URI", help="the release root (holds betas_all_subjNN_fp32_renorm.hdf5, wds/)")
    me2.add_argument("--out", metavar="URI", help="output store (the config's `store`)")
    me2.add_argument("--subjects", type=int, nargs="+", metavar="N", help="subjects (default: 1, 2, 5, 7)")
    me2.add_argument("--nsd", metavar="URI", help="an NSD release root: nsdgeneral masks (voxel coordinates, ROIs) "
                     "and the stimulus info COCO annotations are matched through")
    me2.add_argument("--coco", metavar="DIR", help="COCO 2017 annotations: categories and captions (needs --nsd)")
    me2.set_defaults(func=stage_ingest_mindeye2)


def _add_store_stages(sub) -> None:
    """Embed and info."""
    embed = _stage(sub, "embed", "frozen image targets (OpenCLIP tokens, VAE latents) of every stimulus, written "
                   "into the store (Ray Data; GPU actors when use_gpu or the cluster can have GPUs)",
                   ("embed.yaml", "embed-nsd.yaml"))
    embed.add_argument("--store", metavar="URI", help="store URI (default: the config's `store`)")
    embed.add_argument("--encoder", dest="encoders", action="append", metavar="NAME",
                       help="encoder name, e.g. openclip-bigg, sd-vae, openclip-demo, vae-demo (repeatable)")
    _common(embed)
    embed.set_defaults(func=stage_embed)

    info = _stage(sub, "info", "summarise a store; --verify checks every shard", ("info.yaml",))
    info.add_argument("uri", nargs="?", metavar="URI", help="store URI (default: the config's `store`)")
    info.add_argument("--verify", action="store_true", help="read every shard and check it against the manifest")
    _common(info)
    info.set_defaults(func=stage_info)


def _add_training(sub) -> None:
    """Pretrain, sweep, dynadiff."""
    pretrain = _stage(sub, "pretrain", "train a method on Ray Train + DeepSpeed (pretraining or, with init_from, "
                      "fine-tuning); tracked in MLflow", ("pretrain.yaml", "finetune.yaml", "pretrain-nsd.yaml"))
    _common(pretrain)
    pretrain.set_defaults(func=stage_pretrain)

    sweep = _stage(sub, "sweep", "per-subject adaptations x a search space on Ray Tune; one MLflow child run per "
                   "trial; the best per subject registered and gated", ("sweep.yaml", "sweep-nsd.yaml"))
    _common(sweep)
    sweep.set_defaults(func=stage_sweep)

    dyn = _stage(sub, "dynadiff", "train a diffusion decoder on fMRI time-series windows (Ray Train + DeepSpeed), "
                 "reconstruct the test set, time-resolved curves, register; 'dynadiff reconstruct' evaluates an "
                 "existing checkpoint", ("dynadiff.yaml", "dynadiff-nsd.yaml"))
    dyn.add_argument("action", nargs="?", choices=["train", "reconstruct"], default="train",
                     help="train (default): the whole stage; reconstruct: evaluate an existing checkpoint")
    dyn.add_argument("--checkpoint", metavar="URI", help="reconstruct: a final/ checkpoint (default: "
                     "<storage>/<run_name>/final)")
    _common(dyn)
    dyn.set_defaults(func=stage_dynadiff)


def _add_evaluation(sub) -> None:
    """Evaluate, compare."""
    ev = _stage(sub, "evaluate", "a model on the store's test split (averaged and single-trial): retrieval, "
                "reconstruction and semantic metrics, plots; an MLflow evaluation run (Ray Data inference)",
                ("evaluate.yaml", "evaluate-nsd.yaml"))
    ev.add_argument("--model", metavar="REF", help="models:/name@alias, models:/name/version, runs:/<id>/model or a "
                    "final/ checkpoint URI")
    ev.add_argument("--store", metavar="URI", help="store URI (default: the config's `store`)")
    _common(ev)
    ev.set_defaults(func=stage_evaluate)

    cmp_ = _stage(sub, "compare", "side-by-side metrics of evaluated models (the papers' Table 1), from their MLflow "
                  "evaluation runs", ("evaluate.yaml",))
    cmp_.add_argument("models", nargs="*", metavar="REF", help="model references as given to `evaluate`")
    _common(cmp_)
    cmp_.set_defaults(func=stage_compare)


def _add_operations(sub) -> None:
    """Submit, promote, model-info, demo."""
    sm = _stage(sub, "submit", "run a stage as a Ray job on a cluster (the Ray Job SDK: this checkout as the working "
                "dir, the config checked first; token authentication); see jobs/README.md")
    sm.add_argument("what", nargs="+", metavar="STAGE", help="e.g. pretrain, sweep, dynadiff, evaluate, ingest synthetic")
    sm.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), required="RAY_ADDRESS" not in os.environ,
                    help="the job server, e.g. http://127.0.0.1:8265 (default RAY_ADDRESS)")
    sm.add_argument("--wait", action="store_true", help="stream the job's logs; exit with its status")
    sm.add_argument("--submission-id", help="the job id (default: Ray's)")
    sm.add_argument("--entrypoint-cpus", type=float, default=None, help="CPUs reserved for the job's driver")
    sm.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                    help="an environment variable for the job (KEY: its value here), e.g. --env MLFLOW_TRACKING_URI "
                    "--env AWS_ENDPOINT_URL_S3; nothing else is forwarded. Credentials and loopback URLs for a remote "
                    "cluster are refused")
    sm.add_argument("--no-install", dest="install", action="store_false",
                    help="do not pip-install the checkout in the job's runtime_env (the nodes' image already has "
                    "this version of the project: cluster/Dockerfile, the launcher's setup commands)")
    _common(sm)
    sm.set_defaults(func=stage_submit)

    promote = _stage(sub, "promote", "apply the champion gate to a registered model version by hand",
                     ("promote-nsd.yaml",))
    promote.add_argument("--model", required=True, help="registered model name, e.g. raydecode-duala-subj08")
    promote.add_argument("--version", required=True, help="the registered version to gate, e.g. 3")
    _common(promote)
    promote.set_defaults(func=stage_promote)

    minfo = _stage(sub, "model-info", "parameters per module, total and trainable (paper presets on the meta "
                   "device: no memory)")
    minfo.add_argument("--method", default="mindeye2", help="a registered method (default mindeye2)")
    minfo.add_argument("--preset", default="paper", choices=["tiny", "demo", "paper"], help="sizes (default paper)")
    minfo.add_argument("--voxels", type=int, nargs="+", metavar="N",
                       help="voxels per subject (default: NSD nsdgeneral counts of subjects 1-8 at paper scale, "
                            "the synthetic preset's otherwise)")
    minfo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field of the method preset, e.g. --set hidden=1024")
    minfo.add_argument("--memory", action="store_true",
                       help="per-GPU model states under ZeRO 0-3 (bf16, Adam) and the largest batch per GPU size, "
                            "activations measured in one loss on uninitialised CPU memory (needs the fp32 model's "
                            "size in RAM: ~10 GB for MindEye2's paper preset)")
    minfo.add_argument("--gpus", dest="gpus_set", type=int, help="--memory: data-parallel GPUs (default: the job's "
                       "scaling.num_workers, else 8)")
    minfo.add_argument("--config", metavar="FILE", help="--memory: plan a training job (jobs/*.yaml): its method, "
                       "preset, model keys, optim.batch_size and scaling.num_workers; weights are not read")
    minfo.add_argument("--gpu-gb", type=int, nargs="+", default=[24, 40, 80, 141], metavar="GB",
                       help="--memory: GPU sizes to plan for (default 24 40 80 141)")
    minfo.add_argument("--batch", type=int, help="--memory: the per-GPU batch to advise a ZeRO stage for")
    minfo.add_argument("--json", action="store_true", help="print only the JSON (stdout), the summary line to stderr")
    minfo.add_argument("--summary", metavar="PATH", help="write the stage's result as one JSON object")
    minfo.set_defaults(func=stage_model_info)

    demo = _stage(sub, "demo", "the whole pipeline on embedded defaults (what 'make demo' runs)")
    _common(demo)
    demo.set_defaults(func=stage_demo)

    claims = _stage(sub, "claims", "re-run each paper's central claim on a synthetic store: a table of effects, bootstrap "
                    "intervals and verdicts, one MLflow run", ("claims.yaml",))
    claims.add_argument("--preset", choices=["tiny", "demo"], help="sizes and training budget (default tiny)")
    _common(claims)
    claims.set_defaults(func=stage_claims)


def _check_writable(path: str, what: str) -> None:
    """Before the stage runs: a result that cannot be written would be lost after the work is done."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot make its directory {parent} ({exc.strerror})") from None
    if os.path.isdir(path) or not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ConfigError(f"{what} {path}: not a file this user can write")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0, summary = time.time(), None
    try:
        if getattr(args, "summary", None):
            _check_writable(args.summary, "--summary")
            summary = args.summary
        if getattr(args, "print_config", False):
            from raydecode.config import STAGE_CONFIGS, commented_yaml

            key = _stage_key(args)
            if key not in STAGE_CONFIGS:
                raise ConfigError(f"--print-config: stage {' '.join(key)!r} has no config")
            print(commented_yaml(load_config(STAGE_CONFIGS[key], args.config, args.overrides)))
            return 0
        if args.stage in NEEDS_CONFIG and not args.config and not args.overrides:
            demo, nsd = NEEDS_CONFIG[args.stage]
            raise ConfigError(f"{args.stage} needs a config: --config {JOBS}/{demo} (demo scale) or {JOBS}/{nsd} (NSD on "
                              f"a GPU cluster); `raydecode {args.stage} --print-config` lists every key")
        result: StageResult = args.func(args)
    except UserError as exc:
        msg = str(exc)
        print(f"error: {msg}", file=sys.stderr)
        if summary:
            StageResult(stage=args.stage, status="error", artifacts={}, metrics={}).write(summary)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.summary:
        result.write(args.summary)
    print(f"\n{result.stage}: {result.status} in {time.time() - t0:.1f} s"
          + (f"; summary {args.summary}" if args.summary else ""),
          file=sys.stderr if getattr(args, "json", False) else sys.stdout)  # model-info --json: stdout is the JSON
    return 0 if result.status not in ("failed", "error") else 1


if __name__ == "__main__":
    sys.exit(main())
