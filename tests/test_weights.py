"""Weights from where labs keep them (raydecode.weights): a tiny OpenCLIP checkpoint and a diffusers VAE directory,
written in their real formats, served from S3 (moto's server over HTTP) and from a Hugging Face cache laid out as
huggingface_hub writes it (models--ORG--REPO/{blobs,refs,snapshots}), loaded by the same encoders, UNet builder and
metric networks the stages use."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch

from raydecode.errors import ConfigError
from raydecode.nn.encoders import EncoderConfig, FrozenEncoder, _register_openclip_configs
from raydecode.weights import cache_root, local_weights

CLIP = EncoderConfig(name="clip", kind="openclip", arch="raydecode-tiny-vit", image_size=32)
VAE = EncoderConfig(name="vae", kind="vae", arch="tiny", image_size=32, tiny_channels=(16, 32, 32))


def _images(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 32, 32, 3), generator=g, dtype=torch.uint8)


def _encode(cfg: EncoderConfig) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return FrozenEncoder(cfg).encode(_images())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An open_clip checkpoint (the model's state dict, as open_clip loads a local `pretrained` file) and a diffusers
    VAE directory (config.json + diffusion_pytorch_model.safetensors), from seed 7 (the configs above say seed 0)."""
    import open_clip

    root = tmp_path_factory.mktemp("weights")
    _register_openclip_configs()
    torch.manual_seed(7)
    torch.save(open_clip.create_model("raydecode-tiny-vit").state_dict(), root / "open_clip_pytorch_model.bin")
    FrozenEncoder(VAE.model_copy(update={"seed": 7})).net.save_pretrained(root / "vae")
    return root


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """The node's environment: S3 endpoint and credentials (instance profile here), its own weights cache."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RAYDECODE_WEIGHTS_CACHE", str(tmp_path / "cache"))
    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def test_weights_from_s3_load_once_per_node_and_again_when_they_change(saved, s3_env):
    s3 = s3_env
    s3.upload_file(str(saved / "open_clip_pytorch_model.bin"), "nsd", "weights/clip/open_clip_pytorch_model.bin")
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):
        s3.upload_file(str(saved / "vae" / f), "nsd", f"weights/sd/vae/{f}")
    expected = {"clip": _encode(CLIP.model_copy(update={"weights": str(saved / "open_clip_pytorch_model.bin")})),
                "vae": _encode(VAE.model_copy(update={"weights": str(saved / "vae")}))}
    random = _encode(CLIP)
    got = {"clip": _encode(CLIP.model_copy(update={"weights": "s3://nsd/weights/clip/open_clip_pytorch_model.bin"})),
           "vae": _encode(VAE.model_copy(update={"weights": "s3://nsd/weights/sd/vae"}))}
    for name in expected:
        assert all(torch.equal(a, b) for a, b in zip(got[name], expected[name])), name
    assert not torch.allclose(got["clip"][1], random[1])  # the checkpoint's weights, not the seed's

    # fetched once: a second load reads the cache (the objects' listing is the key, so nothing is downloaded)
    entries = sorted(p.name for p in cache_root().iterdir() if p.is_dir())
    assert len(entries) == 2
    first = local_weights("s3://nsd/weights/sd/vae", "vae")
    assert first.parent == cache_root() and (first / "config.json").is_file()
    assert sorted(p.name for p in cache_root().iterdir() if p.is_dir()) == entries
    # a driver counting parameters on the meta device fetches the configs only
    configs = local_weights("s3://nsd/weights/sd/vae", "vae", ("*.json",))
    assert configs != first and sorted(p.name for p in configs.iterdir() if not p.name.startswith(".")) == \
        ["config.json"]

    # a replaced object is a new key: fetched again, the new weights load
    torch.manual_seed(8)
    other = FrozenEncoder(VAE.model_copy(update={"seed": 8}))
    other.net.save_pretrained(saved / "vae8")
    s3.upload_file(str(saved / "vae8" / "diffusion_pytorch_model.safetensors"), "nsd",
                   "weights/sd/vae/diffusion_pytorch_model.safetensors")
    again = local_weights("s3://nsd/weights/sd/vae", "vae")
    assert again != first
    assert all(torch.equal(a, b) for a, b in zip(_encode(VAE.model_copy(update={"weights": "s3://nsd/weights/sd/vae"})),
                                                 _encode(VAE.model_copy(update={"seed": 8}))))

    with pytest.raises(ConfigError, match=r"encoder 'vae': weights s3://nsd/weights/missing do not exist"):
        FrozenEncoder(VAE.model_copy(update={"weights": "s3://nsd/weights/missing"}))


def _hf_cache(home: Path, repo: str, files: dict[str, Path]) -> str:
    """Files into ``HF_HOME/hub`` exactly as huggingface_hub stores a download: content-addressed blobs, the
    snapshot's files as relative symlinks to them, refs/main naming the commit."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        data = src.read_bytes()
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = base / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return commit


def test_weights_from_a_prefilled_hugging_face_cache_load_offline(saved, tmp_path):
    home = tmp_path / "hf"
    commit = _hf_cache(home, "lab/tiny-sd", {"vae/config.json": saved / "vae" / "config.json",
                                             "vae/diffusion_pytorch_model.safetensors":
                                                 saved / "vae" / "diffusion_pytorch_model.safetensors"})
    _hf_cache(home, "lab/tiny-clip", {"open_clip_pytorch_model.bin": saved / "open_clip_pytorch_model.bin"})
    expected = {"vae": _encode(VAE.model_copy(update={"weights": str(saved / "vae")}))[1].tolist(),
                "clip": _encode(CLIP.model_copy(update={"weights": str(saved / "open_clip_pytorch_model.bin")}))[1]
                .tolist()}
    # huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when imported: a fresh process, as a node starts with them set
    script = f"""
import json, torch
from raydecode.nn.encoders import EncoderConfig, FrozenEncoder
from raydecode.errors import ConfigError
images = torch.randint(0, 256, (3, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
out = {{}}
for name, cfg in (("vae", {VAE.model_dump()!r}), ("clip", {CLIP.model_dump()!r})):
    ref = {{"vae": "hf://lab/tiny-sd@{commit}/vae", "clip": "hf://lab/tiny-clip/open_clip_pytorch_model.bin"}}[name]
    with torch.no_grad():
        out[name] = FrozenEncoder(EncoderConfig(**{{**cfg, "weights": ref}})).encode(images)[1].tolist()
try:
    FrozenEncoder(EncoderConfig(**{{**{VAE.model_dump()!r}, "weights": "hf://lab/not-cached/vae"}}))
except ConfigError as exc:
    out["missing"] = str(exc)
print(json.dumps(out))
"""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("vae", "clip"):
        assert torch.allclose(torch.tensor(out[name]), torch.tensor(expected[name]), atol=1e-6), name
    assert out["missing"].startswith("encoder 'vae': hf://lab/not-cached/vae is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in out["missing"]


def test_malformed_and_missing_references_fail_with_one_line(tmp_path):
    for ref, words in (("hf://just-a-name", "is not a Hugging Face reference"),
                       (str(tmp_path / "nowhere"), "do not exist on this node")):
        with pytest.raises(ConfigError, match=words) as err:
            local_weights(ref, "model.unet")
        assert str(err.value).startswith("model.unet: ") and "\n" not in str(err.value)
