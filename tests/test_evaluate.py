"""``raydecode evaluate`` / ``compare`` end to end on the tiny pretrained MindEye2: Ray Data batch inference with
an actor pool, both protocols, the unCLIP decoder's reconstructions, the metric networks, MLflow runs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from raydecode.app.cli import main
from raydecode.evaluate import feature_metrics

# the six metrics of Table 1 on small inputs (random weights: the numbers only test the protocol)
SMALL_NETS = [n.model_dump(exclude_defaults=True) for n in feature_metrics.SMALL_NETS]


def _args(cfg, store, path):
    return ["--set", f"workdir={cfg.workdir}", "--set", f"store={store}", "--config", str(path)]


def _config(tmp_path, **over) -> str:
    import yaml

    base = {"decoder": {"preset": "tiny", "blend": 0.5}, "metric_nets": SMALL_NETS, "cpus_per_actor": 0.5,
            "reconstruct": {"steps": 2, "max_images": 6, "grid_images": 6},
            "data": {"read_cpus": 0.25}, **over}
    path = tmp_path / f"evaluate-{len(os.listdir(tmp_path))}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture(scope="module")
def evaluated(pretrained, tiny_store, tmp_path_factory):
    cfg, result = pretrained
    tmp = tmp_path_factory.mktemp("evaluate")
    summary = tmp / "summary.json"
    code = main(["evaluate", "--model", result.artifacts["checkpoint"], "--summary", str(summary),
                 *_args(cfg, tiny_store, _config(tmp))])
    assert code == 0
    return cfg, result, json.loads(summary.read_text()), tmp


def test_evaluate_retrieval_matches_an_in_process_computation_and_beats_chance(evaluated, tiny_store):
    import torch

    from raydecode.checkpoint import load_consolidated
    from raydecode.config import DataSelection
    from raydecode.data.batches import collate
    from raydecode.data.pipeline import read_split
    from raydecode.evaluate.retrieval import retrieval_top1
    from raydecode.nn.targets import BatchPreparer

    cfg, result, out, _ = evaluated
    m = out["metrics"]
    assert m["rows"] == 6 * 30 and m["single.rows"] == 6 * 30  # one row per (subject, test image) in both
    assert m["retrieval.chance"] == pytest.approx(1 / 30)
    for p in ("", "single."):
        assert m[f"retrieval.{p}brain_to_image_top1"] > 5 / 30 and m[f"retrieval.{p}image_to_brain_top1"] > 5 / 30
    # averaging three repetitions gives better brain embeddings than one presentation
    assert m["retrieval.brain_to_image_top1"] + m["retrieval.image_to_brain_top1"] > \
        m["retrieval.single.brain_to_image_top1"] + m["retrieval.single.image_to_brain_top1"]

    c = load_consolidated(result.artifacts["checkpoint"])
    # MindEye2's protocol: its outputs averaged over each image's three repetitions (betas_repeats)
    assert "betas_repeats" in c.spec.columns
    test = read_split(tiny_store, "test", DataSelection(subjects=c.info.subjects, images=True, categories=False,
                                                        keep_test_repeats=True))
    prep = BatchPreparer(c.config["targets"], torch.device("cpu"), torch.float32, tiny_store, None)
    with torch.no_grad():
        pred = c.spec.predict(c.model, prep(collate(test)))
    ref = retrieval_top1(pred["brain"], pred["image"], test["subject"])
    assert m["retrieval.brain_to_image_top1"] == pytest.approx(ref["brain_to_image_top1"], abs=1 / 180 + 1e-6)
    assert m["retrieval.image_to_brain_top1"] == pytest.approx(ref["image_to_brain_top1"], abs=1 / 180 + 1e-6)


def test_evaluate_reconstructs_and_scores_with_the_papers_metrics(evaluated):
    cfg, result, out, _ = evaluated
    m = out["metrics"]
    for p in ("", "single."):
        assert m[f"recon.{p}images"] == 6
        assert -1 <= m[f"recon.{p}pixcorr"] <= 1 and 0 <= m[f"recon.{p}ssim"] <= 1
        for k in ("alexnet2", "alexnet5", "inception", "clip"):
            assert 0 <= m[f"recon.{p}{k}"] <= 100
        for k in ("effnet", "swav"):
            assert 0 < m[f"recon.{p}{k}"] <= 2
    files = out["artifacts"]
    recon = np.load(files["reconstructions_averaged.npz"])
    assert recon["reconstruction"].shape[0] == 6 and recon["reconstruction"].dtype == np.uint8
    assert (recon["subject"] == 1).all() and list(recon["image_id"]) == sorted(recon["image_id"])
    single = np.load(files["reconstructions_single.npz"])["reconstruction"]
    assert not np.array_equal(single, recon["reconstruction"])  # another brain input, other images


def test_the_evaluation_run_holds_the_table_and_plots_and_links_the_model(evaluated):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    cfg, result, out, _ = evaluated
    client = MlflowClient(cfg.resolved_tracking_uri())
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.tags["raydecode.evaluates"] == result.artifacts["checkpoint"]
    assert run.data.tags["raydecode.model_run_id"] == result.mlflow_run_id
    assert client.get_run(result.mlflow_run_id).data.tags["raydecode.last_evaluation_run_id"] == out["mlflow_run_id"]
    assert run.data.metrics["retrieval.brain_to_image_top1"] == out["metrics"]["retrieval.brain_to_image_top1"]
    logged = {os.path.basename(f.path) for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"metrics.json", "metrics.md", "retrieval.png", "reconstructions_averaged.png", "tsne.png"} <= logged
    for name in ("retrieval.png", "reconstructions_averaged.png", "tsne.png"):
        assert Image.open(out["artifacts"][name]).size[0] > 100
    md = open(out["artifacts"]["metrics.md"]).read()
    assert "recon.alexnet2" in md and "| averaged" in md.replace("|  averaged", "| averaged")
    # which of its numbers came from random networks is on the run (all of them here: CPU test weights)
    assert run.data.tags["raydecode.random_metric_nets"].split(",") == [n["metric"] for n in SMALL_NETS]
    assert "recon.clip12" in run.data.metrics  # Dynadiff's CLIP-12: a transformer block's output


def test_a_paper_model_is_not_scored_by_random_metric_networks(evaluated, tiny_store, tmp_path, capsys):
    """A paper-preset model's numbers are compared with the papers': networks without weights are refused,
    naming them, before anything runs (allow_random_weights lets a smoke test through)."""
    import shutil

    from raydecode.config import EvaluateConfig
    from raydecode.evaluate.feature_metrics import DYNADIFF_NETS, paper_protocol

    cfg, result, _, tmp = evaluated
    paper = shutil.copytree(result.artifacts["checkpoint"], tmp_path / "paper" / "final")
    config = json.loads((paper / "config.json").read_text())
    (paper / "config.json").write_text(json.dumps({**config, "preset": "paper"}))
    capsys.readouterr()
    assert main(["evaluate", "--model", str(paper), *_args(cfg, tiny_store, _config(tmp))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: metric_nets: alexnet2, alexnet5, inception, clip, clip12") and "\n" not in err
    assert "allow_random_weights" in err
    # the papers' own protocols: MindEye2's sizes per network at 425 px PixCorr/SSIM, Dynadiff's 224 and CLIP-12
    assert paper_protocol("mindeye2").pixel_size == 425 and paper_protocol("dynadiff").pixel_size == 224
    assert {n.size for n in DYNADIFF_NETS} == {224} and "clip12" in {n.metric for n in DYNADIFF_NETS}
    assert EvaluateConfig().reconstruct.size is None  # the method's paper decides


def test_compare_reads_two_evaluated_models_one_from_the_registry(evaluated, tiny_store, capsys):
    from mlflow.tracking import MlflowClient

    from raydecode import tracking
    from raydecode.data.store import open_store

    cfg, result, first, tmp = evaluated
    tracking.configure(cfg)
    store = open_store(tiny_store)
    decision = tracking.register_run(result.mlflow_run_id, result.artifacts["checkpoint"],
                                     "retrieval.image_to_brain_top1", "retrieval.brain_to_image_top1",
                                     store.test_set_digest([1, 2, 3, 4, 5, 6]), store.manifest_sha256(),
                                     name="eval-mindeye2")
    ref = "models:/eval-mindeye2@champion"
    assert main(["evaluate", "--model", ref, *_args(cfg, tiny_store, _config(
        tmp, protocols=["averaged"], reconstruct={"enabled": False}, tsne=False))]) == 0
    tag = MlflowClient().get_model_version("eval-mindeye2", decision.version).tags["raydecode.last_evaluation_run_id"]
    capsys.readouterr()
    # under the evaluation's own config (jobs/README.md: `compare --config jobs/evaluate.yaml REF ...`)
    assert main(["compare", result.artifacts["checkpoint"], ref, *_args(cfg, tiny_store, _config(tmp))]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    header = lines[0]
    assert "retrieval.brain_to_image_top1" in header and "recon.pixcorr" in header
    rows = {ln.split("|")[1].strip(): ln for ln in lines[2:]}
    assert set(rows) == {result.artifacts["checkpoint"], f"{result.artifacts['checkpoint']} (single trial)", ref}
    # the same weights, the same retrieval; the registry evaluation did not reconstruct
    cells = {k: [c.strip() for c in v.split("|")[2:-1]] for k, v in rows.items()}
    assert cells[ref][:2] == cells[result.artifacts["checkpoint"]][:2]
    assert cells[ref][2] == "–" and tag


def test_evaluate_and_compare_errors_are_one_line(evaluated, tiny_store, capsys):
    cfg, result, _, tmp = evaluated
    capsys.readouterr()
    assert main(["evaluate", "--model", "models:/nope@champion", *_args(cfg, tiny_store, _config(tmp))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model 'models:/nope@champion'") and "\n" not in err
    assert main(["evaluate", "--model", str(tmp / "missing"), *_args(cfg, tiny_store, _config(tmp))]) != 0
    assert "missing" in capsys.readouterr().err
    assert main(["compare", "runs:/" + result.mlflow_run_id + "/model", "--set", f"workdir={cfg.workdir}"]) == 2
    assert "no evaluation run" in capsys.readouterr().err
    # an evaluation config is fine for compare; a key neither knows is not
    assert main(["compare", "runs:/x/model", *_args(cfg, tiny_store, _config(tmp, protocolz=["averaged"]))]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'protocolz'" in err and "protocols" not in err.replace("protocolz", "")
