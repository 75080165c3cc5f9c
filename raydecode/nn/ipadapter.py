"""IP-Adapter Plus (Ye et al. 2023) for Stable Diffusion 1.5: the image-token space MindLink decodes into.

IP-Adapter Plus turns an image into ``N_I`` = 16 tokens of the UNet's cross-attention width (768 for SD 1.5): a
CLIP ViT-H/14 vision tower (its penultimate hidden states, 257 x 1280) read by a Perceiver resampler (4 blocks,
16 learned queries). The UNet attends to those tokens through extra key/value projections beside the text's
(decoupled cross-attention). The published checkpoint (``h94/IP-Adapter``: ``models/image_encoder/`` +
``models/ip-adapter-plus_sd15.safetensors``) stores both parts under two prefixes:

- ``image_proj.*``: the resampler, in the original layout (``latents`` (1, 16, 768), ``proj_in`` (768, 1280),
  ``proj_out`` (768, 768), ``norm_out``, ``layers.<i>.0.{norm1,norm2,to_q,to_kv,to_out}`` (attention),
  ``layers.<i>.1.{0,1,3}`` (LayerNorm, GELU MLP without biases));
- ``ip_adapter.<k>.to_{k,v}_ip.weight``: the image key/value projections of the k-th attention processor of the
  UNet (odd k: the cross-attention ones, in ``unet.attn_processors`` order).

:func:`read_ip_adapter` reads that file (``.safetensors`` with prefixes or the ``.bin`` nested dict),
:func:`resampler` builds diffusers' ``IPAdapterPlusImageProjection`` from its ``image_proj`` part (the target
encoder of ``raydecode embed``), and the decoder (:mod:`raydecode.evaluate.ipadapter`) hands the whole state to
diffusers' ``load_ip_adapter``. Random-weight presets (tiny / demo) build a state dict in the same layout
(:func:`random_image_proj`, :func:`random_ip_layers`), so one loading path serves every scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from raydecode.errors import ConfigError

IP_ADAPTER_FILE = "ip-adapter-plus_sd15.safetensors"
HEAD_DIM = 64  # the resampler's attention head width (diffusers infers the head count from it)

# CLIP vision towers by arch name: the real one (ViT-H/14 of IP-Adapter's image_encoder/) and the random-weight
# sizes of the tiny / demo presets (CLIPVisionConfig keywords)
CLIP_VISION: dict[str, dict] = {
    "pretrained": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu"),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8, projection_dim=32),
    "demo": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                 patch_size=8, projection_dim=64),
}


def read_ip_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter checkpoint as ``{"image_proj": {...}, "ip_adapter": {...}}``."""
    if not path.is_file():
        raise ConfigError(f"IP-Adapter weights {str(path)!r}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                part, _, rest = key.partition(".")
                if part in state:
                    state[part][rest] = f.get_tensor(key)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise ConfigError(f"IP-Adapter weights {str(path)!r}: no image_proj.* and ip_adapter.* tensors")
    if "latents" not in state["image_proj"]:
        raise ConfigError(f"IP-Adapter weights {str(path)!r}: not an IP-Adapter Plus checkpoint (its image_proj has "
                          "no `latents`: MindLink needs the Plus resampler's 16 tokens)")
    return state


def _diffusers_key(key: str) -> str:
    """An ``image_proj`` key of the original layout -> ``IPAdapterPlusImageProjection``'s."""
    parts = key.split(".")
    if parts[0] != "layers":
        return key
    i, sub, rest = parts[1], parts[2], parts[3:]
    if sub == "0":  # attention: norm1/norm2 are the media / latents norms, to_out has no Dropout sibling here
        name = {"norm1": "ln0", "norm2": "ln1"}.get(rest[0])
        if name:
            return ".".join(["layers", i, name, *rest[1:]])
        proj = {"to_out": "to_out.0"}.get(rest[0], rest[0])
        return ".".join(["layers", i, "attn", proj, *rest[1:]])
    mlp = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}[rest[0]]  # LayerNorm, Linear, GELU, Linear
    return ".".join(["layers", i, mlp, *rest[1:]])


def resampler(image_proj: dict[str, torch.Tensor]) -> nn.Module:
    """diffusers' ``IPAdapterPlusImageProjection`` with the weights of an original-layout ``image_proj``."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    _, queries, hidden = image_proj["latents"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in image_proj if k.startswith("layers."))
    model = IPAdapterPlusImageProjection(
        embed_dims=image_proj["proj_in.weight"].shape[1], output_dims=image_proj["proj_out.weight"].shape[0],
        hidden_dims=hidden, depth=depth, dim_head=HEAD_DIM,
        heads=image_proj["layers.0.0.to_q.weight"].shape[0] // HEAD_DIM, num_queries=queries,
        ffn_ratio=image_proj["layers.0.1.1.weight"].shape[0] / hidden)
    state = {}
    for key, value in image_proj.items():
        name = _diffusers_key(key)
        if name.endswith("attn.to_kv.weight"):
            state[name.replace("to_kv", "to_k")], state[name.replace("to_kv", "to_v")] = value.chunk(2, dim=0)
        else:
            state[name] = value
    model.load_state_dict(state, strict=True)
    return model


def random_image_proj(embed_dims: int, output_dims: int, seed: int, queries: int = 16, hidden: int = HEAD_DIM,
                      depth: int = 4, ff_mult: int = 4) -> dict[str, torch.Tensor]:
    """A random-weight resampler in the original layout (tiny / demo presets, and test files)."""
    g = torch.Generator().manual_seed(seed)

    def linear(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) / inp ** 0.5

    state = {"latents": torch.randn(1, queries, hidden, generator=g) / hidden ** 0.5,
             "proj_in.weight": linear(hidden, embed_dims), "proj_in.bias": torch.zeros(hidden),
             "proj_out.weight": linear(output_dims, hidden), "proj_out.bias": torch.zeros(output_dims),
             "norm_out.weight": torch.ones(output_dims), "norm_out.bias": torch.zeros(output_dims)}
    for i in range(depth):
        p = f"layers.{i}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            state[f"{p}{norm}.weight"], state[f"{p}{norm}.bias"] = torch.ones(hidden), torch.zeros(hidden)
        state.update({f"{p}0.to_q.weight": linear(hidden, hidden), f"{p}0.to_kv.weight": linear(2 * hidden, hidden),
                      f"{p}0.to_out.weight": linear(hidden, hidden), f"{p}1.1.weight": linear(ff_mult * hidden, hidden),
                      f"{p}1.3.weight": linear(hidden, ff_mult * hidden)})
    return state


def random_ip_layers(unet: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random image key/value projections for every cross-attention processor of ``unet``, in the original
    numbering (``<k>.to_k_ip.weight``, k = 1, 3, 5, ...)."""
    g = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim
    state, k = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            out = unet.get_submodule(name[:-len(".processor")]).to_k.out_features
            for proj in ("to_k_ip", "to_v_ip"):
                state[f"{k}.{proj}.weight"] = torch.randn(out, width, generator=g) / width ** 0.5
            k += 2
    return state


class ImageTokens(nn.Module):
    """IP-Adapter Plus's image tokens: CLIP vision tower -> penultimate hidden states -> resampler. ``forward``
    takes CLIP-normalised pixels and returns ``(tokens (B, 16, width), image_embeds (B, projection_dim))``."""

    def __init__(self, vision: nn.Module, resampler: nn.Module):
        super().__init__()
        self.vision, self.resampler = vision, resampler

    @classmethod
    def build(cls, arch: str, weights: Path | None, weight_name: str, seed: int, meta: bool = False) -> ImageTokens:
        """``weights``: a directory holding ``image_encoder/`` (transformers' CLIPVisionModelWithProjection) and
        ``weight_name``; None: random weights of ``arch``'s size from ``seed`` (``meta``: architecture only)."""
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if weights is not None:
            if not (weights / "image_encoder" / "config.json").is_file():
                raise ConfigError(f"IP-Adapter weights {str(weights)!r}: no image_encoder/config.json (the layout of "
                                  "h94/IP-Adapter's models/ directory)")
            vision = CLIPVisionModelWithProjection.from_pretrained(weights / "image_encoder")
            return cls(vision, resampler(read_ip_adapter(weights / weight_name)["image_proj"]))
        if arch not in CLIP_VISION:
            raise ConfigError(f"IP-Adapter image encoder arch {arch!r}: allowed values: {', '.join(CLIP_VISION)}")
        config = CLIPVisionConfig(**CLIP_VISION[arch])
        width = 768 if arch == "pretrained" else config.projection_dim  # SD 1.5's cross-attention width
        hidden = 768 if arch == "pretrained" else HEAD_DIM
        torch.manual_seed(seed)
        vision = CLIPVisionModelWithProjection(config)
        if meta:  # counts and shapes only: the resampler built without reading weights
            from diffusers.models.embeddings import IPAdapterPlusImageProjection

            return cls(vision, IPAdapterPlusImageProjection(config.hidden_size, width, hidden, 4, HEAD_DIM,
                                                            hidden // HEAD_DIM, 16))
        return cls(vision, resampler(random_image_proj(config.hidden_size, width, seed + 1, hidden=hidden)))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        return self.resampler(out.hidden_states[-2]), out.image_embeds
