"""The diffusion-decoding stage (``raydecode dynadiff``): train, reconstruct the test set, time-resolved curves, register.

1. train the method on Ray Train + DeepSpeed (:func:`raydecode.train.launch.run_training`; the "general"
   model at the configured window);
2. evaluate the consolidated checkpoint in a Ray task (a GPU when ``scaling.use_gpu``): seeded, batched DDIM
   reconstructions of the test images from repetition-averaged windows (and from one random single trial per
   image), PixCorr / SSIM, the test diffusion loss with and without the brain condition, and the same test loss
   on windows shifted by k TRs (W(t + k*TR, d)); reconstructions, the stimulus-vs-reconstruction grid, the
   time-resolved table and plot, and the LoRA (diffusers format) + brain-module weights are written under
   ``<storage>/<run>/reconstructions/`` and logged to the run in MLflow;
3. optionally train "specialized" models, one per shift, and put them on the same plot;
4. register the model (``raydecode-<method>-subjNN``) and apply the champion gate.

``raydecode dynadiff reconstruct`` runs step 2 alone for an existing checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np

from raydecode import tracking
from raydecode.checkpoint import CONFIG_FILE, read_json
from raydecode.config import DataSelection, DiffusionDecodeConfig, ReconstructOptions, TrainConfig
from raydecode.data.store import open_store
from raydecode.data.windows import read_windows
from raydecode.errors import ConfigError, user_errors_from_ray
from raydecode.evaluate.images import grid_png, reconstruction_metrics, time_curve_png
from raydecode.inference import ModelRunner
from raydecode.methods.spec import Reconstructs, get_method
from raydecode.report import StageResult, table
from raydecode.runtime import absolute_paths, init_ray, row_seeds
from raydecode.storage import resolve
from raydecode.train.launch import run_training


class _Evaluator:
    """Test windows -> test losses and reconstructions with one loaded model (:class:`ModelRunner`)."""

    def __init__(self, ckpt_uri: str, store: str, s3, subjects: list[int] | None, opts: ReconstructOptions,
                 device: str):
        self.runner = ModelRunner.load(ckpt_uri, s3, device, store)
        self.c, self.spec, self.opts, self.store, self.s3 = self.runner.loaded, self.runner.spec, opts, store, s3
        self.window = self.spec.window(self.c.method_config)
        if self.window is None:
            raise ConfigError(f"{ckpt_uri}: method {self.spec.name!r} does not decode time-series windows")
        if self.spec.get(Reconstructs) is None:
            raise ConfigError(f"{ckpt_uri}: method {self.spec.name!r} does not reconstruct images")
        targets = self.c.config["targets"]
        self.selection = DataSelection(subjects=subjects or self.c.info.subjects, images=True, categories=False,
                                       embeddings=sorted(t["encoder"] for t in targets.values()
                                                         if t["source"] == "store"))

    def rows(self, shift: int = 0, single_trial_seed: int | None = None) -> dict[str, np.ndarray]:
        """Test windows: repetitions averaged, or one drawn presentation per image (``single_trial_seed``)."""
        sel = self.selection.model_copy(update={"average_test_repeats": single_trial_seed is None,
                                                "single_test_trial_seed": single_trial_seed})
        return read_windows(self.store, "test", self.window, sel, self.s3, shift=shift)

    def test_losses(self, rows: dict[str, np.ndarray]) -> dict[str, float]:
        return self.runner.test_metrics(rows, self.opts.batch_size)

    def subset(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows to reconstruct: all, or the first ``max_images`` by subject and image id."""
        order = np.lexsort((rows["image_id"], rows["subject"]))[: self.opts.max_images]
        return {k: v[order] for k, v in rows.items()}

    def reconstruct(self, rows: dict[str, np.ndarray], desc: str) -> np.ndarray:
        from tqdm.auto import tqdm

        seeds = row_seeds(self.opts.seed, rows["subject"], rows["image_id"])
        out, done = [], 0
        with tqdm(total=len(seeds), desc=desc, unit="image", mininterval=5) as bar:
            for part, batch in self.runner.batches(rows, self.opts.batch_size):
                k = len(part["subject"])
                out.append(self.runner.reconstruct(batch, seeds[done: done + k], self.opts.steps, self.opts.guidance))
                done += k
                bar.update(k)
        return np.concatenate(out)


def evaluate_checkpoint(ckpt_uri: str, store: str, s3, opts: ReconstructOptions, shifts: list[int],
                        out_uri: str, subjects: list[int] | None = None, reconstruct_shifts: bool = False,
                        tracking_uri: str | None = None, run_id: str | None = None, device: str = "cpu") -> dict:
    """Step 2 of the stage (runs anywhere: a Ray task, a notebook). Returns ``metrics`` (``recon.*``, ``test.*``),
    the time-resolved ``curve`` rows and the written files' URIs."""

    t0 = time.time()
    ev = _Evaluator(ckpt_uri, store, s3, subjects, opts, device)
    tr = ev.c.info.tr_s
    metrics: dict[str, float] = {}
    out = resolve(out_uri, s3)
    with tempfile.TemporaryDirectory(prefix="raydecode-recon-") as tmp:
        rows = ev.rows()
        metrics.update(ev.test_losses(rows))
        shown = ev.subset(rows)
        recon = ev.reconstruct(shown, "reconstruct (averaged repetitions)")
        metrics.update({f"recon.{k}": v for k, v in reconstruction_metrics(shown["image"], recon, opts.size).items()})
        np.savez_compressed(os.path.join(tmp, "test_averaged.npz"), subject=shown["subject"],
                            image_id=shown["image_id"], reconstruction=recon)
        # the grid: the first test images of every subject, in turn
        subjects = np.unique(shown["subject"])
        per = max(1, opts.grid_images // len(subjects))
        pick = np.concatenate([np.flatnonzero(shown["subject"] == s)[:per] for s in subjects])[: opts.grid_images]
        grid_png(shown["image"][pick], recon[pick], os.path.join(tmp, "reconstructions.png"),
                 [f"s{shown['subject'][i]:02d} #{shown['image_id'][i]}" for i in pick])
        if opts.single_trial:
            single = ev.subset(ev.rows(single_trial_seed=opts.seed))
            rec1 = ev.reconstruct(single, "reconstruct (single trials)")
            metrics.update({f"recon.single.{k}": v
                            for k, v in reconstruction_metrics(single["image"], rec1, opts.size).items()})
            metrics.update({f"test.single.{k[5:]}": v for k, v in ev.test_losses(single).items()})
        curve = []
        for k in shifts:
            shifted = rows if k == 0 else ev.rows(shift=k)
            if not len(shifted.get("subject", ())):
                continue
            point = {"shift": k, "window_start_s": ev.window.start_s + k * tr, "window_end_s": ev.window.end_s(tr, k),
                     **(ev.test_losses(shifted) if k else {m: v for m, v in metrics.items() if m.startswith("test.")
                                                           and not m.startswith("test.single.")})}
            if reconstruct_shifts:
                part = ev.subset(shifted)
                rec = recon if k == 0 else ev.reconstruct(part, f"reconstruct (shift {k:+d} TR)")
                point.update({f"recon.{m}": v for m, v in reconstruction_metrics(part["image"], rec, opts.size).items()})
            curve.append(point)
        with open(os.path.join(tmp, "time_resolved.json"), "w") as f:
            json.dump(curve, f, indent=1)
        key = "recon.pixcorr" if reconstruct_shifts else "test.image_gain"
        time_curve_png({"general model": [(p["window_end_s"], p[key]) for p in curve]}, key,
                       os.path.join(tmp, "time_resolved.png"))
        weights = os.path.join(tmp, "weights")
        own = ev.spec.get(Reconstructs)
        if own.export is not None:
            own.export(ev.c.model, weights)
        files = {}
        for root, _, names in os.walk(tmp):
            for name in names:
                local = os.path.join(root, name)
                rel = os.path.relpath(local, tmp)
                with open(local, "rb") as f:
                    out.join(*rel.split(os.sep)).write_bytes_atomic(f.read())
                files[rel] = out.join(*rel.split(os.sep)).uri
        if tracking_uri and run_id:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri)
            client.log_artifacts(run_id, tmp, "reconstructions")
    metrics["recon.seconds"] = round(time.time() - t0, 1)
    return {"metrics": metrics, "curve": curve, "files": files, "tr_s": tr, "n_test": int(len(rows["subject"])),
            "n_reconstructed": int(len(shown["subject"]))}


def _remote_evaluate(cfg: DiffusionDecodeConfig, ckpt_uri: str, out_uri: str, run_id: str | None,
                     tracking_uri: str | None, shifts: list[int] | None = None, reconstruct: bool = True) -> dict:
    """:func:`evaluate_checkpoint` as a Ray task (on a GPU when the stage trains on GPUs)."""
    import ray

    gpu = cfg.scaling.use_gpu
    opts = cfg.reconstruct if reconstruct else cfg.reconstruct.model_copy(update={"single_trial": False})
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)(evaluate_checkpoint)
    env = {"env_vars": cfg.s3.env()} if cfg.s3.env() else None
    ref = task.options(runtime_env=env).remote(
        ckpt_uri, cfg.store, cfg.s3, opts, cfg.time_resolved.shifts if shifts is None else shifts, out_uri,
        cfg.data.subjects, cfg.time_resolved.reconstruct, tracking_uri, run_id, "cuda" if gpu else "cpu")
    with user_errors_from_ray():
        return ray.get(ref)


def _print_results(res: dict, specialized: list[dict]) -> None:
    m = res["metrics"]
    rows = [[k, f"{v:.4g}"] for k, v in sorted(m.items()) if k.startswith(("recon.", "test."))]
    print("\n" + table(["metric", "value"], rows))
    spec_by_shift = {p["shift"]: p for p in specialized}
    key = "recon.pixcorr" if any("recon.pixcorr" in p for p in res["curve"]) else None
    head = ["shift (TR)", "window (s)", "image gain", "condition gain"] + ([key] if key else []) + (
        ["specialized image gain"] if specialized else [])
    body = []
    for p in res["curve"]:
        row = [f"{p['shift']:+d}", f"{p['window_start_s']:.1f} .. {p['window_end_s']:.1f}",
               f"{p['test.image_gain']:.4f}", f"{p['test.condition_gain']:.4f}"] + (
                   [f"{p.get(key, float('nan')):.4f}"] if key else [])
        if specialized:
            sp = spec_by_shift.get(p["shift"])
            row.append(f"{sp['test.image_gain']:.4f}" if sp else "")
        body.append(row)
    print("\ntime-resolved decoding (general model on shifted test windows)\n" + table(head, body))


def train_part(cfg: DiffusionDecodeConfig):
    """The stage's training run: its ``pretrain`` keys, as the loop validates them."""

    return TrainConfig.model_validate(cfg.model_dump(include=set(TrainConfig.model_fields)))


def specialized_config(cfg: DiffusionDecodeConfig, shift: int, tr_s: float) -> DiffusionDecodeConfig:
    """Dynadiff's "specialized" model for ``shift`` TRs: the same run on W(t + shift * TR, d), named
    ``<run_name>-shift+K``."""

    base_start = get_method(cfg.method).config(cfg.preset, cfg.model).window.start_s
    window = {**cfg.model.get("window", {}), "start_s": base_start + shift * tr_s}
    return cfg.model_copy(update={"model": {**cfg.model, "window": window},
                                  "run_name": f"{cfg.run_name}-shift{shift:+d}",
                                  "time_resolved": cfg.time_resolved.model_copy(update={"specialized": []})})


def run_dynadiff(cfg: DiffusionDecodeConfig) -> StageResult:
    import mlflow

    t0 = time.time()
    cfg = absolute_paths(cfg)
    spec = get_method(cfg.method)
    if spec.get(Reconstructs) is None or spec.window(spec.config(cfg.preset, cfg.model)) is None:
        raise ConfigError(f"method {cfg.method!r}: the dynadiff stage needs a method that decodes time-series windows "
                          "into images (e.g. dynadiff)")
    trained = run_training(train_part(cfg), stage="dynadiff")
    run_id, ckpt = trained.mlflow_run_id, trained.artifacts["checkpoint"]
    run_dir = resolve(cfg.storage_path(), cfg.s3).join(cfg.run_name or "run")
    tracking_uri = tracking.configure(cfg)
    res = _remote_evaluate(cfg, ckpt, run_dir.join("reconstructions").uri, run_id, tracking_uri)

    specialized = []
    for k in cfg.time_resolved.specialized:  # one model per shifted window, child runs of the general one
        sub = specialized_config(cfg, k, res["tr_s"])
        window = sub.model["window"]
        print(f"\n[dynadiff] specialized model for shift {k:+d} TR (window from {window['start_s']:.2f} s)")
        r = run_training(train_part(sub), stage="dynadiff-specialized", parent_run_id=run_id)
        sub_dir = resolve(sub.storage_path(), sub.s3).join(sub.run_name)
        ev = _remote_evaluate(sub, r.artifacts["checkpoint"], sub_dir.join("reconstructions").uri, r.mlflow_run_id,
                              tracking_uri, shifts=[0], reconstruct=cfg.time_resolved.reconstruct)
        point = dict(ev["curve"][0], shift=k)
        specialized.append(point)

    metrics = res["metrics"]
    key = "recon.pixcorr" if cfg.time_resolved.reconstruct else "test.image_gain"
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"final.{k}": float(v) for k, v in metrics.items()})
        for i, p in enumerate(res["curve"]):
            mlflow.log_metric(f"time_resolved.{key}", float(p[key]), step=i)
        if specialized:
            with tempfile.TemporaryDirectory() as tmp:
                time_curve_png({"general model": [(p["window_end_s"], p[key]) for p in res["curve"]],
                                "specialized models": [(p["window_end_s"], p[key]) for p in specialized]},
                               key, os.path.join(tmp, "time_resolved_specialized.png"))
                with open(os.path.join(tmp, "time_resolved_specialized.json"), "w") as f:
                    json.dump(specialized, f, indent=1)
                mlflow.log_artifacts(tmp, "reconstructions")
    _print_results(res, specialized)

    artifacts = {**trained.artifacts, **{f"reconstructions.{k}": v for k, v in res["files"].items()
                                         if not k.startswith("weights")}}
    if cfg.promote:
        if cfg.metric not in metrics:
            raise ConfigError(f"metric {cfg.metric!r}: not measured; measured: {', '.join(sorted(metrics))}")
        store = open_store(cfg.store, cfg.s3)
        subjects = cfg.data.subjects or store.manifest.subject_ids
        window = spec.config(cfg.preset, cfg.model).window
        test_set = (f"{store.test_set_digest(subjects)}/windows {window.start_s:g}s+{window.duration_s:g}s/"
                    f"{window.detrend}/ddim {cfg.reconstruct.steps or 'model'}")
        d = tracking.register_run(run_id, ckpt, {**trained.metrics, **metrics}, cfg.metric, cfg.tie_break, test_set,
                                  store.manifest_sha256(), s3=cfg.s3)
        print(f"\nregistry {d.name} v{d.version} -> {d.alias}: {d.reason}")
        artifacts.update({"model": f"models:/{d.name}/{d.version}", "alias": d.alias})
    print(f"\ngrid     {res['files'].get('reconstructions.png')}\nmlflow   run {run_id} ({tracking_uri})")
    out = {**{k: float(v) for k, v in trained.metrics.items() if isinstance(v, (int, float))},
           **{f"final.{k}": float(v) for k, v in metrics.items()}, "seconds": round(time.time() - t0, 1)}
    return StageResult(stage="dynadiff", status="ok", mlflow_run_id=run_id, metrics=out, artifacts=artifacts)


def run_reconstruct_only(cfg: DiffusionDecodeConfig) -> StageResult:
    """``raydecode dynadiff reconstruct``: step 2 for an existing checkpoint, in a new MLflow run."""
    import mlflow

    t0 = time.time()
    cfg = absolute_paths(cfg)
    ckpt = cfg.checkpoint_uri or resolve(cfg.storage_path(), cfg.s3).join(cfg.run_name or "run", "final").uri
    read_json(ckpt, CONFIG_FILE, cfg.s3)  # a clear error before anything starts
    tracking_uri = tracking.configure(cfg)
    with tracking.stage_run(cfg, "reconstruct", run_name=f"{cfg.run_name}-reconstruct",
                            tags={"raydecode.checkpoint_uri": ckpt}) as run:
        init_ray(cfg.ray_address)
        out_uri = ckpt.rstrip("/").rsplit("/", 1)[0] + "/reconstructions"
        res = _remote_evaluate(cfg, ckpt, out_uri, run.info.run_id, tracking_uri)
        mlflow.log_metrics({k: float(v) for k, v in res["metrics"].items()})
    _print_results(res, [])
    print(f"\ngrid     {res['files'].get('reconstructions.png')}\nmlflow   run {run.info.run_id} ({tracking_uri})")
    return StageResult(stage="reconstruct", status="ok", mlflow_run_id=run.info.run_id,
                       metrics={**res["metrics"], "seconds": round(time.time() - t0, 1)},
                       artifacts={f"reconstructions.{k}": v for k, v in res["files"].items()})
