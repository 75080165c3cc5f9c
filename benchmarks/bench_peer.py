"""(c) Peer: raydecode's MindEye2 training step against the MindEye2 reference's (MedARC-AI/MindEyeV2), same sizes,
same inputs, one process.

    .venv/bin/python benchmarks/bench_peer.py --reference PATH [--prior-deps DIR] [--hidden 1024 --blocks 4
        --tokens 64 416 --batch 8]

The reference is read at run time from a local copy of its repository (a work tree or a bare git repository; or the
environment variable MINDEYEV2_REPO), never vendored; without one the benchmark prints that it was skipped. Only
these definitions are taken from it and executed (``ast``), so its other imports (clip, webdataset, sgm) are not
needed:

- ``src/models.py``: ``BrainNetwork`` (mixer backbone, CLIP projector, blurry branch with diffusers' ``Decoder``);
  with dalle2-pytorch importable also ``PriorNetwork`` / ``BrainDiffusionPrior`` (else the prior is left out of both
  sides, and the output says so). ``--prior-deps DIR`` installs dalle2-pytorch and the pure-Python packages its
  import needs into DIR (``pip --target``, ``--no-deps``, pinned: the project's torch is never touched) and uses them;
- ``src/Train.ipynb``: ``RidgeRegression``;
- ``src/utils.py``: ``mixco``, ``mixco_nce``, ``soft_clip_loss``, ``soft_cont_loss``.

Its step is the notebook's: a ridge map per subject, the backbone, the prior's loss x 30, BiMixCo (``mixco`` on the
voxels, temperature 0.006) or SoftCLIP (0.004), L1 on the VAE latents plus 0.1 x ``soft_cont_loss`` on ConvNeXt
features (x 0.5), AdamW. Ours is ``raydecode.nn.mindeye2`` at the same widths (the paper preset's low-level branch,
which the reference hard-codes: 64 x 7 x 7 maps, decoder 32/64/128, 512-wide auxiliary features). Both get the same
precomputed targets (CLIP tokens, VAE latents, ConvNeXt features of the image and of its augmented copy): the frozen
encoders are not part of either step. Neither clips gradients (the reference does not). Both phases (BiMixCo, then
SoftCLIP) are timed, in interleaved blocks; the ratio is ours / the reference's time per step.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REFERENCE_FILES = ("src/models.py", "src/utils.py", "src/Train.ipynb")
PRIOR_CLASSES = ("BrainDiffusionPrior", "PriorNetwork", "FlaggedCausalTransformer")
# what ``import dalle2_pytorch`` needs beyond this project's environment (versions this benchmark was run with)
PRIOR_PACKAGES = ("dalle2-pytorch==1.15.6", "x-clip==0.14.4", "coca-pytorch==0.1.0", "resize-right==0.0.2",
                  "rotary-embedding-torch==0.9.1", "kornia==0.9.0", "kornia-rs==0.2.0",
                  "vector-quantize-pytorch==1.32.0", "ema-pytorch==0.8.3", "embedding-reader==1.8.1",
                  "webdataset==1.0.2", "pytorch-warmup==0.2.0", "torchmetrics==1.9.0", "clip-anytorch==2.6.0",
                  "beartype==0.23.1", "einx==0.4.3", "lightning-utilities==0.15.3", "frozendict==2.5.1",
                  "loguru==0.7.3", "torch-einops-utils==0.2.0")


def prior_available(deps: str | None) -> tuple[bool, str]:
    """Whether dalle2-pytorch imports (after installing it into ``deps`` when given) -> (ok, why not)."""
    if deps:
        deps = os.path.abspath(deps)
        if not os.path.isdir(os.path.join(deps, "dalle2_pytorch")):
            print(f"installing the reference prior's packages into {deps} (pip --target, --no-deps)", flush=True)
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", deps,
                                   *PRIOR_PACKAGES], capture_output=True, text=True)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
                return False, f"pip install into {deps} failed: {last}"
        sys.path.insert(0, deps)
    try:
        import dalle2_pytorch  # noqa: F401
    except ImportError as exc:
        hint = "" if deps else "; --prior-deps DIR installs it"
        return False, f"dalle2-pytorch does not import ({exc}){hint}"
    return True, ""


def read_reference(path: str) -> dict[str, str]:
    """The reference's three files from a work tree or a (bare) git repository at ``path``."""
    out = {}
    for name in REFERENCE_FILES:
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full) as f:
                out[name] = f.read()
            continue
        proc = subprocess.run(["git", "-C", path, "show", f"HEAD:{name}"], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"bench_peer: {path} holds no {name} (neither a file nor in git HEAD): "
                             f"{proc.stderr.strip()}")
        out[name] = proc.stdout
    return out


def definitions(source: str, names: tuple[str, ...], where: str) -> str:
    """The source of the top-level classes and functions ``names`` in ``source``; a missing one is an error."""
    tree = ast.parse(source)
    found = {node.name: ast.get_source_segment(source, node) for node in tree.body
             if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names}
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"bench_peer: {where} defines no {', '.join(missing)}: not the MindEyeV2 layout")
    return "\n\n".join(found[n] for n in names)


def prior_imports(source: str) -> str:
    """models.py's top-level imports from dalle2_pytorch (the prior's building blocks)."""
    tree = ast.parse(source)
    return "\n".join(ast.get_source_segment(source, node) for node in tree.body
                     if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dalle2_pytorch"))


def load_reference(path: str, with_prior: bool) -> dict:
    """The reference's definitions, executed in one namespace."""
    from diffusers.models.autoencoders.vae import Decoder  # models.py's ``diffusers.models.vae`` before diffusers 0.25

    files = read_reference(path)
    cells = json.loads(files["src/Train.ipynb"])["cells"]
    ridge_cell = next(("".join(c["source"]) for c in cells if c["cell_type"] == "code"
                       and "class RidgeRegression" in "".join(c["source"])), None)
    if ridge_cell is None:
        raise SystemExit("bench_peer: src/Train.ipynb has no cell defining RidgeRegression")
    ns: dict = {"torch": torch, "nn": nn, "F": F, "np": np, "math": math, "Decoder": Decoder}
    code = [definitions(files["src/utils.py"], ("mixco", "mixco_nce", "soft_clip_loss", "soft_cont_loss"),
                        "src/utils.py"),
            definitions(ridge_cell, ("RidgeRegression",), "src/Train.ipynb"),
            definitions(files["src/models.py"], ("BrainNetwork",), "src/models.py")]
    if with_prior:
        code += [prior_imports(files["src/models.py"]),
                 definitions(files["src/models.py"], PRIOR_CLASSES, "src/models.py")]
    exec(compile("\n\n".join(code), f"{path}/src (MindEyeV2 definitions)", "exec"), ns)  # noqa: S102
    return ns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", default=os.environ.get("MINDEYEV2_REPO"),
                    help="a local MindEyeV2 repository (work tree or bare git); default $MINDEYEV2_REPO")
    ap.add_argument("--prior-deps", default=None, metavar="DIR",
                    help="install dalle2-pytorch (the reference prior's library) into DIR if not there, and use it")
    ap.add_argument("--hidden", type=int, default=1024, help="shared latent width (the reference notebook's 1024)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs=2, default=(64, 416),
                    help="CLIP target (tokens, width); width a multiple of the reference prior's 52-wide heads "
                         "(paper: 256 1664)")
    ap.add_argument("--voxels", type=int, nargs="+", default=[15724, 14278], help="voxels per subject")
    ap.add_argument("--batch", type=int, default=8, help="rows per subject per step")
    ap.add_argument("--steps", type=int, default=5, help="steps per block")
    ap.add_argument("--repeats", type=int, default=3, help="blocks per variant, interleaved")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    args = ap.parse_args()
    if not args.reference:
        print("peer benchmark skipped: no MindEyeV2 repository (pass --reference PATH or set MINDEYEV2_REPO to a "
              "clone of https://github.com/MedARC-AI/MindEyeV2)")
        print("RESULT bench_peer skipped=no-reference")
        return
    with_prior, why_not = prior_available(args.prior_deps)

    from raydecode.methods.spec import Progress, get_method
    from raydecode.nn.context import DatasetInfo

    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    ref = load_reference(os.path.expanduser(args.reference), with_prior)
    n_tok, width = args.tokens
    if width % 52:
        raise SystemExit(f"bench_peer: --tokens width {width} is not a multiple of 52 (the reference prior's head "
                         "width)")
    subjects = list(range(1, len(args.voxels) + 1))
    b = args.batch * len(subjects)

    # -- the same inputs for both ------------------------------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    per_subject = [torch.randn(args.batch, v, generator=g) for v in args.voxels]
    widest = max(args.voxels)
    betas = torch.cat([F.pad(x, (0, widest - x.shape[1])) for x in per_subject])
    subject = torch.repeat_interleave(torch.tensor(subjects), args.batch)
    clip_target = torch.randn(b, n_tok, width, generator=g)
    vae = torch.randn(b, 4, 28, 28, generator=g)
    cnx, cnx_aug = torch.randn(b, 49, 512, generator=g), torch.randn(b, 49, 512, generator=g)

    # -- ours ----------------------------------------------------------------------------------------------------
    spec = get_method("mindeye2")
    mcfg = spec.config("paper").model_copy(update={
        "hidden": args.hidden, "blocks": args.blocks, "clip_tokens": (n_tok, width), "prior": with_prior,
        "prior_depth": 6, "prior_heads": width // 52})
    info = DatasetInfo(subjects=subjects, voxels=dict(zip(subjects, args.voxels)))
    torch.manual_seed(0)
    ours = spec.build_model(mcfg, info)
    ours_opt = torch.optim.AdamW(spec.param_groups(ours, mcfg, 1e-2), lr=3e-4)
    batch = {"betas": betas, "subject": subject, "clip_tokens": clip_target.flatten(1), "vae_tokens": vae.flatten(1),
             "cnx_tokens": cnx, "cnx_aug_tokens": cnx_aug}

    def ours_step(mixup: bool):
        ours_opt.zero_grad(set_to_none=True)
        progress = Progress(0, 1, 0 if mixup else 999, 1000)
        loss, _ = spec.loss(ours, batch, progress)
        loss.backward()
        ours_opt.step()

    # -- the reference (the notebook's step) ---------------------------------------------------------------------
    torch.manual_seed(0)
    model = nn.Module()
    model.ridge = ref["RidgeRegression"](args.voxels, out_features=args.hidden)
    model.backbone = ref["BrainNetwork"](h=args.hidden, in_dim=args.hidden, seq_len=1, n_blocks=args.blocks,
                                         clip_size=width, out_dim=width * n_tok, blurry_recon=True, clip_scale=1.0)
    if with_prior:
        net = ref["PriorNetwork"](dim=width, depth=6, dim_head=52, heads=width // 52, causal=False,
                                  num_tokens=n_tok, learned_query_mode="pos_emb")
        model.diffusion_prior = ref["BrainDiffusionPrior"](net=net, image_embed_dim=width,
                                                           condition_on_text_encodings=False, timesteps=100,
                                                           cond_drop_prob=0.2, image_embed_scale=None)
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    groups = [{"params": list(model.ridge.parameters()), "weight_decay": 1e-2}]
    for part in [m for m in ("backbone", "diffusion_prior") if hasattr(model, m)]:
        named = list(getattr(model, part).named_parameters())
        groups += [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": 1e-2},
                   {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]
    ref_opt = torch.optim.AdamW(groups, lr=3e-4)
    l1 = nn.L1Loss()

    def ref_step(mixup: bool):
        ref_opt.zero_grad()
        loss = 0.0
        voxel_list = [x.clone().unsqueeze(1) for x in per_subject]
        if mixup:
            mixed = [ref["mixco"](v) for v in voxel_list]
            voxel_list = [m[0] for m in mixed]
            perm = torch.cat([m[1] for m in mixed])
            mix_betas = torch.cat([m[2] for m in mixed])
            select = torch.cat([m[3] for m in mixed])
        voxel_ridge = torch.cat([model.ridge(v, si) for si, v in enumerate(voxel_list)], dim=0)
        backbone, clip_voxels, (image_enc_pred, transformer_feats) = model.backbone(voxel_ridge)
        clip_voxels_norm = F.normalize(clip_voxels.flatten(1), dim=-1)
        clip_target_norm = F.normalize(clip_target.flatten(1), dim=-1)
        if with_prior:
            loss_prior, _ = model.diffusion_prior(text_embed=backbone, image_embed=clip_target)
            loss = loss + 30 * loss_prior
        if mixup:
            loss_clip = ref["mixco_nce"](clip_voxels_norm, clip_target_norm, temp=.006, perm=perm, betas=mix_betas,
                                         select=select)
        else:
            loss_clip = ref["soft_clip_loss"](clip_voxels_norm, clip_target_norm, temp=0.004)
        loss = loss + loss_clip
        loss_blurry = l1(image_enc_pred, vae)
        cont = ref["soft_cont_loss"](F.normalize(transformer_feats.reshape(-1, 512), dim=-1),
                                     F.normalize(cnx.reshape(-1, 512), dim=-1),
                                     F.normalize(cnx_aug.reshape(-1, 512), dim=-1), temp=0.2)
        loss = loss + (loss_blurry + 0.1 * cont) * 0.5
        loss.backward()
        ref_opt.step()

    def count(m: nn.Module) -> float:
        return sum(p.numel() for p in m.parameters()) / 1e6

    prior_note = "included" if with_prior else f"left out of both sides: {why_not}"
    print(f"reference: {args.reference} (prior {prior_note})")
    print(f"sizes: hidden {args.hidden}, {args.blocks} blocks, CLIP tokens {n_tok} x {width}, voxels {args.voxels}, "
          f"{args.batch} rows per subject ({b} a step); parameters: ours {count(ours):.1f} M, "
          f"reference {count(model):.1f} M; {torch.get_num_threads()} threads")

    variants = {f"{who} {phase}": (fn, phase == "bimixco") for who, fn in (("ours", ours_step), ("reference", ref_step))
                for phase in ("bimixco", "softclip")}
    ours.train(), model.train()
    for fn, mixup in variants.values():  # warm-up
        fn(mixup)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, (fn, mixup) in variants.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn(mixup)
            times[name].append((time.perf_counter() - t0) / args.steps)
    print(f"\n{'variant':<20} {'ms/step median':>15} {'min':>8} {'max':>8}")
    for name, ts in times.items():
        print(f"{name:<20} {1e3 * statistics.median(ts):>15.1f} {1e3 * min(ts):>8.1f} {1e3 * max(ts):>8.1f}")
    ratios = {phase: statistics.median(times[f"ours {phase}"]) / statistics.median(times[f"reference {phase}"])
              for phase in ("bimixco", "softclip")}
    print("\nours / reference, time per step (< 1: ours faster): "
          + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(f"RESULT bench_peer bimixco={ratios['bimixco']:.3f} softclip={ratios['softclip']:.3f} "
          f"prior={'yes' if with_prior else 'no'}")


if __name__ == "__main__":
    sys.exit(main())
