"""The `clip-levels` target encoder (CLIP-MUSED's feature levels): f_llv, the image encoder's first block output, and
f_hlv, the mean of the truncated, unit-norm image and caption embeddings, checked against open_clip's own
computations on the tiny architecture; its weights from an open_clip checkpoint file; captions read from the store by
the train loop's target path. (`raydecode embed` of it: tests/test_embed.py.)"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raydecode.embed import run_embed
from raydecode.errors import ConfigError, StoreError
from raydecode.nn.encoders import (
    OPENAI_MEAN,
    OPENAI_STD,
    EncoderConfig,
    FrozenEncoder,
    TargetCache,
    _register_openclip_configs,
    encoder_config,
    fold_tokens,
)
from raydecode.nn.targets import BatchPreparer

CAPTIONS = ["a picture of a cat", "a picture of a dog and a frisbee", "a picture of a bus, a car and a truck"]


def _images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)


def _by_hand(model, images: torch.Tensor, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_llv, f_hlv) through open_clip's own paths: forward_intermediates for block 0, encode_image / encode_text."""
    import open_clip

    x = images.permute(0, 3, 1, 2).float() / 255.0  # 32 px: the encoder's size, no resize
    x = (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    tok = open_clip.get_tokenizer("raydecode-tiny-vit")
    text = fold_tokens(tok(captions), 64, tok)
    with torch.no_grad():
        out = model.visual.forward_intermediates(x, indices=[0], output_fmt="NLC", output_extra_tokens=True,
                                                 intermediates_only=True)
        llv = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
        image, caption = model.encode_image(x), model.encode_text(text)
    hlv = (F.normalize(image.clamp(-1.5, 1.5), dim=-1) + F.normalize(caption.clamp(-1.5, 1.5), dim=-1)) / 2
    return llv, hlv


@pytest.fixture(scope="module")
def tiny():
    return FrozenEncoder(encoder_config("clip-levels-tiny"))


def test_levels_match_open_clip(tiny):
    tokens, pooled = tiny.encode(_images(), CAPTIONS)
    assert tiny.tokens_shape == (17, 32) and tiny.pooled_dim == 32  # 4x4 patches + class token, width 32; embed 32
    assert tokens.shape == (3, 17, 32) and pooled.shape == (3, 32)
    assert tokens.dtype == pooled.dtype == torch.float32
    llv, hlv = _by_hand(tiny.net, _images(), CAPTIONS)
    torch.testing.assert_close(tokens, llv)
    torch.testing.assert_close(pooled, hlv)
    assert torch.all(pooled.norm(dim=-1) <= 1 + 1e-6) and tokens.abs().max() > 0.1
    # another caption moves f_hlv only
    t2, p2 = tiny.encode(_images(), CAPTIONS[::-1])
    torch.testing.assert_close(t2, tokens)
    assert not torch.allclose(p2[0], pooled[0]) and torch.allclose(p2[1], pooled[1])
    demo = FrozenEncoder(encoder_config("clip-levels-demo"), architecture_only=True)
    assert demo.tokens_shape == (17, 64) and demo.pooled_dim == 64
    paper = FrozenEncoder(encoder_config("clip-levels-vitb32"), architecture_only=True)  # meta: no weights read
    assert paper.tokens_shape == (50, 768) and paper.pooled_dim == 512


def test_captions_fold_into_the_tiny_vocabulary():
    import open_clip

    tok = open_clip.get_tokenizer("raydecode-tiny-vit")
    raw = tok(CAPTIONS + ["a picture of " + "a very long caption " * 10])
    folded = fold_tokens(raw, 64, tok)
    assert folded.shape == (4, 16) and 0 <= folded.min() and folded.max() == 63
    assert torch.equal(folded == 62, raw == tok.sot_token_id) and torch.equal(folded == 63, raw == tok.eot_token_id)
    assert torch.equal(folded == 0, raw == 0) and (folded[3] == 63).nonzero().item() == 15  # truncated: end kept
    assert torch.equal(fold_tokens(raw, 49408, tok), raw)  # a full-size text tower reads the ids as they are


def test_missing_captions_is_one_line_error(tiny):
    for captions in (None, CAPTIONS[:2]):
        with pytest.raises(ConfigError) as err:
            tiny.encode(_images(), captions)
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith("encoder 'clip-levels-tiny' reads the stimuli's captions")
    with pytest.raises(ConfigError, match="'clip-levels-tiny' reads the stimuli's captions"):
        TargetCache({"levels": tiny})(torch.tensor([1, 2, 3]), _images())
    # other kinds ignore captions
    clip = FrozenEncoder(encoder_config("openclip-tiny"))
    torch.testing.assert_close(clip.encode(_images(), CAPTIONS), clip.encode(_images()))


def test_weights_from_an_open_clip_checkpoint(tiny, tmp_path):
    import open_clip

    _register_openclip_configs()
    torch.manual_seed(7)
    model = open_clip.create_model("raydecode-tiny-vit").eval()
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    cfg = EncoderConfig(name="clip-levels-file", kind="clip-levels", arch="raydecode-tiny-vit", image_size=32,
                        weights=str(tmp_path / "open_clip_pytorch_model.bin"))
    tokens, pooled = FrozenEncoder(cfg).encode(_images(), CAPTIONS)
    llv, hlv = _by_hand(model, _images(), CAPTIONS)
    torch.testing.assert_close(tokens, llv)
    torch.testing.assert_close(pooled, hlv)
    assert not torch.allclose(pooled, tiny.encode(_images(), CAPTIONS)[1])  # not the seed-0 random weights


def test_train_targets_read_captions_from_the_store(tiny_store, tiny):
    """The train loop's target path (BatchPreparer): images and captions of new ids from the stimulus shards."""
    import io

    from PIL import Image

    from raydecode.data.store import open_store

    store = open_store(tiny_store)
    stim = store.read_shard(store.manifest.shards_of("stimuli")[0])
    ids = stim["image_id"].to_pylist()[:5]
    images = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                                        for b in stim["image"].to_pylist()[:5]]))
    captions = stim["caption"].to_pylist()[:5]
    assert len(set(captions)) > 1
    prep = BatchPreparer({"levels": {"source": "compute", "encoder": "clip-levels-tiny"}}, torch.device("cpu"),
                         torch.float32, tiny_store, None)
    batch = prep({"image_id": torch.tensor(ids)})
    tokens, pooled = tiny.encode(images, captions)
    torch.testing.assert_close(batch["levels_tokens"], tokens)
    torch.testing.assert_close(batch["levels_pooled"], pooled)
    # captions given with the batch are used as given
    again = TargetCache({"levels": tiny})(torch.tensor(ids), images, captions=captions[::-1])
    torch.testing.assert_close(again["levels_pooled"], tiny.encode(images, captions[::-1])[1])


def test_embed_refuses_a_store_without_captions(store_copy):
    path = os.path.join(store_copy, "manifest.json")
    manifest = json.load(open(path))
    manifest["absent"] = [*manifest.get("absent", []), "captions"]
    json.dump(manifest, open(path, "w"))
    before = open(path, "rb").read()
    with pytest.raises(StoreError, match=r"no captions .*encoder 'clip-levels-tiny' reads them: ingest with --coco"):
        run_embed(store_copy, ["clip-levels-tiny"], progress=False)
    assert open(path, "rb").read() == before and not os.path.exists(os.path.join(store_copy, "embeddings"))
