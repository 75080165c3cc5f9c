"""Dynadiff without Ray: BOLD time-series windows (cleaning, shifts, padding, counts) and the model (brain module
+ frozen UNet / VAE with LoRA): overfitting, null-condition dropout, classifier-free guidance, DDIM determinism,
LoRA files, pretrained UNet directories, paper sizes and new-subject initialisation."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raydecode.config import DataSelection, WindowConfig
from raydecode.data.ingest import run_ingest, synthetic_plan
from raydecode.data.store import open_store
from raydecode.data.windows import clean_run, cosine_drift, count_windows, read_windows
from raydecode.errors import ConfigError
from raydecode.methods.dynadiff import build_unet, load_lora, save_lora
from raydecode.methods.spec import DatasetInfo, FreezesWeights, Progress, RowMetrics, count_parameters, get_method
from raydecode.nn.diffusion import initial_noise
from raydecode.nn.encoders import FrozenEncoder, encoder_config

TR = 1.3
N_SAMPLES = round(8 / TR)  # Dynadiff's 8 s window: 6 volumes
VOXELS = {1: 240, 2: 200}  # the store's subjects (tiny synthetic 1 and 2)
NEW_SUBJECT_VOXELS = {3: 230}  # a subject the store does not hold (model-only tests)
SINGLE = DataSelection(average_test_repeats=False, categories=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tiny synthetic store with time series for subjects 1 and 2 (read-only)."""
    out = tmp_path_factory.mktemp("dynadiff") / "store"
    run_ingest(synthetic_plan("tiny", 0, True, [1, 2]), str(out), progress=False)
    return open_store(str(out))


@pytest.fixture(scope="module")
def vae_encoder():
    return FrozenEncoder(encoder_config("vae-tiny"))


def _spec():
    return get_method("dynadiff")


def _model(subjects=(1,), seed=0, **over):
    spec = _spec()
    cfg = spec.config("tiny", over)
    torch.manual_seed(seed)
    voxels = {**VOXELS, **NEW_SUBJECT_VOXELS}
    model = spec.build_model(cfg, DatasetInfo(list(subjects), {s: voxels[s] for s in subjects}, tr_s=TR))
    return spec, cfg, model


def _random_batch(n, subject=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"bold": torch.randn(n, N_SAMPLES, VOXELS[subject], generator=g),
            "subject": torch.full((n,), subject, dtype=torch.long),
            "latent_tokens": 0.1 * torch.randn(n, 4 * 8 * 8, generator=g)}


def _key_rows(rows):
    return {(int(a), int(b), int(c), int(d)): i
            for i, (a, b, c, d) in enumerate(zip(rows["subject"], rows["session"], rows["run"], rows["trial"]))}


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


# -- windows -------------------------------------------------------------------------------


def test_clean_run_removes_slow_cosine_drift_keeps_faster_signal_and_zscores():
    """A drift slower than high_pass_hz is regressed out (cleaned series orthogonal to it), a 0.1 Hz component
    survives, and every voxel ends with mean 0 and std 1; without detrending the drift stays."""
    rng = np.random.default_rng(0)
    n_tr, n_vox = 200, 5
    t = np.arange(n_tr) * TR
    drift = np.cos(2 * np.pi * (2 / (2 * n_tr * TR)) * (t + TR / 2))  # 2nd DCT cosine: ~0.004 Hz < 0.01 Hz
    fast = np.sin(2 * np.pi * 0.1 * t)
    bold = (100 + 8 * drift[:, None] * rng.uniform(0.5, 1.5, n_vox) + fast[:, None] * rng.uniform(0.5, 1.5, n_vox)
            + 0.2 * rng.standard_normal((n_tr, n_vox)))
    assert all(abs(_corr(bold[:, v], drift)) > 0.9 for v in range(n_vox))  # the drift dominates the raw series

    clean = clean_run(bold, TR, WindowConfig())
    assert clean.dtype == np.float32 and clean.shape == bold.shape
    np.testing.assert_allclose(clean.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(clean.std(0), 1, atol=1e-4)
    for v in range(n_vox):
        assert abs(_corr(clean[:, v], drift)) < 1e-4
        assert _corr(clean[:, v], fast) > 0.9
    # the design: a constant plus the cosines below the cut-off (floor(2 * 200 * 0.01 * 1.3) = 5), nothing faster
    assert cosine_drift(n_tr, TR, 0.01).shape == (n_tr, 6)
    kept = clean_run(bold, TR, WindowConfig(detrend="none"))
    assert all(abs(_corr(kept[:, v], drift)) > 0.9 for v in range(n_vox))
    np.testing.assert_allclose(kept.std(0), 1, atol=1e-4)
    raw = clean_run(bold, TR, WindowConfig(zscore=False))
    assert abs(raw.std(0) - 1).max() > 0.1  # no z-scoring: the signal keeps its own scale


def test_windows_shape_padding_ids_and_end_time(store):
    """Train windows: (n, 6, 240) float32, subject 2's voxels beyond its 200 zero-padded, window_end_s = t + d."""
    rows = read_windows(store, "train", WindowConfig(), SINGLE)
    n = len(rows["subject"])
    assert n > 0 and rows["bold"].shape == (n, N_SAMPLES, max(VOXELS.values())) and rows["bold"].dtype == np.float32
    assert set(np.unique(rows["subject"]).tolist()) == {1, 2}
    for s, v in VOXELS.items():
        m = rows["subject"] == s
        assert (rows["n_voxels"][m] == v).all()
        assert not rows["bold"][m][:, :, v:].any()  # zero padding
        assert (rows["bold"][m][:, :, :v].std(axis=(0, 1)) > 0.3).all()  # every real voxel carries signal
    test_ids = set(store.manifest.shared_test_image_ids)
    assert not set(rows["image_id"].tolist()) & test_ids and set(rows["split"]) == {"train"}
    assert len(_key_rows(rows)) == n  # one row per trial
    for shift in (0, 1, -2):
        one = read_windows(store, "train", WindowConfig(), DataSelection(subjects=[1], categories=False), shift=shift)
        end = one["window_end_s"]
        np.testing.assert_allclose(end, 3.0 + shift * TR + N_SAMPLES * TR, rtol=1e-6)


@pytest.mark.parametrize("shift", [0, -8, 14])
def test_count_windows_matches_the_rows_read(store, shift):
    """count_windows (layout only) equals the windows read, also for shifts that push some windows out of their run."""
    w = WindowConfig()
    for split in ("train", "test"):
        rows = read_windows(store, split, w, SINGLE, shift=shift)
        assert count_windows(store, [1, 2], None, w, split, shift=shift) == len(rows["subject"])
    one = read_windows(store, "train", w, DataSelection(subjects=[1], sessions=[2], categories=False), shift=shift)
    assert count_windows(store, [1], [2], w, "train", shift=shift) == len(one["subject"])
    assert set(one["session"].tolist()) == {2}


def test_count_windows_drops_windows_that_leave_their_run(store):
    """Far shifts lose the trials whose window would start before the run or end after it."""
    w = WindowConfig()
    full = count_windows(store, [1, 2], None, w)
    assert full == sum(store.manifest.subject(s).trials["train"] for s in VOXELS)
    assert count_windows(store, [1, 2], None, w, shift=14) < full
    assert count_windows(store, [1, 2], None, w, shift=-8) < full


def test_shift_moves_windows_by_whole_volumes(store):
    """The window of a trial at shift 1 is its shift-0 window moved one volume later (same run cleaning)."""
    w = WindowConfig()
    w0 = read_windows(store, "train", w, SINGLE, shift=0)
    w1 = read_windows(store, "train", w, SINGLE, shift=1)
    k0, k1 = _key_rows(w0), _key_rows(w1)
    common = sorted(set(k0) & set(k1))
    assert len(common) == len(k1) > 100
    a = w1["bold"][[k1[k] for k in common]]
    b = w0["bold"][[k0[k] for k in common]]
    np.testing.assert_array_equal(a[:, : N_SAMPLES - 1], b[:, 1:])
    assert not np.allclose(a, b)  # the shift did move the windows
    np.testing.assert_array_equal(w1["image_id"][[k1[k] for k in common]], w0["image_id"][[k0[k] for k in common]])


def test_test_split_averages_repeats_per_subject_and_image(store):
    """Averaged test windows: one row per (subject, image), the mean of that image's single-trial windows."""
    w = WindowConfig()
    single = read_windows(store, "test", w, SINGLE)
    avg = read_windows(store, "test", w, DataSelection(categories=False))
    pairs = list(zip(avg["subject"].tolist(), avg["image_id"].tolist()))
    assert len(pairs) == len(set(pairs)) == sum(store.manifest.subject(s).images["test"] for s in VOXELS)
    assert len(single["subject"]) > len(pairs)
    assert set(avg["image_id"].tolist()) <= set(store.manifest.shared_test_image_ids)
    for i in (0, len(pairs) // 2, len(pairs) - 1):
        s, img = pairs[i]
        m = (single["subject"] == s) & (single["image_id"] == img)
        assert m.sum() >= 2
        np.testing.assert_allclose(avg["bold"][i], single["bold"][m].mean(0), atol=1e-5)


def _split_half_pairwise(rows, subject):
    """2-way identification of images from their last repetition's time-averaged window vs the mean of the others."""
    m = rows["subject"] == subject
    ids, x = rows["image_id"][m], rows["bold"][m].mean(1)
    first, last = [], []
    for i in np.unique(ids):
        r = np.flatnonzero(ids == i)
        if len(r) >= 2:
            first.append(x[r[:-1]].mean(0))
            last.append(x[r[-1]])
    a, b = np.asarray(first), np.asarray(last)
    c = np.corrcoef(a - a.mean(0), b - b.mean(0))[: len(a), len(a):]
    return float((np.diag(c)[:, None] > c).sum() / (len(a) * (len(a) - 1)))


def test_windows_carry_the_stimulus(store):
    """Windows after the onset identify the image across repetitions (chance 0.5); windows before it do not."""
    aligned = read_windows(store, "test", WindowConfig(), SINGLE)
    early = read_windows(store, "test", WindowConfig(start_s=-20.0), SINGLE)
    for s in VOXELS:
        assert _split_half_pairwise(aligned, s) > 0.75
        assert _split_half_pairwise(early, s) < 0.65


# -- the model -----------------------------------------------------------------------------


def test_model_needs_a_tr_and_sizes_its_brain_module_from_the_window(vae_encoder):
    """No TR: a clear error; otherwise 6 timestep-specific maps per subject and the VAE of the target encoder."""
    spec = _spec()
    cfg = spec.config("tiny")
    with pytest.raises(ConfigError, match="TR"):
        spec.build_model(cfg, DatasetInfo([1], {1: 240}))
    _, _, model = _model()
    assert model.n_samples == N_SAMPLES
    assert model.brain.timestep_layers["1"].weight.shape == (N_SAMPLES, cfg.channels, cfg.channels)
    assert model.latent_shape == (4, 8, 8)
    ref = vae_encoder.net.state_dict()
    own = model.vae.state_dict()
    assert set(own) == set(ref) and all(torch.equal(own[k], ref[k]) for k in ref)  # decoder matches the targets


def test_overfitting_a_few_windows_trains_brain_and_lora_only(store, vae_encoder):
    """8 real windows, 150 AdamW steps: the brain-conditioned test loss falls, the null one barely moves; UNet base
    and VAE weights stay bit-identical while every brain-module, LoRA and null weight changes."""
    rows = read_windows(store, "train", WindowConfig(),
                        DataSelection(subjects=[1], average_test_repeats=False, categories=False, images=True))
    _, first = np.unique(rows["image_id"], return_index=True)
    idx = np.sort(first)[:8]  # 8 distinct images
    images = torch.from_numpy(np.stack(rows["image"][idx]))
    assert images.dtype == torch.uint8 and images.shape == (8, 32, 32, 3)
    batch = {"bold": torch.from_numpy(rows["bold"][idx]),
             "subject": torch.from_numpy(rows["subject"][idx].astype(np.int64)),
             "image_id": torch.from_numpy(rows["image_id"][idx].astype(np.int64)),
             "latent_tokens": vae_encoder.encode(images)[0].flatten(1)}

    spec, cfg, model = _model(dropout=0.0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if n.startswith("vae.") or (n.startswith("unet.") and "lora_" not in n)}
    trained = {n: p.detach().clone() for n, p in model.named_parameters()
               if n.startswith(("brain.", "null.")) or "lora_" in n}
    assert any(n.startswith("vae.") for n in frozen) and sum("lora_" in n for n in trained) == 32
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trained)

    model.eval()
    before = {k: float(v.mean()) for k, v in spec.test_values(model, batch).items()}
    opt = torch.optim.AdamW(spec.param_groups(model, cfg, 0.0), lr=3e-3)
    model.train()
    assert not model.vae.training  # the VAE stays in eval mode
    torch.manual_seed(0)
    for step in range(150):
        loss, parts = spec.loss(model, batch, Progress(0, 1, step, 150))
        assert math.isfinite(parts["loss"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    after = {k: float(v.mean()) for k, v in spec.test_values(model, batch).items()}

    assert after["diffusion_loss"] < 0.75 * before["diffusion_loss"], (before, after)
    assert abs(after["null_loss"] - before["null_loss"]) < 0.1 * before["null_loss"], (before, after)
    assert after["diffusion_loss"] < 0.8 * after["null_loss"]  # the brain condition, not the null, was learned
    assert spec.get(RowMetrics).summarize(after)["condition_gain"] > 0.2
    params = dict(model.named_parameters())
    unchanged = [n for n, p in frozen.items() if not torch.equal(params[n], p)]
    assert not unchanged, unchanged[:5]
    assert all(params[n].grad is None for n in frozen)
    still = [n for n, p in trained.items() if torch.equal(params[n], p)]
    assert not still, still


class _RecordingUNet(torch.nn.Module):
    """Stands in for the UNet: predicts zeros and keeps the conditions it was handed."""

    def __init__(self):
        super().__init__()
        self.conditions: list[torch.Tensor] = []

    def forward(self, sample, timestep, encoder_hidden_states):
        self.conditions.append(encoder_hidden_states.detach().clone())
        return SimpleNamespace(sample=torch.zeros_like(sample))


def test_null_condition_rate_follows_null_prob():
    """The share of conditions replaced by the null is null_prob (binomial tolerance; exactly 0 and 1 at the ends),
    and null_rate reports the rows that really got the null embedding."""
    batch = _random_batch(16)
    rates = {}
    for p, n_batches in ((0.1, 300), (0.0, 20), (1.0, 20)):
        spec, _, model = _model(null_prob=p)
        with torch.no_grad():
            model.null.embedding.normal_()
        model.unet = _RecordingUNet()
        torch.manual_seed(1)
        with torch.no_grad():
            rates[p] = [spec.loss(model, batch, Progress(0, 1, i, n_batches))[1]["null_rate"] for i in range(n_batches)]
        seen = torch.stack(model.unet.conditions)  # (batches, 16, tokens, width)
        is_null = (seen == model.null.embedding).flatten(2).all(-1)
        assert torch.equal(is_null.float().mean(1), torch.tensor(rates[p]))
    # 4800 draws of Bernoulli(0.1): sd of the mean 0.0043
    assert abs(np.mean(rates[0.1]) - 0.1) < 0.03
    assert len(set(rates[0.1])) > 3  # the rate varies from batch to batch
    assert set(rates[0.0]) == {0.0} and set(rates[1.0]) == {1.0}


def test_null_path_ignores_the_bold_input():
    """With null_prob=1 the loss does not depend on the BOLD window; with null_prob=0 it does."""
    a, b = _random_batch(8, seed=0), _random_batch(8, seed=0)
    b["bold"] = torch.randn(b["bold"].shape, generator=torch.Generator().manual_seed(99))
    for p, same in ((1.0, True), (0.0, False)):
        spec, _, model = _model(null_prob=p, dropout=0.0)
        with torch.no_grad():
            model.null.embedding.normal_()
            losses = []
            for batch in (a, b):
                torch.manual_seed(3)
                losses.append(float(spec.loss(model, batch, Progress(0, 1, 0, 1))[0]))
        assert (losses[0] == losses[1]) is same, (p, losses)


def _lora_nonzero(model, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.unet.named_parameters():
            if "lora_" in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _as_latents(model, monkeypatch):
    """sample() returns the final DDIM latents instead of decoded images."""
    monkeypatch.setattr(model, "decode", lambda x: x)


def test_guidance_one_is_the_conditional_prediction(monkeypatch):
    """CFG with scale 1 equals sampling with the brain condition alone; scale 3 differs once the null differs;
    scale 0 is sampling with the null condition alone."""
    _, _, model = _model()
    model.eval()
    _lora_nonzero(model)
    with torch.no_grad():
        model.null.embedding.normal_()
    batch = _random_batch(3)
    noise = initial_noise([1, 2, 3], model.latent_shape)
    img_g1 = model.sample(batch, steps=5, guidance=1.0, noise=noise)
    img_c = model.sample(batch, steps=5, conditional_only=True, noise=noise)
    diff = (img_g1.int() - img_c.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01

    _as_latents(model, monkeypatch)
    g1 = model.sample(batch, steps=5, guidance=1.0, noise=noise)
    cond = model.sample(batch, steps=5, conditional_only=True, noise=noise)
    g3 = model.sample(batch, steps=5, guidance=3.0, noise=noise)
    g0 = model.sample(batch, steps=5, guidance=0.0, noise=noise)
    torch.testing.assert_close(g1, cond, atol=1e-5, rtol=1e-5)
    assert (g3 - g1).abs().max() > 1e-2
    monkeypatch.setattr(model, "condition", lambda b: model.null(b["bold"].shape[0]))
    null_only = model.sample(batch, steps=5, conditional_only=True, noise=noise)
    torch.testing.assert_close(g0, null_only, atol=1e-5, rtol=1e-5)
    assert (g0 - g1).abs().max() > 1e-2


def test_ddim_sampling_is_deterministic_per_seed_and_batch_independent(monkeypatch):
    """Seeded initial noise: the same images on every call and however rows are batched; other seeds, other images."""
    _, _, model = _model()
    model.eval()
    _lora_nonzero(model)
    batch = _random_batch(4)
    seeds = np.array([11, 12, 13, 14])
    noise = initial_noise(seeds, model.latent_shape)
    assert noise.shape == (4, *model.latent_shape)
    torch.testing.assert_close(initial_noise(seeds[2:], model.latent_shape), noise[2:], atol=0, rtol=0)

    a = model.sample(batch, steps=5, noise=noise)
    b = model.sample(batch, steps=5, noise=initial_noise(seeds, model.latent_shape))
    assert a.shape == (4, 32, 32, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    halves = torch.cat([model.sample({k: v[:2] for k, v in batch.items()}, steps=5, noise=noise[:2]),
                        model.sample({k: v[2:] for k, v in batch.items()}, steps=5, noise=noise[2:])])
    assert (halves.int() - a.int()).abs().max() <= 1
    other = model.sample(batch, steps=5, noise=initial_noise(seeds + 100, model.latent_shape))
    assert (other.int() - a.int()).abs().float().mean() > 1
    # rows with different seeds differ from each other too
    assert (a[0].int() - a[1].int()).abs().float().mean() > 1

    _as_latents(model, monkeypatch)
    lat = model.sample(batch, steps=5, noise=noise)
    split = torch.cat([model.sample({k: v[:2] for k, v in batch.items()}, steps=5, noise=noise[:2]),
                       model.sample({k: v[2:] for k, v in batch.items()}, steps=5, noise=noise[2:])])
    torch.testing.assert_close(split, lat, atol=1e-5, rtol=1e-5)


def test_lora_round_trip_through_the_diffusers_file(tmp_path):
    """save_lora writes diffusers' LoRA file; a fresh base UNet with it loaded predicts like the model's UNet."""
    from safetensors import safe_open

    _, cfg, model = _model()
    model.eval()
    _lora_nonzero(model)
    path = save_lora(model, str(tmp_path / "lora"))
    assert path.endswith("pytorch_lora_weights.safetensors")
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert len(keys) == 32 and all("attn2" in k for k in keys)
    assert sum("lora_A" in k for k in keys) == sum("lora_B" in k for k in keys) == 16
    assert meta["r"] == cfg.lora_rank and meta["lora_alpha"] == cfg.lora_alpha

    fresh = build_unet(cfg, model.latent_shape[1]).eval()
    loaded = load_lora(build_unet(cfg, model.latent_shape[1]), str(tmp_path / "lora")).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.latent_shape, generator=g)
    t = torch.tensor([10, 700])
    c = torch.randn(2, cfg.cond_tokens, model.brain.width, generator=g)
    with torch.no_grad():
        want = model.unet(x, t, encoder_hidden_states=c).sample
        got = loaded(x, t, encoder_hidden_states=c).sample
        base = fresh(x, t, encoder_hidden_states=c).sample
    assert torch.allclose(got, want, atol=1e-6)
    assert (base - want).abs().max() > 1e-3


def _tiny_unet(cross_attention_dim):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(5)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def test_pretrained_unet_from_a_diffusers_pipeline_directory(tmp_path):
    """model.unet naming a pipeline dir (image_unet/ + scheduler/): the saved UNet weights, its cross-attention width
    and the pipeline's scheduler; a directory without config.json is refused by name."""
    from diffusers import DDPMScheduler

    unet = _tiny_unet(24)
    unet.save_pretrained(tmp_path / "vd" / "image_unet")
    DDPMScheduler(num_train_timesteps=500, beta_schedule="linear").save_pretrained(tmp_path / "vd" / "scheduler")
    spec = _spec()
    model = spec.build_model(spec.config("tiny", {"unet": str(tmp_path / "vd")}), DatasetInfo([1], {1: 240}, tr_s=TR))
    assert model.brain.width == 24 and model.null.embedding.shape[-1] == 24
    assert model.noise_scheduler.config.num_train_timesteps == 500
    base = {k.replace(".base_layer", ""): v for k, v in model.unet.state_dict().items() if "lora_" not in k}
    saved = unet.state_dict()
    assert set(base) == set(saved)
    assert all(torch.equal(base[k], saved[k]) for k in saved)
    assert any("lora_" in n for n, p in model.unet.named_parameters() if p.requires_grad)

    # a plain UNet directory works too (no scheduler there: the config's)
    direct = spec.build_model(spec.config("tiny", {"unet": str(tmp_path / "vd" / "image_unet")}),
                              DatasetInfo([1], {1: 240}, tr_s=TR))
    assert direct.noise_scheduler.config.num_train_timesteps == 1000

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as err:
        spec.build_model(spec.config("tiny", {"unet": str(empty)}), DatasetInfo([1], {1: 240}, tr_s=TR))
    assert str(empty) in str(err.value) and "config.json" in str(err.value)


def test_paper_preset_needs_a_unet_off_meta_and_has_the_paper_brain_module_size():
    """Without weights the paper UNet is refused (nothing downloaded); on meta it builds with a ~345M brain module."""
    spec = _spec()
    cfg = spec.config("paper")
    info = DatasetInfo([1], {1: 15724}, tr_s=TR)
    with pytest.raises(ConfigError, match="model.unet"):
        build_unet(cfg, 28)
    with pytest.raises(ConfigError, match="model.unet"):
        spec.build_model(spec.config("paper", {"vae": "vae-tiny"}), info)
    with pytest.raises(ConfigError, match=r"model\.(unet|vae)"):  # the paper VAE needs weights as well
        spec.build_model(cfg, info)

    with torch.device("meta"):
        model = spec.build_model(cfg, info)
    counts = count_parameters(model)
    brain = counts["modules"]["brain"]["total"]
    assert 300e6 < brain < 420e6
    c, t = cfg.channels, N_SAMPLES
    assert brain == (15724 + 1) * c + t * (c * c + c) + 2 * c + (t + 1) + (c + 1) * 257 * 768
    assert counts["modules"]["unet"]["trainable"] > 0 and counts["modules"]["vae"]["trainable"] == 0
    assert model.unet.config.cross_attention_dim == 768


def test_new_subject_starts_from_a_multi_subject_checkpoint():
    """Shared weights and subject 2's layers come from the [1, 2] model; exactly subject 3's layers stay at init;
    checkpoints hold no frozen UNet or VAE weight."""
    spec, _, source = _model(subjects=(1, 2), seed=0)
    _lora_nonzero(source, seed=1)
    assert set(source.brain.subject_layers) == set(source.brain.timestep_layers) == {"1", "2"}
    assert source.brain.subject_layers["2"].weight.shape[1] == 200

    keys = spec.get(FreezesWeights).persisted_keys(source)
    assert not [k for k in keys if k.startswith("unet.") and "lora_" not in k]
    assert not [k for k in keys if k.startswith("vae.")]
    assert any("lora_" in k for k in keys) and "null.embedding" in keys
    state = spec.state_to_save(source.state_dict(), source)
    assert set(state) == keys

    _, _, target = _model(subjects=(2, 3), seed=1)
    init = {k: v.clone() for k, v in target.state_dict().items()}
    fresh = spec.load_pretrained(target, state)
    sub3 = {f"brain.{layer}.3.{p}" for layer in ("subject_layers", "timestep_layers") for p in ("weight", "bias")}
    assert set(fresh) == sub3
    now = target.state_dict()
    assert all(torch.equal(now[k], init[k]) for k in sub3)
    copied = [k for k in now if k in state]
    assert any(k.startswith("brain.out.") for k in copied) and any(k.startswith("brain.temporal.") for k in copied)
    assert any("lora_B" in k for k in copied) and "brain.subject_layers.2.weight" in copied
    assert "brain.timestep_layers.2.weight" in copied and "brain.subject_layers.1.weight" not in now
    for k in copied:
        assert torch.equal(now[k], state[k]), k
        if (k.startswith("brain.") and ".norm." not in k) or "lora_B" in k:
            assert not torch.equal(init[k], state[k]), k  # the copy is observable (different seeds, LoRA perturbed)


def test_rows_of_a_subject_without_layers_are_refused():
    """A subject the model has no subject layer for is an error naming it, not a silent all-zero condition."""
    _, _, model = _model(subjects=(1,))
    batch = _random_batch(4, subject=1)
    batch["subject"][2] = 5
    with pytest.raises(ConfigError, match=r"subject\(s\) \[5\]"):
        model.condition(batch)
