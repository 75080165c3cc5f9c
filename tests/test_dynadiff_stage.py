"""The `dynadiff` stage end to end on the tiny store: Ray Train + DeepSpeed on time-series windows, reconstructions,
time-resolved decoding, a specialized model, MLflow artifacts, the registry and the pyfunc model."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from raydecode.config import DiffusionDecodeConfig, WindowConfig

SHIFTS = [-1, 0, 1]


def _config(store: str, workdir, **over) -> DiffusionDecodeConfig:
    base = {
        "store": store, "workdir": str(workdir), "run_name": "dd-tiny", "method": "dynadiff", "preset": "tiny",
        "model": {"eval_timesteps": 4},
        "data": {"subjects": [1], "categories": False, "read_cpus": 0.25},
        "optim": {"epochs": 3, "batch_size": 8, "lr": 3e-3},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.25}, "deepspeed": {"zero_stage": 2},
        "reconstruct": {"steps": 4, "max_images": 8, "grid_images": 6},
        "time_resolved": {"shifts": SHIFTS, "specialized": [1]},
    }
    base.update(over)
    return DiffusionDecodeConfig.model_validate(base)


@pytest.fixture(scope="module")
def stage(tiny_store, ray_local, tmp_path_factory):
    from raydecode.diffusion_decode import run_dynadiff

    cfg = _config(tiny_store, tmp_path_factory.mktemp("dynadiff"))
    return cfg, run_dynadiff(cfg)


def _client(cfg) -> MlflowClient:
    return MlflowClient(cfg.resolved_tracking_uri())


def test_training_logs_losses_and_the_brain_condition_helps(stage):
    cfg, result = stage
    client = _client(cfg)
    loss = [m.value for m in client.get_metric_history(result.mlflow_run_id, "train.loss")]
    assert len(loss) == cfg.optim.epochs and loss[-1] < loss[0]
    m = result.metrics
    # the brain condition lowers the test denoising error below the learned null's
    assert m["final.test.diffusion_loss"] < m["final.test.null_loss"]
    assert 0 < m["final.test.condition_gain"] < 1
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["method"] == "dynadiff" and run.info.status == "FINISHED"


def test_mlflow_holds_the_grid_the_lora_weights_and_the_time_curve(stage, tmp_path):
    cfg, result = stage
    client = _client(cfg)
    names = {a.path for a in client.list_artifacts(result.mlflow_run_id, "evaluation")}
    assert {"evaluation/reconstructions_averaged.png", "evaluation/time_resolved.png",
            "evaluation/time_resolved.json", "evaluation/reconstructions_averaged.npz",
            "evaluation/time_resolved_specialized.png"} <= names
    local = client.download_artifacts(result.mlflow_run_id, "evaluation", str(tmp_path))
    recon = np.load(f"{local}/reconstructions_averaged.npz")
    assert recon["reconstruction"].shape == (8, 32, 32, 3) and recon["reconstruction"].dtype == np.uint8
    from PIL import Image

    assert Image.open(f"{local}/reconstructions_averaged.png").size[0] > 200
    # the registered package carries the method's export: the LoRA in the diffusers format and the brain module
    import mlflow
    from safetensors.torch import load_file

    mlflow.set_tracking_uri(cfg.resolved_tracking_uri())
    package = mlflow.artifacts.download_artifacts(artifact_uri=result.artifacts["model"], dst_path=str(tmp_path / "m"))
    [lora_file] = glob.glob(f"{package}/**/lora/pytorch_lora_weights.safetensors", recursive=True)
    lora = load_file(lora_file)
    assert lora and all("lora_A" in k or "lora_B" in k for k in lora) and all("attn2" in k for k in lora)
    [brain_file] = glob.glob(f"{package}/**/brain_module.safetensors", recursive=True)
    brain = load_file(brain_file)
    assert "brain.subject_layers.1.weight" in brain and "null.embedding" in brain


def test_time_resolved_curve_has_one_value_per_shift(stage, tmp_path):
    cfg, result = stage
    client = _client(cfg)
    curve = json.loads(open(client.download_artifacts(result.mlflow_run_id, "evaluation/time_resolved.json",
                                                      str(tmp_path))).read())
    assert [p["shift"] for p in curve] == SHIFTS
    w = WindowConfig()
    for p in curve:
        assert p["window_end_s"] == pytest.approx(w.start_s + p["shift"] * 1.3 + 6 * 1.3, abs=1e-4)
        assert np.isfinite(p["test.diffusion_loss"]) and np.isfinite(p["test.image_gain"])
    # shifted windows are other data: the test loss differs from the trained window's
    losses = {p["shift"]: p["test.diffusion_loss"] for p in curve}
    assert losses[-1] != losses[0] and losses[1] != losses[0]
    history = client.get_metric_history(result.mlflow_run_id, "time_resolved.test.image_gain")
    assert len(history) == len(SHIFTS)
    # the suite's protocol names: shift+1 -> test.shift1.*, shift-1 -> test.shift-1.*
    assert result.metrics["final.test.shift1.diffusion_loss"] == pytest.approx(losses[1])
    assert result.metrics["final.test.shift-1.diffusion_loss"] == pytest.approx(losses[-1])


def test_the_specialized_model_is_a_sweep_trial_trained_and_scored_on_its_shifted_window(stage, tmp_path):
    cfg, result = stage
    client = _client(cfg)
    exp = client.get_run(result.mlflow_run_id).info.experiment_id
    [sweep] = client.search_runs([exp], f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'")
    assert sweep.info.run_name == "dd-tiny-specialized" and sweep.data.tags["raydecode.stage"] == "sweep"
    [trial] = client.search_runs([exp], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    from raydecode.checkpoint import CONFIG_FILE, read_json

    saved = read_json(trial.data.tags["raydecode.checkpoint_uri"], CONFIG_FILE)
    assert saved["model"]["window"]["start_s"] == pytest.approx(3.0 + 1.3) and saved["info"]["subjects"] == [1]
    points = json.loads(open(client.download_artifacts(
        result.mlflow_run_id, "evaluation/time_resolved_specialized.json", str(tmp_path))).read())
    assert [p["shift"] for p in points] == [1] and np.isfinite(points[0]["test.image_gain"])
    assert not [v for v in client.search_model_versions("name = 'raydecode-dynadiff-subj01'")
                if v.run_id == trial.info.run_id]  # specialized models are not registered


def test_the_specialized_sweep_moves_the_window_per_shift(tiny_store, tmp_path):
    from raydecode.diffusion_decode import specialized_sweep

    cfg = _config(tiny_store, tmp_path, model={"window": {"duration_s": 6.5}},
                  time_resolved={"shifts": SHIFTS, "specialized": [-2, 3]})
    sweep = specialized_sweep(cfg, 1.3, [1, 2])
    assert sweep.run_name == "dd-tiny-specialized" and sweep.subjects == [1, 2] and not sweep.promote
    assert sweep.space["model.window.start_s"].grid == [pytest.approx(3.0 - 2.6), pytest.approx(3.0 + 3.9)]
    assert sweep.model["window"] == {"duration_s": 6.5} and sweep.metric == "test.image_gain"
    assert sweep.optim == cfg.optim and sweep.data == cfg.data


def test_checkpoints_leave_out_the_frozen_unet_and_the_base_weights_are_unchanged(stage):
    cfg, result = stage
    from raydecode.checkpoint import CONFIG_FILE, MODEL_FILE, load_consolidated, load_state, read_json
    from raydecode.errors import StoreError
    from raydecode.storage import resolve

    ckpt = result.artifacts["checkpoint"]
    state = load_state(ckpt)
    assert not [k for k in state if k.startswith("vae.") or (k.startswith("unet.") and "lora_" not in k)]
    # the frozen weights at the end of training == those a fresh build makes (a loader checks the digest)
    assert load_consolidated(ckpt).model.latent_shape == (4, 8, 8)
    loc = resolve(ckpt).join(CONFIG_FILE)
    original = loc.read_bytes()
    config = read_json(ckpt, CONFIG_FILE)
    config["frozen_sha256"] = "0" * 64  # as if the UNet at model.unet had changed since training
    loc.write_bytes_atomic(json.dumps(config).encode())
    try:
        with pytest.raises(StoreError, match="frozen weights"):
            load_consolidated(ckpt)
    finally:
        loc.write_bytes_atomic(original)
    assert resolve(ckpt).join(MODEL_FILE).exists()


def test_registered_model_reconstructs_the_same_images_without_ray(stage):
    cfg, result = stage
    assert result.artifacts["alias"] == "champion" and result.artifacts["model"].startswith(
        "models:/raydecode-dynadiff-subj01/")
    grid = result.artifacts["evaluation.reconstructions_averaged.npz"]
    script = f"""
import json, sys, mlflow, numpy as np
mlflow.set_tracking_uri({cfg.resolved_tracking_uri()!r})
from raydecode.config import DataSelection
from raydecode.config import WindowConfig
from raydecode.data.windows import read_windows
from raydecode.runtime import row_seeds
saved = np.load({grid!r})
model = mlflow.pyfunc.load_model("models:/raydecode-dynadiff-subj01@champion")
rows = read_windows({cfg.store!r}, "test", WindowConfig(), DataSelection(subjects=[1], categories=False))
order = np.lexsort((rows["image_id"], rows["subject"]))[:8]
seeds = row_seeds(0, rows["subject"][order], rows["image_id"][order])
out = model.predict({{"bold": rows["bold"][order], "subject": rows["subject"][order], "seed": seeds}},
                    params={{"steps": 4}})
diff = np.abs(out["image"].astype(int) - saved["reconstruction"].astype(int))
json.dump({{"max_diff": int(diff.max()), "ids_match": bool((saved["image_id"] == rows["image_id"][order]).all()),
           "ray": "ray" in sys.modules, "deepspeed": "deepspeed" in sys.modules}}, sys.stdout)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["ids_match"] and not out["ray"] and not out["deepspeed"]
    assert out["max_diff"] <= 1  # seeded DDIM: the same images in another process, batched differently


def test_reconstruct_action_evaluates_an_existing_checkpoint(stage, capsys):
    """`raydecode dynadiff reconstruct`: the evaluation alone, in a new evaluation run of the checkpoint."""
    from raydecode.diffusion_decode import run_reconstruct_only

    cfg, result = stage
    again = cfg.model_copy(update={"checkpoint_uri": result.artifacts["checkpoint"],
                                   "reconstruct": cfg.reconstruct.model_copy(update={"max_images": 4,
                                                                                     "single_trial": False}),
                                   "time_resolved": cfg.time_resolved.model_copy(update={"shifts": [0, 1]})})
    out = run_reconstruct_only(again)
    assert out.stage == "reconstruct" and 0 <= out.metrics["recon.ssim"] <= 1 and out.metrics["recon.images"] == 4
    # the same checkpoint, windows and per-row noise: the same test loss as the stage measured
    assert out.metrics["test.diffusion_loss"] == pytest.approx(result.metrics["final.test.diffusion_loss"], rel=1e-5)
    run = _client(cfg).get_run(out.mlflow_run_id)
    assert run.data.tags["raydecode.model_ref"] == result.artifacts["checkpoint"]
    assert "time-resolved decoding" in capsys.readouterr().out


def test_bad_dynadiff_configs_fail_with_one_line(tiny_store, tmp_path, capsys):
    """Named, one-line errors before anything starts: a missing UNet directory (through the CLI), a missing
    checkpoint, an invalid window."""
    from raydecode.app.cli import main
    from raydecode.config import load_config
    from raydecode.diffusion_decode import run_reconstruct_only
    from raydecode.errors import ConfigError, StoreError

    code = main(["dynadiff", "--set", f"store={tiny_store}", "--set", f"workdir={tmp_path}", "--set", "preset=tiny",
                 "--set", f"model.unet={tmp_path}/no-such-unet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "model.unet" in err[0] and "no-such-unet" in err[0]
    with pytest.raises(StoreError, match="no-such-run"):
        run_reconstruct_only(_config(tiny_store, tmp_path, checkpoint_uri=str(tmp_path / "no-such-run")))
    cfg = load_config(DiffusionDecodeConfig, None, [f"store={tiny_store}", "preset=tiny",
                                                    "model.window.duration_s=-1"])
    from raydecode.methods.spec import get_method

    with pytest.raises(ConfigError, match="window.duration_s") as err:
        get_method("dynadiff").config(cfg.preset, cfg.model)
    assert len(str(err.value).splitlines()) == 1


def test_the_evaluation_suite_scores_the_model_as_the_stage_does(stage, tmp_path):
    """`raydecode evaluate` on the Dynadiff checkpoint (windows through the Ray Data actor pool, the method's own
    generator): the same seeded reconstructions as the stage's, so the same PixCorr, averaged and single-trial."""
    import yaml

    from raydecode.app.cli import main

    cfg, result = stage
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump({
        "store": cfg.store, "workdir": cfg.workdir, "tsne": False, "cpus_per_actor": 0.5,
        "reconstruct": {"steps": 4, "max_images": 8, "size": None, "grid_images": 4},
        "metric_nets": [dict(metric="alexnet2", arch="alexnet", layer="features.4", size=64)],
        "data": {"read_cpus": 0.25}}))
    summary = tmp_path / "summary.json"
    assert main(["evaluate", "--model", result.artifacts["checkpoint"], "--config", str(path),
                 "--summary", str(summary)]) == 0
    m = json.loads(summary.read_text())["metrics"]
    final = result.metrics
    assert m["recon.images"] == m["recon.single.images"] == 8
    for k in ("recon.pixcorr", "recon.ssim", "recon.single.pixcorr", "recon.single.ssim"):
        assert m[k] == pytest.approx(final[f"final.{k}"], abs=2e-3), k
    assert 0 <= m["recon.alexnet2"] <= 100 and "retrieval.brain_to_image_top1" not in m
    # test losses: every row's own condition vs the null (batching moves the fixed noise, not the comparison)
    assert m["test.diffusion_loss"] < m["test.null_loss"] and 0 < m["test.condition_gain"] < 1


def test_the_claims_image_gain_is_scored_per_test_image_at_each_shift(stage, tiny_store):
    """``raydecode claims``' Dynadiff score: per test image of the model's subject (repetitions averaged), the
    denoising loss with its own window's condition and with a shuffled one, at the trained window and shifted
    ones; the same noise draws at every shift (a paired comparison), so a repeated call gives the same numbers."""
    import numpy as np

    from raydecode.app.claims import gain_rows
    from raydecode.config import ClaimsConfig

    cfg, result = stage
    claims = ClaimsConfig(store=tiny_store, workdir=cfg.workdir)
    at0, again, shifted = (gain_rows(result.artifacts["checkpoint"], claims, s) for s in (0, 0, 2))
    assert set(at0) == {"diffusion_loss", "null_loss", "shuffled_loss"} and len(at0["diffusion_loss"]) == 30
    assert all(np.array_equal(at0[k], again[k]) for k in at0)
    assert not np.allclose(at0["diffusion_loss"], shifted["diffusion_loss"])  # other windows, other losses
    assert (at0["null_loss"] > 0).all() and np.isfinite(at0["shuffled_loss"]).all()
