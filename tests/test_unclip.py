"""The unCLIP decoder of CLIP-space models (tiny preset, CPU): seeded and batch-independent generation, the VAE's
image size, classifier-free guidance against all-zeros tokens, img2img from a blurry image, the diffusers directory
round trip and the errors for wrong token widths and non-diffusers paths."""

from __future__ import annotations

import pytest
import torch

import raydecode.evaluate.unclip as unclip
from raydecode.errors import ConfigError
from raydecode.evaluate.unclip import EmbeddingDecoder, img2img_timesteps, unclip_config
from raydecode.nn.diffusion import initial_noise
from raydecode.nn.encoders import FrozenEncoder, encoder_config
from raydecode.nn.mindeye2 import PRESETS as MINDEYE2_PRESETS
from raydecode.nn.mindeye2 import MindEye2Config

STEPS = 5
SEEDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def decoder():
    """The tiny decoder (read-only: tests that change weights build their own)."""
    return EmbeddingDecoder.from_config("tiny")


def _tokens(n=4, seed=0, shape=MINDEYE2_PRESETS["tiny"]["clip_tokens"]):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def _smooth_images(n, seed, size=32):
    """Blurry-looking uint8 images (B, size, size, 3): random 4 x 4 colour fields, upsampled."""
    coarse = torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    fine = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    return (fine * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _mean_abs(a, b) -> float:
    return float((a.int() - b.int()).abs().float().mean())


def _as_latents(monkeypatch):
    """generate() returns the final DDIM latents instead of decoded images."""
    monkeypatch.setattr(unclip, "decode_latents", lambda vae, latents: latents)


def test_same_seeds_same_images_other_seeds_other_images(decoder):
    tokens = _tokens()
    a = decoder.generate(tokens, SEEDS, steps=STEPS)
    b = decoder.generate(tokens, SEEDS, steps=STEPS)
    assert torch.equal(a, b)
    other = decoder.generate(tokens, [s + 100 for s in SEEDS], steps=STEPS)
    assert _mean_abs(other, a) > 0.5
    assert _mean_abs(a[0], a[1]) > 0.5  # rows with different seeds (and tokens) differ


def test_images_do_not_depend_on_batching(decoder, monkeypatch):
    """A batch of 4 and two batches of 2 give the same images (one seeded noise per row)."""
    tokens = _tokens()
    whole = decoder.generate(tokens, SEEDS, steps=STEPS)
    halves = torch.cat([decoder.generate(tokens[:2], SEEDS[:2], steps=STEPS),
                        decoder.generate(tokens[2:], SEEDS[2:], steps=STEPS)])
    diff = (whole.int() - halves.int()).abs()  # batched float kernels may round a value differently
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.005
    # a row's image is its own: swapping the other rows' tokens does not change it
    mixed = decoder.generate(torch.cat([tokens[:1], _tokens(3, seed=9)]), SEEDS, steps=STEPS)
    assert (mixed[0].int() - whole[0].int()).abs().max() <= 1
    _as_latents(monkeypatch)
    lat = decoder.generate(tokens, SEEDS, steps=STEPS)
    split = torch.cat([decoder.generate(tokens[:2], SEEDS[:2], steps=STEPS),
                       decoder.generate(tokens[2:], SEEDS[2:], steps=STEPS)])
    torch.testing.assert_close(split, lat, atol=1e-5, rtol=1e-5)


def test_output_is_uint8_at_the_vae_image_size_and_the_vae_is_the_targets_vae(decoder):
    images = decoder.generate(_tokens(2), SEEDS[:2], steps=2)
    size = encoder_config("vae-tiny").image_size
    assert images.shape == (2, size, size, 3) and images.dtype == torch.uint8
    assert decoder.image_size == size and decoder.latent_shape == (4, 8, 8)
    ref = FrozenEncoder(encoder_config("vae-tiny")).net.state_dict()
    own = decoder.vae.state_dict()
    assert set(own) == set(ref) and all(torch.equal(own[k], ref[k]) for k in ref)


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_presets_take_the_mindeye2_preset_clip_tokens(preset):
    me2 = MINDEYE2_PRESETS[preset]
    cfg = unclip_config(preset)
    assert cfg.unet_config["cross_attention_dim"] == me2["clip_tokens"][1]
    assert cfg.vae == me2["vae_encoder"]
    assert unclip_config({"preset": preset, "guidance": 1.5}).guidance == 1.5


def _reference_latents(decoder, tokens, seeds, guidance):
    """DDIM written out with two plain UNet calls per step: ``guidance`` None is the conditional prediction alone."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(decoder.scheduler_config, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(STEPS)
    x = initial_noise(seeds, decoder.latent_shape) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = decoder.unet(x, t, encoder_hidden_states=tokens).sample
            if guidance is not None:
                uncond = decoder.unet(x, t, encoder_hidden_states=torch.zeros_like(tokens)).sample
                eps = uncond + guidance * (eps - uncond)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x


def test_classifier_free_guidance_against_all_zeros_tokens(decoder, monkeypatch):
    """Scale 1 is the conditional prediction alone, scale 0 the all-zeros tokens alone, scale 3 extrapolates from
    the zeros' prediction past the conditional one; the scales give different images."""
    tokens = _tokens(3)
    seeds = SEEDS[:3]
    img_g1 = decoder.generate(tokens, seeds, steps=STEPS, guidance=1.0)
    img_g3 = decoder.generate(tokens, seeds, steps=STEPS, guidance=3.0)
    _as_latents(monkeypatch)
    g1 = decoder.generate(tokens, seeds, steps=STEPS, guidance=1.0)
    g0 = decoder.generate(tokens, seeds, steps=STEPS, guidance=0.0)
    g3 = decoder.generate(tokens, seeds, steps=STEPS, guidance=3.0)
    cond_only = _reference_latents(decoder, tokens, seeds, None)
    zeros_only = _reference_latents(decoder, torch.zeros_like(tokens), seeds, None)
    torch.testing.assert_close(g1, cond_only, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g0, zeros_only, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g3, _reference_latents(decoder, tokens, seeds, 3.0), atol=1e-4, rtol=1e-4)
    assert (g3 - g1).abs().max() > 1e-2 and (g0 - g1).abs().max() > 1e-2  # the checks above can tell them apart
    assert _mean_abs(img_g3, img_g1) > 0.5


def test_img2img_timesteps_skip_the_first_part_of_the_schedule():
    timesteps = torch.arange(20, 0, -1)
    assert torch.equal(img2img_timesteps(timesteps, 0.0), timesteps)
    assert torch.equal(img2img_timesteps(timesteps, 0.3), timesteps[6:])  # MindEye's img2img_strength 0.7: 14 steps
    assert torch.equal(img2img_timesteps(timesteps, 0.99), timesteps[19:])  # at least one step runs


def test_blend_starts_from_the_blurry_image():
    """With a VAE that reconstructs (the tiny random one, fitted for 40 steps to 4 other smooth images), blend 0.5
    lands closer to the blurry image than pure noise does; the result depends on the blurry image; blend 0 and a
    missing blurry image both mean pure noise."""
    decoder = EmbeddingDecoder.from_config("tiny")  # its VAE is fitted below: not the shared fixture
    x = _smooth_images(4, seed=1).permute(0, 3, 1, 2).float() / 127.5 - 1
    vae = decoder.vae.requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for _ in range(40):
        loss = (vae.decode(vae.encode(x).latent_dist.mean).sample - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.requires_grad_(False)

    tokens, seeds = _tokens(), SEEDS
    blurry, other = _smooth_images(4, seed=2), _smooth_images(4, seed=3)
    noise_start = decoder.generate(tokens, seeds, blurry=blurry, steps=10, blend=0.0)
    blended = decoder.generate(tokens, seeds, blurry=blurry, steps=10, blend=0.5)
    assert _mean_abs(blended, blurry) < _mean_abs(noise_start, blurry) - 3, \
        (_mean_abs(blended, blurry), _mean_abs(noise_start, blurry))
    from_other = decoder.generate(tokens, seeds, blurry=other, steps=10, blend=0.5)
    assert _mean_abs(from_other, blended) > 3
    assert _mean_abs(from_other, other) < _mean_abs(from_other, blurry)
    assert torch.equal(noise_start, decoder.generate(tokens, seeds, steps=10))
    assert torch.equal(decoder.generate(tokens, seeds, steps=10, blend=0.5), noise_start)


def test_save_pretrained_and_load_through_path_give_the_same_images(decoder, tmp_path):
    out = decoder.save_pretrained(str(tmp_path / "unclip"))
    for name in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        assert (tmp_path / "unclip" / name).is_file(), name
    loaded = EmbeddingDecoder.from_config({"path": out})
    assert loaded.width == decoder.width and loaded.image_size == decoder.image_size
    tokens, blurry = _tokens(), _smooth_images(4, seed=2)
    assert torch.equal(loaded.generate(tokens, SEEDS, steps=STEPS), decoder.generate(tokens, SEEDS, steps=STEPS))
    assert torch.equal(loaded.generate(tokens, SEEDS, blurry=blurry, steps=STEPS, blend=0.4),
                       decoder.generate(tokens, SEEDS, blurry=blurry, steps=STEPS, blend=0.4))
    # a different seed of random weights is a different decoder (the comparison above can fail)
    other = EmbeddingDecoder.from_config(unclip_config({"preset": "tiny", "seed": 1}))
    assert _mean_abs(other.generate(tokens, SEEDS, steps=STEPS), decoder.generate(tokens, SEEDS, steps=STEPS)) > 0.5


def test_wrong_token_width_is_refused_naming_both_shapes(decoder):
    with pytest.raises(ConfigError) as err:
        decoder.generate(torch.zeros(2, 16, 48), [0, 1], steps=1)
    msg = str(err.value)
    assert "(2, 16, 48)" in msg and "(B, N, 32)" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="one seed per row"):
        decoder.generate(torch.zeros(2, 16, 32), [0], steps=1)


def test_a_path_that_is_not_a_diffusers_directory_is_refused_naming_it(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")  # no vae/
    for path in (tmp_path, tmp_path / "missing"):
        with pytest.raises(ConfigError) as err:
            EmbeddingDecoder.from_config({"path": str(path)})
        assert repr(str(path)) in str(err.value) and "\n" not in str(err.value)


def test_paper_preset_needs_a_path_and_builds_on_meta():
    with pytest.raises(ConfigError, match="unclip.path"):
        EmbeddingDecoder.from_config("paper")
    with torch.device("meta"):
        decoder = EmbeddingDecoder.from_config("paper")
    assert decoder.width == MindEye2Config(**MINDEYE2_PRESETS["paper"]).clip_tokens[1] == 1664
