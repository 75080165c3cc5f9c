"""``raydecode claims``: each implemented paper's central claim, re-run on a synthetic store.

Every claim compares two arms (or two read-outs of one model) trained with the real pipeline (Ray Train +
DeepSpeed, the method's own loss, MLflow child runs of the claims run), then scores each test image of the claim's
subject in this process from the final checkpoints (:class:`~raydecode.inference.ModelRunner`, no Ray):

============ ===================================================================== ================================
claim        statement                                                             per-image score
============ ===================================================================== ================================
mindeye2     pretraining on the other subjects + 1 session of subject 8 beats      retrieval rank (both directions,
             training on that session alone (MindEye2, Sec. 3.1)                   all test images as candidates)
duala        Duala's adaptation is at least as good as plain LoRA adaptation of    retrieval rank, as above
             the same pretrained model (Duala, Table 4 ablation)
mindlink     the subject-adversarial loss lowers how well a linear probe reads     the probe's cross-validated
             the subject from the shared embedding (MindLink, Sec. 3.3)            correctness per test row
clip_mused   one model of six subjects decodes subject 1's image categories        mAP over categories (resampled
             better than a model of subject 1 alone (CLIP-MUSED, Table 2)          images)
dynadiff     decoding peaks at the trained window (3-11 s after onset): the        the brain condition's denoising
             image gain there exceeds that of windows 3 TRs earlier or later       gain over a shuffled condition
             (Dynadiff, Fig. 5)
============ ===================================================================== ================================

The effect (arm A - arm B) gets a 95% paired bootstrap interval over the test images; repeats (seeds) are averaged
per image first. Verdict: ``pass`` when the interval clears the claim's threshold (0, or -margin for an "at least as
good" claim), ``fail`` when it lies wholly on the other side, ``inconclusive`` otherwise: at the tiny preset's
budget a claim may be inconclusive, never decided by a point estimate. The table goes to MLflow as
``claims.md`` / ``claims.json``; each claim's effect, interval and verdict (1 pass, 0 inconclusive, -1 fail) as
metrics ``claims.<claim>.*``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from raydecode import tracking
from raydecode.config import ClaimsConfig, DataSelection, TrainConfig
from raydecode.data.ingest import run_ingest, synthetic_plan
from raydecode.data.pipeline import read_split
from raydecode.data.store import open_store
from raydecode.data.windows import read_windows
from raydecode.errors import StoreError
from raydecode.evaluate.semantic import semantic_metrics
from raydecode.inference import ModelRunner
from raydecode.methods.spec import get_method
from raydecode.report import StageResult, table
from raydecode.runtime import init_ray
from raydecode.storage import resolve
from raydecode.train.launch import run_training

TARGET = 8  # MindEye2's and Duala's new subject: pretrained without it
SHIFT = 3  # Dynadiff: the windows of the neighbouring presentations (3 TRs = 3.9 s earlier / later)

# Each claim's training budget per preset: the runs' shared keys, then each arm's (dotted keys as in --set).
_COMMON = {
    "tiny": {"optim": {"batch_size": 8, "lr": 1e-3}},
    "demo": {"optim": {"batch_size": 16, "lr": 1e-3}},
}
_TINY = {
    "pretrain": {"method": "mindeye2", "data": {"hold_out": [TARGET], "categories": False},
                 "optim": {"epochs": 6, "batch_size": 32}},
    "mindeye2": {"data": {"subjects": [TARGET], "sessions": [1], "categories": False}, "optim": {"epochs": 12}},
    "duala": {"method": "duala", "data": {"subjects": [TARGET], "sessions": [1]}, "optim": {"epochs": 8}},
    "mindlink": {"method": "mindlink", "data": {"subjects": [1, 2, 3], "categories": False},
                 "optim": {"epochs": 12, "batch_size": 32, "lr": 3e-3}},
    "clip_mused": {"method": "clip_mused", "data": {"subjects": [1, 2, 3, 4, 5, 6]},
                   "optim": {"epochs": 6, "batch_size": 32, "lr": 3e-3, "weight_decay": 0.0}},
    "dynadiff": {"method": "dynadiff", "data": {"subjects": [1], "categories": False},
                 "model": {"eval_timesteps": 4}, "optim": {"epochs": 3, "batch_size": 16}},
}
# the demo store has 6x the trials: longer adaptation runs, CLIP-MUSED as jobs/clip-mused.yaml
_DEMO = {"pretrain": {"optim": {"epochs": 10}}, "mindeye2": {"optim": {"epochs": 15}},
         "duala": {"optim": {"epochs": 15}}, "clip_mused": {"optim": {"epochs": 10, "batch_size": 64}}}


def _recipes(overrides: dict[str, dict]) -> dict[str, dict]:
    out = copy.deepcopy(_TINY)
    for claim, extra in overrides.items():
        _merge(out[claim], extra)
    return out


@dataclass(frozen=True)
class Claim:
    key: str
    paper: str
    statement: str
    arms: tuple[str, str]  # what arm A and arm B are (effect = A - B)
    score: str  # what is scored per test image
    threshold: float = 0.0  # the interval must clear this (a negative margin: "at least as good")


CLAIM_TEXT = {
    "mindeye2": Claim("mindeye2", "MindEye2", "pretrained on 7 subjects + 1 session beats 1 session alone",
                      ("pretrained+1 session", "1 session"), "retrieval rank"),
    "duala": Claim("duala", "Duala", "Duala adapts at least as well as plain LoRA (margin 0.05)",
                   ("Duala", "plain LoRA"), "retrieval rank", threshold=-0.05),
    "mindlink": Claim("mindlink", "MindLink", "the subject adversary lowers subject decodability",
                      ("without L_subj", "with L_subj"), "subject probe accuracy"),
    "clip_mused": Claim("clip_mused", "CLIP-MUSED", "6 subjects decode subject 1's categories better than 1",
                        ("6 subjects", "subject 1 alone"), "category mAP"),
    "dynadiff": Claim("dynadiff", "Dynadiff", "decoding peaks at the trained window, not 3 TRs off",
                      ("window 3-11 s", f"max of shifts +-{SHIFT} TRs"), "image gain"),
}


@dataclass
class ClaimResult:
    claim: str
    paper: str
    statement: str
    score: str
    a: float  # arm A's score
    b: float
    effect: float
    low: float
    high: float
    threshold: float
    verdict: str
    n: int  # test images (or rows) resampled
    runs: list[str] = field(default_factory=list)


def paired_bootstrap(stat: Callable[[np.ndarray], float], n: int, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of ``stat(indices)`` over ``resamples`` draws of ``n`` items with replacement."""
    rng = np.random.default_rng(seed)
    values = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)])
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def verdict(low: float, high: float, threshold: float) -> str:
    return "pass" if low > threshold else "fail" if high < threshold else "inconclusive"


# -- per-image scores ----------------------------------------------------------------------


def _runner(ckpt: str, cfg: ClaimsConfig) -> ModelRunner:
    return ModelRunner.load(ckpt, cfg.s3, store=cfg.store)


def _test_rows(cfg: ClaimsConfig, runner: ModelRunner, subjects: list[int],
               categories: bool = False) -> dict[str, np.ndarray]:
    """The averaged test split of ``subjects`` as the evaluation suite reads it for the runner's method."""
    sel = DataSelection(subjects=subjects, categories=categories, images=True,
                        keep_test_repeats="betas_repeats" in runner.spec.columns)
    rows = read_split(cfg.store, "test", sel, cfg.s3)
    if not rows:
        raise StoreError(f"{cfg.store}: no test rows for subjects {subjects}")
    order = np.lexsort((rows["image_id"], rows["subject"]))  # one order for every model
    return {k: v[order] for k, v in rows.items()}


def retrieval_scores(ckpt: str, cfg: ClaimsConfig, subject: int) -> np.ndarray:
    """Per test image, retrieval against every other test image of the subject: the share of them its brain
    embedding ranks below its own image, and its image ranks below its own brain embedding, averaged (chance 0.5;
    1 = top-1 in both directions). Finer than top-1 (0 or 1 per image), so 30 test images make an interval."""
    runner = _runner(ckpt, cfg)
    pred = runner.predict(runner.batch(_test_rows(cfg, runner, [subject])))
    brain, image = F.normalize(pred["brain"].float(), dim=-1), F.normalize(pred["image"].float(), dim=-1)
    sim = (brain @ image.T).double()
    own = sim.diagonal()
    n = len(sim)
    b2i = (sim < own[:, None]).sum(1) / (n - 1)
    i2b = (sim < own[None, :]).sum(0) / (n - 1)
    return ((b2i + i2b) / 2).numpy()


def probe_correct(ckpt: str, cfg: ClaimsConfig, subjects: list[int]) -> np.ndarray:
    """Per test row (subject, image): whether a linear probe (standardised logistic regression, 5-fold
    cross-validated) reads the row's subject from the model's shared embedding."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    runner = _runner(ckpt, cfg)
    rows = _test_rows(cfg, runner, subjects)
    emb = runner.predict(runner.batch(rows))["embedding"].float().numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    folds = StratifiedKFold(5, shuffle=True, random_state=cfg.seed)
    return (cross_val_predict(probe, emb, rows["subject"], cv=folds) == rows["subject"]).astype(np.float64)


def category_scores(ckpt: str, cfg: ClaimsConfig, subject: int) -> tuple[np.ndarray, np.ndarray]:
    """(per test image logits, 80-way labels) of ``subject``."""
    runner = _runner(ckpt, cfg)
    rows = _test_rows(cfg, runner, [subject], categories=True)
    return runner.predict(runner.batch(rows))["logits"].float().numpy(), rows["categories"]


def gain_rows(ckpt: str, cfg: ClaimsConfig, shift: int) -> dict[str, np.ndarray]:
    """Per test image (repetitions averaged): the denoising losses with its own window's condition and with a
    shuffled one, the window shifted by ``shift`` TRs."""
    runner = _runner(ckpt, cfg)
    window = runner.loaded.method_config.window
    sel = DataSelection(subjects=runner.loaded.config["info"]["subjects"], categories=False, images=True)
    rows = read_windows(cfg.store, "test", window, sel, cfg.s3, shift=shift)
    order = np.lexsort((rows["image_id"], rows["subject"]))
    torch.manual_seed(cfg.seed)  # the test losses' noise and timesteps: the same draws at every shift
    values = runner.test_values(runner.batch({k: v[order] for k, v in rows.items()}))
    return {k: v.double().numpy() for k, v in values.items()}


# -- the claims ----------------------------------------------------------------------------


PRETRAINED = "<pretrained>"  # an arm's init_from: the MindEye2 model pretrained without subject 8


@dataclass(frozen=True)
class Arm:
    """One training run of a claim: arm ``name`` (``a`` or ``b``), seed ``repeat``, its config changes."""

    claim: str
    name: str
    extra: dict
    repeat: int

    @property
    def needs_pretrained(self) -> bool:
        return self.extra.get("init_from") == PRETRAINED


def _train_arm(d: dict, stage: str, parent: str) -> tuple[str, str]:
    """One arm's training run, as a Ray task (runs side by side, as a sweep's trials) -> (checkpoint, run id)."""
    result = run_training(TrainConfig.model_validate(d), stage=stage, parent_run_id=parent)
    return result.artifacts["checkpoint"], result.mlflow_run_id


class Claims:
    """Runs the configured claims under one MLflow run (``run``), each arm a child run: every claim's arms first
    (``concurrency`` runs side by side, the pretrained model before the arms that adapt it), then the scores."""

    def __init__(self, cfg: ClaimsConfig, parent_run_id: str):
        self.cfg, self.parent = cfg, parent_run_id
        self.recipes = RECIPES[cfg.preset]
        self._pretrained = cfg.pretrained
        self.trained: dict[tuple[str, str, int], tuple[str, str]] = {}  # (claim, arm, repeat) -> (ckpt, run id)

    def arms(self, claim: str) -> list[Arm]:
        """The claim's training runs: each arm ``repeats`` times."""
        if claim == "mindeye2":
            extras = ({"init_from": PRETRAINED}, {})
        elif claim == "duala":
            extras = ({"init_from": PRETRAINED}, {"init_from": PRETRAINED, "model": {"ssp": False, "sdp": False}})
        elif claim == "mindlink":
            # arm A: the subject adversary off (L_subj's weight 0); B: the method as published
            lambdas = list(get_method("mindlink").config(self.cfg.preset).lambdas)
            extras = ({"model": {"lambdas": [lambdas[0], 0.0, *lambdas[2:]]}}, {})
        elif claim == "clip_mused":
            extras = ({}, {"data": {"subjects": [1]}})
        else:  # dynadiff: one model read out at three windows
            extras = ({},)
        return [Arm(claim, name, extra, r) for name, extra in zip("ab", extras) for r in range(self.cfg.repeats)]

    def train_config(self, arm: Arm) -> TrainConfig:
        """One arm's run (``arm.repeat``: its seed). A finished run of the same name and config is not trained again
        (the run-name claim resumes it after its last epoch)."""
        cfg = self.cfg
        d = {"store": cfg.store, "workdir": cfg.workdir, "tracking_uri": cfg.tracking_uri, "s3": cfg.s3.model_dump(),
             "experiment": cfg.experiment, "ray_address": cfg.ray_address, "preset": cfg.preset,
             "run_name": f"{cfg.run_name or 'claims'}-{arm.claim}-{arm.name}-r{arm.repeat}",
             "data": {"read_cpus": 0.25},
             "scaling": {"num_workers": cfg.num_workers, "cpus_per_worker": 0.25},
             "deepspeed": {"zero_stage": 0}, "checkpoint": {"every_epochs": 1000, "num_to_keep": 1},
             "eval": {"every_epochs": 1000}}
        extra = dict(arm.extra)
        if arm.needs_pretrained:
            extra["init_from"] = self._pretrained
        for part in (_COMMON[cfg.preset], self.recipes[arm.claim], extra):
            _merge(d, part)
        d["optim"]["seed"] = cfg.seed + arm.repeat
        return TrainConfig.model_validate(d)

    def train_all(self, claims: list[str]) -> None:
        """Every arm of ``claims`` (and the pretrained model when one needs it and none is given), ``concurrency``
        at a time as Ray tasks: their start-ups (processes, imports, datasets) overlap, which is most of a small
        run's time. A failed run stops the others and fails the claims."""
        import ray

        arms = [arm for claim in claims for arm in self.arms(claim)]
        if self._pretrained is None and any(a.needs_pretrained for a in arms):
            arms.insert(0, Arm("pretrain", "mindeye2", {}, 0))
        arms.sort(key=lambda a: a.needs_pretrained)  # stable: the pretraining first, its adaptations last
        for arm in arms:  # every config checked before any run starts
            if not arm.needs_pretrained:
                self.train_config(arm)
        task = ray.remote(num_cpus=0, max_retries=0)(_train_arm)
        running: dict = {}  # ref -> (arm, start time)
        print(f"[claims] {len(arms)} training runs, {self.cfg.concurrency} at a time")
        try:
            while arms or running:
                while arms and len(running) < self.cfg.concurrency and (
                        not arms[0].needs_pretrained or self._pretrained is not None):
                    arm = arms.pop(0)
                    cfg = self.train_config(arm)
                    ref = task.remote(cfg.model_dump(mode="json"), f"claims-{arm.claim}", self.parent)
                    running[ref] = (arm, time.time())
                ready, _ = ray.wait(list(running), num_returns=1)
                arm, start = running.pop(ready[0])
                ckpt, run_id = ray.get(ready[0])
                self.trained[(arm.claim, arm.name, arm.repeat)] = (ckpt, run_id)
                if arm.claim == "pretrain":
                    self._pretrained = ckpt
                done = len(self.trained)
                print(f"[claims] trained {arm.claim} arm {arm.name} (seed +{arm.repeat}) in "
                      f"{time.time() - start:.0f} s [{done} done, {len(running)} running, {len(arms)} waiting]")
        except BaseException:
            for ref in running:
                ray.cancel(ref, force=True, recursive=True)
            raise

    def checkpoints(self, claim: str, arm: str) -> tuple[list[str], list[str]]:
        """Arm ``arm``'s checkpoints and run ids, one per repeat."""
        runs = [self.trained[(claim, arm, r)] for r in range(self.cfg.repeats)]
        return [c for c, _ in runs], [r for _, r in runs]

    def compare(self, claim: str, score: Callable[[str], np.ndarray],
                value: Callable[[np.ndarray, np.ndarray], float] | None = None) -> ClaimResult:
        """Score every test item with each of the two arms' checkpoints (averaged over repeats); the effect is
        ``value(A, idx) - value(B, idx)`` (default: the mean score), its interval a paired bootstrap of the items."""
        text, cfg = CLAIM_TEXT[claim], self.cfg
        scores, runs = [], []
        for name in ("a", "b"):
            ckpts, run_ids = self.checkpoints(claim, name)
            scores.append(np.mean([score(ckpt) for ckpt in ckpts], 0))
            runs += run_ids
        a, b = scores
        value = value or (lambda x, idx: float(x[idx].mean()))
        n = len(a)
        everything = np.arange(n)
        low, high = paired_bootstrap(lambda idx: value(a, idx) - value(b, idx), n, cfg.bootstrap, cfg.seed)
        va, vb = value(a, everything), value(b, everything)
        return ClaimResult(text.key, text.paper, text.statement, text.score, va, vb, va - vb, low, high,
                           text.threshold, verdict(low, high, text.threshold), n, runs)

    # each claim's scores, from its trained arms

    def mindeye2(self) -> ClaimResult:
        return self.compare("mindeye2", lambda ckpt: retrieval_scores(ckpt, self.cfg, TARGET))

    def duala(self) -> ClaimResult:
        return self.compare("duala", lambda ckpt: retrieval_scores(ckpt, self.cfg, TARGET))

    def mindlink(self) -> ClaimResult:
        # effect: how much better the probe reads the subject without the adversary than with it
        subjects = self.recipes["mindlink"]["data"]["subjects"]
        return self.compare("mindlink", lambda ckpt: probe_correct(ckpt, self.cfg, subjects))

    def clip_mused(self) -> ClaimResult:
        subject = 1
        labels: dict[str, np.ndarray] = {}

        def score(ckpt: str) -> np.ndarray:
            logits, labels["y"] = category_scores(ckpt, self.cfg, subject)
            return logits

        def mean_ap(logits: np.ndarray, idx: np.ndarray) -> float:
            return semantic_metrics(logits[idx], labels["y"][idx])["map"]

        return self.compare("clip_mused", score, mean_ap)

    def dynadiff(self) -> ClaimResult:
        cfg, text = self.cfg, CLAIM_TEXT["dynadiff"]
        ckpts, runs = self.checkpoints("dynadiff", "a")
        per_shift = {s: [gain_rows(ckpt, cfg, s) for ckpt in ckpts] for s in (-SHIFT, 0, SHIFT)}
        rows = {s: {k: np.mean([v[k] for v in vals], 0) for k in vals[0]} for s, vals in per_shift.items()}

        def gain(s: int, idx: np.ndarray) -> float:
            v = rows[s]
            return float((v["shuffled_loss"][idx] - v["diffusion_loss"][idx]).mean() / v["shuffled_loss"][idx].mean())

        def effect(idx: np.ndarray) -> float:
            return gain(0, idx) - max(gain(-SHIFT, idx), gain(SHIFT, idx))

        n = len(rows[0]["diffusion_loss"])
        everything = np.arange(n)
        low, high = paired_bootstrap(effect, n, cfg.bootstrap, cfg.seed)
        off = max(gain(-SHIFT, everything), gain(SHIFT, everything))
        return ClaimResult(text.key, text.paper, text.statement, text.score, gain(0, everything), off,
                           effect(everything), low, high, text.threshold, verdict(low, high, text.threshold), n, runs)


def _merge(base: dict, extra: dict) -> None:
    for key, value in copy.deepcopy(extra).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


RECIPES: dict[str, dict[str, dict]] = {"tiny": _TINY, "demo": _recipes(_DEMO)}


def _ensure_store(cfg: ClaimsConfig) -> None:
    root = resolve(cfg.store, cfg.s3)
    if root.join("manifest.json").exists():
        store = open_store(cfg.store, cfg.s3)
        print(f"[claims] store {store.uri}: {len(store.manifest.subject_ids)} subjects")
        return
    print(f"[claims] ingesting a synthetic NSD (preset {cfg.preset}) into {cfg.store}")
    run_ingest(synthetic_plan(cfg.preset, cfg.seed), cfg.store, cfg.s3)


def run_claims(cfg: ClaimsConfig) -> StageResult:
    import mlflow

    t0 = time.time()
    tracking.configure(cfg)
    _ensure_store(cfg)
    init_ray(cfg.ray_address)
    results: list[ClaimResult] = []
    # the claims run is the arms' parent; it is not active while they train (their runs are the active ones)
    with tracking.stage_run(cfg, "claims", run_name=cfg.run_name) as run:
        parent = run.info.run_id
    claims = Claims(cfg, parent)
    try:
        claims.train_all(cfg.claims)
        for key in cfg.claims:
            print(f"\n[claims] {CLAIM_TEXT[key].paper}: {CLAIM_TEXT[key].statement}")
            res = getattr(claims, key)()
            results.append(res)
            print(f"[claims] {key}: effect {res.effect:+.3f} [{res.low:+.3f}, {res.high:+.3f}] -> {res.verdict}")
    except BaseException:
        mlflow.MlflowClient().set_terminated(parent, "FAILED")
        raise
    with tracking.stage_run(cfg, "claims", resume_run_id=parent) as run:
        for res in results:
            key = res.claim
            mlflow.log_metrics({f"claims.{key}.effect": res.effect, f"claims.{key}.low": res.low,
                                f"claims.{key}.high": res.high, f"claims.{key}.a": res.a, f"claims.{key}.b": res.b,
                                f"claims.{key}.verdict": {"pass": 1, "inconclusive": 0, "fail": -1}[res.verdict]})
        out_dir = os.path.join(cfg.workdir, "claims", run.info.run_id)
        os.makedirs(out_dir, exist_ok=True)
        md = claims_markdown(results, cfg)
        with open(os.path.join(out_dir, "claims.md"), "w") as f:
            f.write(md)
        with open(os.path.join(out_dir, "claims.json"), "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
        mlflow.log_artifacts(out_dir, "claims")
        run_id = run.info.run_id
    print("\n" + table(["paper", "claim", "A", "B", "effect A-B", "95% interval", "verdict"],
                       [[r.paper, r.statement, f"{r.a:.3f}", f"{r.b:.3f}", f"{r.effect:+.3f}",
                         f"[{r.low:+.3f}, {r.high:+.3f}]", r.verdict] for r in results]))
    status = "failed" if any(r.verdict == "fail" for r in results) else "ok"
    return StageResult(stage="claims", status=status, mlflow_run_id=run_id,
                       metrics={**{f"{r.claim}.effect": r.effect for r in results},
                                **{f"{r.claim}.low": r.low for r in results},
                                **{f"{r.claim}.high": r.high for r in results},
                                "seconds": round(time.time() - t0, 1)},
                       artifacts={"table": os.path.join(out_dir, "claims.md"),
                                  **{f"{r.claim}.verdict": r.verdict for r in results}})


def claims_markdown(results: list[ClaimResult], cfg: ClaimsConfig) -> str:
    lines = [f"Claims on a synthetic store (preset {cfg.preset}, {cfg.repeats} run(s) per arm, {cfg.bootstrap} "
             "paired bootstrap resamples of the test images)", "",
             "| paper | claim | score | A | B | effect A-B | 95% interval | threshold | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.paper} | {r.statement} | {r.score} (n={r.n}) | {r.a:.3f} | {r.b:.3f} | {r.effect:+.3f} | "
                     f"[{r.low:+.3f}, {r.high:+.3f}] | > {r.threshold:g} | {r.verdict} |")
    return "\n".join(lines) + "\n"
