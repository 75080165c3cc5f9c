"""``raydecode evaluate`` and ``raydecode compare``: one evaluation suite for every method.

1. resolve the model reference (``models:/name@alias``, ``models:/name/version``, ``runs:/<id>/model`` or a
   ``final/`` checkpoint URI) to a fixed identity (``models:/name/<version>``, ...) and the run that trained it;
2. per protocol (``averaged``: repetitions averaged per test image, MindEye2; ``single``: one drawn presentation
   per image, Dynadiff), stream the store's test split through an actor pool of :class:`Predictor` (Ray Data
   batch inference; a GPU per actor when the cluster has them). Each actor loads the model once and returns, per
   row, what the method can predict: retrieval embeddings, backbone embeddings, class scores, test losses, and
   reconstructions (the method's own generator, or the predicted CLIP image tokens through an unCLIP-style
   decoder) with their per-image PixCorr / SSIM and the metric networks' features of reconstruction and stimulus
   (so nothing larger than features and images reaches the driver);
3. the driver computes the suite's metrics (:func:`protocol_metrics`): retrieval (MindEye protocol, 95%
   intervals), ``recon.*`` (PixCorr, SSIM, two-way identification on AlexNet 2/5, InceptionV3, CLIP, distances on
   EfficientNet-B1 and SwAV), ``semantic.*`` (mAP, AUC, Hamming), ``test.*``; writes metrics.json / metrics.md,
   the retrieval, grid and t-SNE plots and the reconstructions; logs all of it to one MLflow evaluation run,
   tagged with the model's identity and linked from the model's run (and registry version).

``raydecode compare`` reads the latest evaluation run of each reference and prints the papers' Table 1.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict

import numpy as np

from raydecode import tracking
from raydecode.checkpoint import ModelRef, model_config, resolve_ref
from raydecode.config import CompareConfig, EvaluateConfig, protocol_shift
from raydecode.data.pipeline import REPEATS, with_stimuli
from raydecode.data.store import open_store
from raydecode.errors import ConfigError, StoreError, user_errors_from_ray
from raydecode.evaluate.feature_metrics import (
    FeatureExtractor,
    MetricNet,
    correlation_distance,
    paper_protocol,
    two_way_identification,
)
from raydecode.evaluate.images import grid_png, pixcorr, ssim
from raydecode.evaluate.ipadapter import IPAdapterDecoder
from raydecode.evaluate.plots import metrics_table_md, retrieval_png, tsne_png
from raydecode.evaluate.protocols import (
    check_protocols,
    curve_metric,
    named,
    test_rows,
    test_selection,
    time_resolved,
    time_resolved_table,
    write_time_resolved,
)
from raydecode.evaluate.retrieval import retrieval_top1
from raydecode.evaluate.semantic import semantic_metrics
from raydecode.evaluate.unclip import EmbeddingDecoder, unclip_config
from raydecode.inference import ModelRunner
from raydecode.methods.spec import EmbedsImages, Reconstructs, get_method
from raydecode.nn.encoders import FrozenEncoder, encoder_config
from raydecode.report import StageResult, filter_literal, table
from raydecode.runtime import Demand, cluster_shape, init_ray, require, row_seeds
from raydecode.tracking import mlflow_uri

# the papers' Table 1 order
TABLE_COLUMNS = ("retrieval.brain_to_image_top1", "retrieval.image_to_brain_top1", "recon.pixcorr", "recon.ssim",
                 "recon.alexnet2", "recon.alexnet5", "recon.inception", "recon.clip", "recon.effnet", "recon.swav",
                 "semantic.map", "semantic.auc", "semantic.hamming")
EVALUATES_TAG = "raydecode.evaluates"


# -- batch inference -----------------------------------------------------------------------------


def reconstruct_keys(subjects: list[int], image_ids: list[int], max_images: int | None) -> np.ndarray | None:
    """The (subject, image) keys to reconstruct: the first ``max_images`` by subject and image id; None: all."""
    if max_images is None:
        return None
    keys = np.sort(np.asarray([s * 10**7 + i for s in subjects for i in image_ids], np.int64))
    return keys[:max_images]


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_generator(value: str | dict):
    """The image generator ``decoder`` names: ``{kind: ip-adapter, ...}`` (SD 1.5 + IP-Adapter Plus,
    :mod:`raydecode.evaluate.ipadapter`), otherwise an unCLIP decoder (:mod:`raydecode.evaluate.unclip`)."""
    if isinstance(value, dict) and value.get("kind") == "ip-adapter":
        return IPAdapterDecoder.from_config(value)
    return EmbeddingDecoder.from_config(unclip_config(value))


class Predictor:
    """A Ray Data actor: loads the model once (:class:`~raydecode.inference.ModelRunner`), then test batches ->
    per-row predictions and metrics inputs."""

    def __init__(self, ref: dict, tracking_uri: str, cfg: dict, keys: np.ndarray | None, use_gpu: bool):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        self.cfg = EvaluateConfig(**cfg)
        self.device = "cuda" if use_gpu else "cpu"
        self.runner = ModelRunner.load(ModelRef(**ref), self.cfg.s3, self.device, self.cfg.store)
        self.spec, self.keys = self.runner.spec, keys
        targets = self.runner.loaded.config["targets"]
        opts = self.cfg.reconstruct
        self.decoder = self.blur_vae = None
        self.own = self.spec.get(Reconstructs)  # the method decodes images itself, or an image generator does
        can = self.own is not None or (self.spec.get(EmbedsImages) is not None and self.cfg.decoder)
        self.reconstructs = bool(opts.enabled and can)
        # the protocols whose rows are reconstructed (shifted windows only when asked: one more DDIM pass each)
        self.recon_protocols = [i for i, p in enumerate(self.cfg.protocols)
                                if protocol_shift(p) is None or opts.shifted]
        if self.reconstructs and self.own is None:
            self.decoder = image_generator(self.cfg.decoder).to(self.device)
            if getattr(self.decoder.cfg, "blend", 0) > 0 and "vae" in targets:  # MindEye2's blurry image, decoded by its VAE
                self.blur_vae = FrozenEncoder(encoder_config(targets["vae"]["encoder"])).to(self.device)
        paper = paper_protocol(self.spec.name)
        self.pixel_size = self.cfg.reconstruct.size or paper.pixel_size
        nets = metric_nets(self.cfg, self.spec.name)
        self.nets, extractors = [], {}
        for net in nets if self.reconstructs else []:
            key = (net.arch, net.kind, net.layer, net.weights, net.seed, net.size)
            self.nets.append((net, extractors.setdefault(key, FeatureExtractor(net).to(self.device))))

    def _reconstruct(self, batch: dict, seeds: np.ndarray) -> np.ndarray:
        opts = self.cfg.reconstruct
        if self.own is not None:
            return self.runner.reconstruct(batch, seeds, opts.steps, opts.guidance)
        emb = self.spec.get(EmbedsImages).image_embeddings(self.runner.model, batch, seeds)
        blurry = None
        if self.blur_vae is not None and "lowlevel_latents" in emb:
            blurry = self.blur_vae.decode(emb["lowlevel_latents"]).numpy()
        return self.decoder.generate(emb["clip_tokens"], seeds, blurry=blurry, steps=opts.steps,
                                     guidance=opts.guidance).cpu().numpy()

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(rows["subject"])
        out = {k: rows[k] for k in ("subject", "image_id", "categories", "protocol") if k in rows}
        stimuli = rows.get("image")
        batch = self.runner.batch(rows)  # targets computed from the images; the images leave the batch
        pred = self.runner.predict(batch)
        if "brain" in pred and "image" in pred:
            out["brain"] = pred["brain"].float().cpu().numpy().astype(np.float16)
            out["image"] = pred["image"].float().cpu().numpy().astype(np.float16)
        emb = pred.get("embedding", pred.get("brain"))  # the prediction contract: MethodSpec's docstring
        if emb is not None:
            out["embedding"] = emb.float().flatten(1).cpu().numpy()
        if "logits" in pred:
            out["logits"] = pred["logits"].float().cpu().numpy()
        for k, v in self.runner.test_values(batch).items():
            out[f"test.{k}"] = v.float().cpu().numpy()
        with torch.no_grad():
            if self.reconstructs and stimuli is not None:
                keys = rows["subject"].astype(np.int64) * 10**7 + rows["image_id"]
                mask = np.ones(n, bool) if self.keys is None else np.isin(keys, self.keys)
                if "protocol" in rows:
                    mask &= np.isin(rows["protocol"], self.recon_protocols)
                h, w = stimuli.shape[1:3]
                recon = np.zeros_like(stimuli)
                size = self.pixel_size
                out["pixcorr"], out["ssim"] = np.zeros(n, np.float32), np.zeros(n, np.float32)
                if mask.any():
                    idx = np.flatnonzero(mask)
                    sub = {k: v[idx] for k, v in batch.items()}
                    images = self._reconstruct(sub, row_seeds(self.cfg.reconstruct.seed, rows["subject"][idx],
                                                              rows["image_id"][idx]))
                    recon[idx] = images if images.shape[1:3] == (h, w) else _resize(images, h)
                    out["pixcorr"][idx] = pixcorr(stimuli[idx], recon[idx], size)
                    out["ssim"][idx] = ssim(stimuli[idx], recon[idx], size)
                idx = np.flatnonzero(mask)
                some = idx if len(idx) else np.arange(1)  # one row gives the feature shape of a batch without any
                for net, ext in self.nets:  # features of the reconstructed rows only (zeros elsewhere)
                    fr, fs = ext(recon[some]).numpy(), ext(stimuli[some]).numpy()
                    for side, f in (("recon", fr), ("stim", fs)):
                        full = np.zeros((n, *f.shape[1:]), np.float16)
                        full[idx] = f[: len(idx)]
                        out[f"feat.{net.metric}.{side}"] = full
                out["recon"], out["stimulus"], out["reconstructed"] = recon, stimuli, mask
        return out


def _tag_protocol(batch: dict[str, np.ndarray], protocol: int, fill_repeats: bool = False) -> dict[str, np.ndarray]:
    """A protocol's rows tagged with its index; ``fill_repeats``: rows without repetitions (single trials) carry
    their own betas REPEATS times as ``betas_repeats``, so that every protocol's rows have the same columns (see
    :func:`infer`; a model averaging its outputs over identical repeats predicts what it predicts for the trial)."""
    out = {**batch, "protocol": np.full(len(batch["subject"]), protocol, np.int8)}
    if fill_repeats and "betas" in batch and "betas_repeats" not in batch:
        out["betas_repeats"] = np.repeat(np.asarray(batch["betas"], np.float32)[:, None], REPEATS, axis=1)
    return out


def infer(cfg: EvaluateConfig, ref: ModelRef, config: dict, keys: np.ndarray | None,
          use_gpu: bool) -> dict[str, dict[str, np.ndarray]]:
    """Every protocol's test split through one actor pool (one model load per actor) -> per protocol, every
    row's outputs (sorted by subject, image id)."""
    from ray.data import ActorPoolStrategy

    # one column set for every protocol: the Predictor's batches mix protocols, and Ray Data cannot make numpy of a
    # batch whose blocks lack a tensor column others have ("buffer is too small for requested array")
    repeats = any(test_selection(cfg, config, p).keep_test_repeats for p in cfg.protocols)
    parts = [test_rows(cfg, config, p).map_batches(_tag_protocol, fn_kwargs={"protocol": i, "fill_repeats": repeats},
                                                   batch_format="numpy", num_cpus=cfg.data.read_cpus)
             for i, p in enumerate(cfg.protocols)]
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # the stimuli joined once for every protocol, after the union
    ds = with_stimuli(ds, open_store(cfg.store, cfg.s3), test_selection(cfg, config, cfg.protocols[0]))
    # an actor holds its model: Ray Data's "uses N MiB per worker" advice is expected here, not a problem
    ds.context.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    ds = ds.map_batches(
        Predictor, fn_constructor_args=(asdict(ref), mlflow_uri(), cfg.model_dump(mode="json"), keys, use_gpu),
        compute=ActorPoolStrategy(size=cfg.actors), num_cpus=cfg.cpus_per_actor, num_gpus=1 if use_gpu else 0,
        batch_size=cfg.batch_size, batch_format="numpy")
    from tqdm.auto import tqdm

    batches = []
    # progress of the actor pool's output, as the driver receives it; a user error inside an actor (bad weights,
    # bad store) reaches the user as itself
    with user_errors_from_ray(), tqdm(desc=f"evaluate ({' + '.join(cfg.protocols)})", unit="row",
                                      mininterval=10) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            batches.append(batch)
            bar.update(len(batch["subject"]))
    if not batches:
        raise StoreError(f"{cfg.store}: no test rows for subjects {cfg.subjects}")
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    out = {}
    for i, p in enumerate(cfg.protocols):
        pick = np.flatnonzero(rows["protocol"] == i)
        pick = pick[np.lexsort((rows["image_id"][pick], rows["subject"][pick]))]
        out[p] = {k: v[pick] for k, v in rows.items() if k != "protocol"}
    return out


# -- metrics -------------------------------------------------------------------------------------


def protocol_metrics(rows: dict[str, np.ndarray], cfg: EvaluateConfig, nets, spec=None) -> dict[str, float]:
    """The suite's metrics of one protocol's rows (names without the protocol infix)."""
    import torch

    m: dict[str, float] = {"rows": float(len(rows["subject"]))}
    if "brain" in rows:
        r = retrieval_top1(torch.from_numpy(rows["brain"].astype(np.float32)),
                           torch.from_numpy(rows["image"].astype(np.float32)), rows["subject"],
                           cfg.retrieval.candidates, cfg.retrieval.draws, cfg.retrieval.seed)
        m.update({f"retrieval.{k}": v for k, v in r.items()})
    if "recon" in rows and rows["reconstructed"].any():
        done = rows["reconstructed"]
        m["recon.images"] = float(done.sum())
        m["recon.pixcorr"] = float(rows["pixcorr"][done].mean())
        m["recon.ssim"] = float(rows["ssim"][done].mean())
        subjects = rows["subject"][done]
        for net in nets:  # per subject (every subject sees the same images), then averaged
            recon, stim = rows[f"feat.{net.metric}.recon"][done], rows[f"feat.{net.metric}.stim"][done]
            score = two_way_identification if net.score == "two_way" else correlation_distance
            values = [score(recon[subjects == s], stim[subjects == s]) for s in np.unique(subjects)
                      if (subjects == s).sum() >= 2]
            if values:
                m[f"recon.{net.metric}"] = float(np.mean(values))
    if "logits" in rows and "categories" in rows:
        m.update({f"semantic.{k}": v for k, v in semantic_metrics(rows["logits"], rows["categories"]).items()})
    sums = {k[len("test."):]: float(rows[k].sum()) for k in rows if k.startswith("test.")}
    if spec is not None:  # the method's own summary of its test losses (e.g. Dynadiff's condition and image gains)
        m.update(spec.test_summary(sums, len(rows["subject"])))
    return m


# -- the stage -----------------------------------------------------------------------------------


def _use_gpu(cfg: EvaluateConfig) -> bool:
    """``use_gpu``, else whether the cluster can have GPUs (its autoscaler's node types, else its nodes); the actor
    pool must fit on what it can have (waiting for nodes on a cluster without an autoscaler)."""
    use_gpu = cluster_shape().has("GPU") if cfg.use_gpu is None else cfg.use_gpu
    require(evaluate_demand(cfg, use_gpu), cfg.wait_for_nodes_s)
    return use_gpu


def evaluate_demand(cfg: EvaluateConfig, use_gpu: bool) -> Demand:
    """What an evaluation holds at once: its inference actors, and beside them room for Ray Data's tasks, one at a
    time: a read task (``data.read_cpus``; it also joins the stimuli) or one of the averaging shuffle's (Ray Data's
    sort shuffle: one whole CPU)."""
    actor = {"CPU": cfg.cpus_per_actor, **({"GPU": 1.0} if use_gpu else {})}
    averages = any(p != "single" for p in cfg.protocols)
    extra = [{"CPU": max(1.0 if averages else 0.0, cfg.data.read_cpus)}]
    return Demand("evaluate", [dict(actor) for _ in range(cfg.actors)], extra=extra,
                  hint="lower actors / cpus_per_actor / data.read_cpus, set use_gpu to match the nodes, "
                       "or add nodes")


def _write_outputs(tmp: str, cfg: EvaluateConfig, ref: ModelRef, results: dict[str, dict],
                   metrics: dict[str, float]) -> list[str]:
    files = []
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
        json.dump({"model": ref.ref, "evaluates": ref.canonical, "metrics": metrics}, f, indent=1)
    names = sorted({k for res in results.values() for k in res["metrics"]})  # a row per protocol, its own names
    with open(os.path.join(tmp, "metrics.md"), "w") as f:
        f.write(f"# {ref.ref} ({ref.canonical})\n\n"
                + metrics_table_md({p: res["metrics"] for p, res in results.items()}, names) + "\n")
    files += ["metrics.json", "metrics.md"]
    retrieval = {p: {k[len("retrieval."):]: v for k, v in res["metrics"].items() if k.startswith("retrieval.")}
                 for p, res in results.items() if "retrieval.brain_to_image_top1" in res["metrics"]}
    if retrieval:
        retrieval_png({{"averaged": "averaged repetitions", "single": "single trial"}.get(p, p): r
                       for p, r in retrieval.items()}, os.path.join(tmp, "retrieval.png"))
        files.append("retrieval.png")
    for p, res in results.items():
        rows = res["rows"]
        if "recon" in rows and rows["reconstructed"].any():
            idx = np.flatnonzero(rows["reconstructed"])
            np.savez_compressed(os.path.join(tmp, f"reconstructions_{p}.npz"), subject=rows["subject"][idx],
                                image_id=rows["image_id"][idx], reconstruction=rows["recon"][idx])
            subjects = np.unique(rows["subject"][idx])
            per = max(1, cfg.reconstruct.grid_images // len(subjects))
            pick = np.concatenate([idx[rows["subject"][idx] == s][:per] for s in subjects])[: cfg.reconstruct.grid_images]
            grid_png(rows["stimulus"][pick], rows["recon"][pick], os.path.join(tmp, f"reconstructions_{p}.png"),
                     [f"s{rows['subject'][i]:02d} #{rows['image_id'][i]}" for i in pick])
            files += [f"reconstructions_{p}.npz", f"reconstructions_{p}.png"]
    first = next(iter(results.values()))["rows"]
    if cfg.tsne and "embedding" in first and len(first["subject"]) >= 5:
        tsne_png(first["embedding"], first["subject"], first.get("categories"), os.path.join(tmp, "tsne.png"),
                 title=f"backbone embeddings of {ref.ref}")
        files.append("tsne.png")
    return files


def metric_nets(cfg: EvaluateConfig, method: str) -> list[MetricNet]:
    """The configured metric networks, else the method's paper's."""
    if cfg.metric_nets is not None:
        return [MetricNet(**n) for n in cfg.metric_nets]
    return list(paper_protocol(method).nets)


def _model_for(cfg: EvaluateConfig) -> tuple[ModelRef, dict, object, list[int]]:
    """The model reference resolved, its saved config, the store and the subjects to evaluate (checked)."""
    if not cfg.model:
        raise ConfigError("evaluate needs --model (models:/name@alias, runs:/<id>/model or a checkpoint URI)")
    ref = resolve_ref(cfg.model, cfg.s3)
    config = model_config(ref, cfg.s3)
    check_protocols(cfg, config)
    store = open_store(cfg.store, cfg.s3)
    subjects = store.check_subjects(cfg.subjects or config["info"]["subjects"])
    missing = sorted(set(subjects) - set(config["info"]["subjects"]))
    if missing:
        raise ConfigError(f"subjects {missing}: model {ref.ref} was trained for subjects {config['info']['subjects']}")
    return ref, config, store, subjects


def _print_summary(cfg: EvaluateConfig, results: dict[str, dict], curve: list[dict], key: str | None) -> None:
    """The papers' columns (and test values) per protocol, then the time-resolved curve."""
    main = [p for p in cfg.protocols if protocol_shift(p) is None]
    measured = {k for p in main for k in results[p]["metrics"]}
    shown = [k for k in TABLE_COLUMNS if k in measured] + sorted(k for k in measured if k.startswith("test."))
    if main and shown:
        print("\n" + table(["metric"] + main, [[k] + [results[p]["metrics"].get(k, float("nan")) for p in main]
                                              for k in shown]))
    if curve:
        print("\n" + time_resolved_table(curve, key))


def run_evaluate(cfg: EvaluateConfig) -> StageResult:
    import mlflow
    from mlflow.tracking import MlflowClient

    t0 = time.time()
    tracking_uri = tracking.configure(cfg)
    ref, config, store, subjects = _model_for(cfg)
    spec = get_method(config["method"])
    nets = metric_nets(cfg, spec.name)
    reconstructs = cfg.reconstruct.enabled and (spec.get(Reconstructs) is not None
                                                 or (spec.get(EmbedsImages) is not None and bool(cfg.decoder)))
    random_nets = [n.metric for n in nets if n.random] if reconstructs else []
    if random_nets and config.get("preset") == "paper" and not cfg.allow_random_weights:
        raise ConfigError(f"metric_nets: {', '.join(random_nets)} have no weights (random networks) and {ref.ref} is a "
                          "paper-preset model: give their `weights` (jobs/evaluate-nsd.yaml) or set "
                          "allow_random_weights: true")
    print(f"[evaluate] {ref.ref} -> {ref.canonical} ({config['method']}, subjects {subjects}), store {cfg.store}")
    if cfg.decoder is None and spec.get(Reconstructs) is None and spec.get(EmbedsImages) is not None:
        print("[evaluate] no `decoder` configured: retrieval only (set decoder to reconstruct images)")
    keys = reconstruct_keys(subjects, list(store.manifest.shared_test_image_ids), cfg.reconstruct.max_images)
    init_ray(cfg.ray_address)
    use_gpu = _use_gpu(cfg)
    cfg = cfg.model_copy(update={"subjects": subjects})

    client = MlflowClient()
    with tracking.stage_run(cfg, "evaluate", run_name=cfg.run_name or f"evaluate {ref.ref}", tags={
            "raydecode.model_ref": ref.ref, EVALUATES_TAG: ref.canonical, "raydecode.model_run_id": ref.run_id or "",
            "raydecode.method": config["method"], "raydecode.store": cfg.store,
            "raydecode.test_set": store.test_set_digest(subjects),
            "raydecode.random_metric_nets": ",".join(random_nets) or "none"}) as run:
        run_id = run.info.run_id
        results, metrics = {}, {}
        t1 = time.time()
        for protocol, rows in infer(cfg, ref, config, keys, use_gpu).items():
            m = protocol_metrics(rows, cfg, nets, spec)
            results[protocol] = {"rows": rows, "metrics": m}
            metrics.update(named(m, protocol))
        metrics["inference_seconds"] = round(time.time() - t1, 1)
        counts = ", ".join(f"{p}: {int(r['metrics']['rows'])} rows" for p, r in results.items())
        print(f"[evaluate] {counts} in {metrics['inference_seconds']} s")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        curve = time_resolved({p: r["metrics"] for p, r in results.items()}, config)
        key = curve_metric(curve, config["method"])
        for i, point in enumerate(curve):  # the curve in MLflow's charts: one step per shift, in time order
            mlflow.log_metrics({f"time_resolved.{k}": float(v) for k, v in point.items()
                                if k.startswith(("test.", "recon.")) and np.isfinite(v)}, step=i)
        out_dir = os.path.join(cfg.workdir, "evaluations", run_id)
        os.makedirs(out_dir, exist_ok=True)
        files = _write_outputs(out_dir, cfg, ref, results, metrics)
        if curve:
            files += write_time_resolved(curve, key, out_dir)
        mlflow.log_artifacts(out_dir, "evaluation")
        if ref.run_id:  # the model's run (and registry version) point to their evaluations
            client.set_tag(ref.run_id, "raydecode.last_evaluation_run_id", run_id)
        if ref.kind == "registry":
            client.set_model_version_tag(ref.name, ref.version, "raydecode.last_evaluation_run_id", run_id)

    _print_summary(cfg, results, curve, key)
    print(f"\nevaluation run {run_id} ({tracking_uri}); files in {out_dir}: {', '.join(files)}")
    metrics["seconds"] = round(time.time() - t0, 1)
    return StageResult(stage="evaluate", status="ok", mlflow_run_id=run_id, metrics=metrics,
                       artifacts={"evaluates": ref.canonical, "outputs": out_dir,
                                  **{f: os.path.join(out_dir, f) for f in files}})


def evaluation_run(ref: ModelRef, experiment: str):
    """The latest finished evaluation run of ``ref`` (None if there is none)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = MlflowClient().search_runs(
        [exp.experiment_id], filter_string=f"tags.`{EVALUATES_TAG}` = {filter_literal(ref.canonical)} and "
                                           "status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def run_compare(cfg: CompareConfig) -> StageResult:
    import mlflow

    if not cfg.models:
        raise ConfigError("compare needs at least one model reference")
    tracking.configure(cfg)
    rows: dict[str, dict[str, float]] = {}
    runs = {}
    for r in cfg.models:
        ref = resolve_ref(r, cfg.s3)
        run = evaluation_run(ref, cfg.experiment)
        if run is None:
            raise ConfigError(f"{r}: no evaluation run of {ref.canonical} in experiment {cfg.experiment!r}; "
                              f"run `raydecode evaluate --model {r}` first")
        runs[r] = run.info.run_id
        m = run.data.metrics
        rows[r] = {k: m[k] for k in TABLE_COLUMNS if k in m}
        single = {k: m[k.replace(".", ".single.", 1)] for k in TABLE_COLUMNS if k.replace(".", ".single.", 1) in m}
        if single:
            rows[f"{r} (single trial)"] = single
    columns = [k for k in TABLE_COLUMNS if any(k in row for row in rows.values())]
    md = metrics_table_md(rows, columns)
    print(md)
    os.makedirs(cfg.workdir, exist_ok=True)
    path = os.path.join(cfg.workdir, "compare.md")
    with open(path, "w") as f:
        f.write(md + "\n\nevaluation runs: " + ", ".join(f"{k} -> {v}" for k, v in runs.items()) + "\n")
    with tracking.stage_run(cfg, "compare", run_name=cfg.run_name or "compare",
                            tags={"raydecode.compared": json.dumps(cfg.models)}) as run:
        mlflow.log_artifact(path)
    return StageResult(stage="compare", status="ok", mlflow_run_id=run.info.run_id,
                       metrics={f"{r}/{k}": v for r, row in rows.items() for k, v in row.items()},
                       artifacts={"table": path, **{f"evaluation/{r}": v for r, v in runs.items()}})
