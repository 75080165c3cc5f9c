"""IP-Adapter Plus on small files in the published layouts: h94/IP-Adapter's ``models/`` (``image_encoder/`` +
``ip-adapter-plus_sd15.safetensors`` with ``image_proj.*`` / ``ip_adapter.*`` keys) and a Stable Diffusion 1.5
diffusers directory (unet/, vae/, scheduler/, text_encoder/, tokenizer/ with vocab.json + merges.txt). The target
encoder reads the tokens exactly as diffusers' own IP-Adapter loading makes them; the decoder generates from
predicted tokens, one seed per row."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raydecode.errors import ConfigError
from raydecode.evaluate.ipadapter import PRESETS, IPAdapterDecoder
from raydecode.nn.encoders import FrozenEncoder, encoder_config
from raydecode.nn.ipadapter import CLIP_VISION, IP_ADAPTER_FILE, random_image_proj, random_ip_layers

WIDTH = 32  # the tiny UNet's cross-attention width = the image tokens' width


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny SD 1.5 directory and an IP-Adapter ``models/`` directory, written as the releases lay them out."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("ipadapter")
    sd, models = root / "stable-diffusion-v1-5", root / "IP-Adapter" / "models"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**PRESETS["tiny"]["unet_config"], sample_size=8, in_channels=4, out_channels=4)
    unet.save_pretrained(sd / "unet")
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                  sample_size=32).save_pretrained(sd / "vae")
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                  steps_offset=1).save_pretrained(sd / "scheduler")  # SD 1.5 ships PNDM's config
    CLIPTextModel(CLIPTextConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 vocab_size=8, max_position_embeddings=77, eos_token_id=1, bos_token_id=0,
                                 pad_token_id=1)).save_pretrained(sd / "text_encoder")
    (sd / "tokenizer").mkdir()
    (sd / "tokenizer" / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
    (sd / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (sd / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77,
                                                                          "tokenizer_class": "CLIPTokenizer"}))
    (sd / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0", "requires_safety_checker": False,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
        "feature_extractor": [None, None]}))
    vision = CLIPVisionConfig(**CLIP_VISION["tiny"])
    CLIPVisionModelWithProjection(vision).save_pretrained(models / "image_encoder")
    state = {f"image_proj.{k}": v for k, v in random_image_proj(vision.hidden_size, WIDTH, 1).items()}
    state.update({f"ip_adapter.{k}": v for k, v in random_ip_layers(unet, 2).items()})
    save_file(state, str(models / IP_ADAPTER_FILE))
    return sd, models, state


def test_the_file_has_the_published_keys(published):
    *_, state = published
    assert state["image_proj.latents"].shape == (1, 16, 64)
    for key in ("image_proj.proj_in.weight", "image_proj.norm_out.weight", "image_proj.layers.3.0.to_kv.weight",
                "image_proj.layers.0.0.norm1.weight", "image_proj.layers.0.1.3.weight", "ip_adapter.1.to_k_ip.weight",
                "ip_adapter.3.to_v_ip.weight"):
        assert key in state, key


def test_the_target_tokens_are_diffusers_own_ip_adapter_embeddings(published):
    """Our encoder (CLIP vision tower -> penultimate states -> resampler) against diffusers' pipeline loading the
    same files (``load_ip_adapter`` with its image encoder, ``prepare_ip_adapter_image_embeds`` + the UNet's image
    projection): the same tokens."""
    from diffusers import StableDiffusionPipeline

    sd, models, _ = published
    enc = FrozenEncoder(encoder_config({"name": "ipa-test", "kind": "ipadapter", "arch": "pretrained",
                                        "weights": str(models), "image_size": 32}))
    assert enc.tokens_shape == (16, WIDTH) and enc.pooled_dim == CLIP_VISION["tiny"]["projection_dim"]
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_ip_adapter(str(models.parent), subfolder="models", weight_name=IP_ADAPTER_FILE)
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    pixels = pipe.feature_extractor(list(images.numpy()), return_tensors="pt", do_resize=False,
                                    do_center_crop=False).pixel_values
    with torch.no_grad():
        hidden = pipe.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        theirs = pipe.unet.encoder_hid_proj.image_projection_layers[0](hidden)
        ours, _ = enc.net(pixels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    tokens, _ = enc.encode(images)  # uint8 -> the same normalisation
    torch.testing.assert_close(tokens, theirs, rtol=1e-3, atol=1e-3)


def test_the_decoder_generates_from_predicted_tokens_one_seed_per_row(published):
    sd, models, _ = published
    cfg = {"path": str(sd), "ip_adapter": str(models), "steps": 4,  # the image encoder's weights: ip_adapter's
           "image_encoder": {"name": "ipa-test", "kind": "ipadapter", "arch": "pretrained", "image_size": 32}}
    dec = IPAdapterDecoder.from_config(cfg)
    assert dec.prompt.shape == (1, 77, WIDTH) and dec.prompt.abs().sum() > 0  # the empty prompt, encoded
    tokens = torch.randn(3, 16, WIDTH, generator=torch.Generator().manual_seed(0))
    images = dec.generate(tokens, [5, 6, 7])
    assert images.shape == (3, 32, 32, 3) and images.dtype == torch.uint8
    again = dec.generate(tokens[1:2], [6])  # a row's image depends on its tokens and seed, not on the batch
    np.testing.assert_array_equal(images[1].numpy(), again[0].numpy())
    other = dec.generate(-tokens[1:2], [6])
    assert (other.int() - again.int()).abs().float().mean() > 1  # the tokens steer the image
    assert dec.generate(tokens[:1], [5], guidance=1.0).shape == (1, 32, 32, 3)  # no guidance: one pass
    with pytest.raises(ConfigError, match=r"\(B, 16, 32\)"):
        dec.generate(torch.zeros(1, 16, 8), [0])


def test_random_weight_presets_build_without_files():
    dec = IPAdapterDecoder.from_config({"preset": "tiny", "steps": 2})
    assert dec.generate(torch.zeros(2, 16, WIDTH), [0, 1]).shape == (2, 32, 32, 3)
    with pytest.raises(ConfigError, match="decoder.path"):
        IPAdapterDecoder.from_config({"preset": "paper"})
