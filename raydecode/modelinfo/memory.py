"""``raydecode model-info --memory``: what a method needs per GPU, and the largest batch that fits.

Two parts, per GPU, for N data-parallel GPUs under DeepSpeed ZeRO stage 0-3:

- **model states**, from the parameter counts (trainable Psi_t, all Psi; the largest layer L for ZeRO-3's gathered
  parameters), with DeepSpeed's own accounting: bf16 keeps 16-bit weights (2 Psi) and, per trainable parameter,
  16-bit gradients (2), fp32 gradients (4), fp32 master weights (4) and Adam's two moments (8) = 18 Psi_t; ZeRO-1
  partitions the fp32 parts (16 Psi_t / N), ZeRO-2 the gradients too (18 Psi_t / N), ZeRO-3 the 16-bit weights
  as well, its gradients going straight into the fp32 partitions (2 Psi / N + 16 Psi_t / N + 4 L). fp32 (CPU) keeps 4 Psi weights + 4 Psi_t gradients + 8 Psi_t moments.
  For a fully trainable model these are DeepSpeed's ``estimate_zero2/3_model_states_mem_needs`` without offload;
- **activations**, measured, not modelled: the most bytes alive at once during one ``spec.loss`` of the method and its
  backward (a batch of the store's shapes, the target encoders' output shapes from their architectures), counted per
  storage by a ``TorchDispatchMode`` (:class:`LiveBytes`) that logs every tensor an op creates and when it is freed,
  the parameters, their gradients and the batch left out: what autograd saves for backward and the transients beside
  it at the peak (an op's output before the next op consumes it, the activations' gradients in backward). Measured
  at three batch sizes and fitted as ``bytes = fixed + per_sample x B + per_pair x B^2``. Every row of the measured
  batches is the widest subject's (an upper bound), so tensor sizes are polynomials in the batch and three sizes give
  the coefficients exactly: the quadratic term is the contrastive losses' similarity matrices (MindEye2's
  ``soft_cont_loss`` over its (B x 16)^2 ConvNeXt token pairs), which a line through two small batches missed. The
  model is built on the meta device and given uninitialised CPU memory (``to_empty``): the values do not matter, the
  shapes do; fp32 here, half of it in bf16.

- **frozen encoders** every worker holds whatever the store has embedded: the target encoders that ``augment``
  (MindEye2's ConvNeXt-XL, run on a fresh augmented view every step), in fp32 as the train loop builds them.
  Other targets are assumed embedded in the store (``raydecode embed``), as the NSD jobs do.

The largest batch per GPU is what fits in ``usable`` (default 90 %) of its memory beside the model states.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from raydecode.errors import ConfigError
from raydecode.methods.spec import DatasetInfo, Progress, get_method
from raydecode.modelinfo.info import dataset_info
from raydecode.nn.encoders import FrozenEncoder, augments, encoder_config
from raydecode.report import table

GB = 1e9
GPU_SIZES_GB = (24, 40, 80, 141)


def model_states_bytes(total: int, trainable: int, zero: int, gpus: int, precision: str = "bf16",
                       largest_layer: int = 0) -> int:
    """Per-GPU bytes of weights, gradients and optimizer states (Adam) under ZeRO ``zero`` on ``gpus`` GPUs."""
    n = max(1, gpus)
    if precision == "fp32":
        weights, grads16, fp32_parts = 4 * total, 0, 12 * trainable  # fp32 grads + Adam moments
    else:
        weights, grads16, fp32_parts = 2 * total, 2 * trainable, 16 * trainable  # + fp32 grads, master, moments
    if zero == 0:
        return int(weights + grads16 + fp32_parts)
    if zero == 1:
        return int(weights + grads16 + fp32_parts / n)
    if zero == 2:
        return int(weights + (grads16 + fp32_parts) / n)
    # ZeRO-3 reduce-scatters 16-bit gradients straight into the fp32 partitions; the largest layer is gathered
    return int((weights + fp32_parts) / n + 4 * largest_layer)


@dataclass(frozen=True)
class Activations:
    per_sample: float  # bytes per sample (fp32)
    fixed: float  # bytes independent of the batch (fp32)
    per_pair: float = 0.0  # bytes per batch size squared (fp32): B x B similarity matrices

    def at(self, batch: int, precision: str = "bf16") -> float:
        scale = 0.5 if precision == "bf16" else 1.0
        return scale * (self.fixed + self.per_sample * batch + self.per_pair * batch * batch)

    def max_batch(self, room: float, precision: str = "bf16") -> int:
        """The largest batch whose batch-dependent activations fit in ``room`` bytes (``fixed`` already taken)."""
        scale = 0.5 if precision == "bf16" else 1.0
        a, b = scale * self.per_pair, scale * self.per_sample
        if room <= 0:
            return 0
        if a <= 0:
            return int(room // b)
        n = int((-b + math.sqrt(b * b + 4 * a * room)) / (2 * a))
        return n - 1 if a * n * n + b * n > room else n


def target_shapes(spec, mcfg) -> dict[str, tuple[tuple[int, ...], int]]:
    """Per target key, its encoder's (tokens shape, pooled width), from the architecture on the meta device."""
    shapes = {}
    for key, name in spec.targets(mcfg).items():
        enc = FrozenEncoder(encoder_config(name), architecture_only=True)
        shapes[key] = (tuple(enc.tokens_shape), enc.pooled_dim)
    return shapes


def resident_encoders(spec, mcfg) -> dict[str, int]:
    """Bytes of each frozen target encoder every worker holds (those that augment; fp32), by encoder name."""
    out = {}
    for name in spec.targets(mcfg).values():
        cfg = encoder_config(name)
        if augments(cfg):
            enc = FrozenEncoder(cfg, architecture_only=True)
            out[cfg.name] = 4 * sum(p.numel() for p in enc.parameters())
    return out


def fake_batch(spec, mcfg, info: DatasetInfo, batch: int,
               targets: dict[str, tuple[tuple[int, ...], int]] | None = None,
               widest_only: bool = False) -> dict[str, torch.Tensor]:
    """A batch of the shapes the training loop hands ``spec.loss``: the method's columns and its targets
    (``targets``: :func:`target_shapes`, computed here when not given); its rows cycle through the subjects, or
    (``widest_only``) all belong to the subject with the most voxels: what the planner measures, an upper bound
    whose sizes grow as polynomials in the batch (with cycling subjects a small batch holds only some of the
    per-subject ridge maps' widths)."""
    widest = max(info.subjects, key=lambda s: info.voxels[s])
    subjects = (torch.full((batch,), widest) if widest_only
                else torch.tensor(info.subjects)[torch.arange(batch) % len(info.subjects)])
    out: dict[str, torch.Tensor] = {"subject": subjects, "image_id": torch.arange(batch)}
    for col in spec.columns:
        if col == "betas":
            out["betas"] = torch.randn(batch, info.width)
        elif col == "bold":
            window = spec.window(mcfg)
            out["bold"] = torch.randn(batch, window.n_samples(info.tr_s), info.width)
        elif col == "categories":
            out["categories"] = (torch.rand(batch, info.n_classes) < 0.1).float()
        elif col == "betas_repeats":  # the averaged test split's: no training batch has it
            continue
        elif col not in out:
            raise NotImplementedError(f"memory planner: no shape for column {col!r} of method {spec.name!r}")
    names = spec.targets(mcfg)
    for key, (tokens, pooled) in (targets if targets is not None else target_shapes(spec, mcfg)).items():
        out[f"{key}_tokens"] = torch.randn(batch, *tokens)
        out[f"{key}_pooled"] = torch.randn(batch, pooled)
        if augments(encoder_config(names[key])):
            out[f"{key}_aug_tokens"] = torch.randn(batch, *tokens)
    return out


def build_for_measurement(spec, mcfg, info: DatasetInfo) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The model on uninitialised CPU memory (built on meta: no initialisation, no weights read), only its trainable
    parameters requiring gradients."""
    with torch.device("meta"):
        model = spec.build_model(mcfg, info)
        trainable = [p for g in spec.param_groups(model, mcfg, 0.0) for p in g["params"]]
    ids = {id(p) for p in trainable}
    keep = {n for n, p in model.named_parameters() if id(p) in ids}  # by name: to_empty makes new tensors
    real = {n: b for n, b in model.named_buffers() if not b.is_meta}  # data built for real (e.g. index tables)
    model = model.to_empty(device="cpu")
    for name, value in real.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attr, value, persistent=attr not in
                                                   model.get_submodule(owner)._non_persistent_buffers_set)
    _materialize_attributes(model)
    named = dict(model.named_parameters())
    for n, p in named.items():
        p.requires_grad_(n in keep)
    return model, [named[n] for n in sorted(keep)]


def _materialize_attributes(model: torch.nn.Module) -> None:
    """State outside parameters and buffers that was built on the meta device: plain tensors get CPU memory,
    diffusers schedulers (their ``alphas_cumprod`` ...) are rebuilt from their config."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(module, name, torch.zeros_like(value, device="cpu"))
            elif hasattr(value, "from_config") and hasattr(value, "config") and not isinstance(value, torch.nn.Module):
                setattr(module, name, type(value).from_config(value.config))


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensors that ops create while the mode is on, alive over time: every new storage an op returns
    (on the calling thread and autograd's backward, whose ops run under the same mode) is logged with its size, and
    again when it is freed (a weak reference's finalizer). :meth:`peak` replays that log, optionally without some
    storages (the parameters' gradients, which the model states count). Storages in ``skip`` (by data pointer: the
    parameters, buffers and inputs) are not counted; a view shares its storage and is counted once."""

    def __init__(self, skip: set[int] = frozenset()):
        super().__init__()
        self.skip = set(skip)
        self.ids: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> its number in the log
        self.log: list[tuple[int, int]] = []  # (number, bytes) when created, (number, -1) when freed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                if st.data_ptr() in self.skip or st in self.ids:
                    continue
                n = self.ids[st] = len(self.log)  # unique: the log only grows
                self.log.append((n, st.nbytes()))
                weakref.finalize(st, self.log.append, (n, -1))
        return out

    def number(self, t: torch.Tensor) -> int | None:
        """The log number of ``t``'s storage, None when the mode did not create it."""
        return self.ids.get(t.untyped_storage())

    def peak(self, without: set[int] = frozenset()) -> int:
        """The most bytes alive at once, the storages numbered in ``without`` left out."""
        size: dict[int, int] = {}
        live = peak = 0
        for n, nbytes in self.log:
            if n in without:
                continue
            if nbytes >= 0:
                size[n] = nbytes
                live += nbytes
                peak = max(peak, live)
            else:
                live -= size.pop(n, 0)
        return peak


def step_peak_bytes(spec, mcfg, info: DatasetInfo, model: torch.nn.Module, batch: int,
                    shapes: dict[str, tuple[tuple[int, ...], int]] | None = None) -> int:
    """The peak bytes alive during one ``spec.loss`` and its backward on a ``batch`` of the widest subject's rows:
    what autograd saves plus the transients beside it (an op's output before the next consumes it, the gradients of
    activations in backward); the parameters, buffers, the batch itself and the parameters' gradients left out (the
    model states count those)."""
    skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    data = fake_batch(spec, mcfg, info, batch, shapes, widest_only=True)
    skip |= {t.untyped_storage().data_ptr() for t in data.values()}
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)
    with LiveBytes(skip) as live:
        loss, _ = spec.loss(model, data, Progress(0, 1, 0, 1))
        loss.backward()
        del loss
    grads = {live.number(p.grad) for p in model.parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    return live.peak(grads)


def measure_activations(spec, mcfg, info: DatasetInfo, model: torch.nn.Module,
                        batch_sizes: tuple[int, ...] = (2, 3, 4)) -> Activations:
    """The peak bytes of one ``spec.loss`` and its backward (:func:`step_peak_bytes`) at ``batch_sizes``, fitted
    (see the module doc): a line through two sizes, a parabola through three."""
    if len(batch_sizes) not in (2, 3) or len(set(batch_sizes)) != len(batch_sizes):
        raise ConfigError(f"activations are measured at 2 or 3 distinct batch sizes, not {batch_sizes}")
    shapes = target_shapes(spec, mcfg)  # once: building ViT-bigG even on meta takes seconds
    totals = [step_peak_bytes(spec, mcfg, info, model, b, shapes) for b in batch_sizes]
    if len(batch_sizes) == 2:
        (b1, b2), (t1, t2) = batch_sizes, totals
        per = max(0.0, (t2 - t1) / (b2 - b1))
        return Activations(per, max(0.0, t1 - per * b1))
    # the parabola through the three points (Lagrange's form, in exact float arithmetic on byte counts)
    (x1, x2, x3), (y1, y2, y3) = batch_sizes, totals
    pair = ((y3 - y1) / (x3 - x1) - (y2 - y1) / (x2 - x1)) / (x3 - x2)
    per = (y2 - y1) / (x2 - x1) - pair * (x1 + x2)
    fixed = y1 - per * x1 - pair * x1 * x1
    return Activations(max(0.0, per), max(0.0, fixed), max(0.0, pair))


# model keys that name pretrained weights: the planner builds their architectures from the preset instead (nothing
# is fetched; Versatile Diffusion's UNet is the paper preset's unet_config)
WEIGHT_KEYS = ("unet",)


def job_settings(path: str) -> dict:
    """method, preset, model overrides, per-GPU batch, GPUs and ZeRO stage of a training job's YAML
    (jobs/*-nsd.yaml)."""
    import yaml

    try:
        data = yaml.safe_load(open(path)) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    model = {k: v for k, v in (data.get("model") or {}).items() if k not in WEIGHT_KEYS}
    if isinstance(model.get("vae"), dict):
        model["vae"] = {k: v for k, v in model["vae"].items() if k != "weights"}
    return {"method": data.get("method", "mindeye2"), "preset": data.get("preset", "demo"), "overrides": model,
            "batch": (data.get("optim") or {}).get("batch_size"),
            "gpus": (data.get("scaling") or {}).get("num_workers"),
            "zero": int((data.get("deepspeed") or {}).get("zero_stage", 0))}


def memory_plan(method: str, preset: str, voxels: list[int] | None = None, overrides: dict | None = None,
                gpus: int = 8, gpu_sizes_gb: tuple[int, ...] = GPU_SIZES_GB, usable: float = 0.9,
                batch_sizes: tuple[int, ...] = (2, 3, 4)) -> dict:
    """Model states and the largest per-GPU batch for ``gpu_sizes_gb`` x ZeRO 0-3 on ``gpus`` GPUs (bf16)."""
    spec = get_method(method)
    mcfg = spec.config(preset, overrides)
    info = dataset_info(preset, voxels)
    model, trainable = build_for_measurement(spec, mcfg, info)
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in trainable)
    largest = max((p.numel() for p in model.parameters()), default=0)
    act = measure_activations(spec, mcfg, info, model, batch_sizes)
    frozen = resident_encoders(spec, mcfg)
    rows = []
    for zero in range(4):
        states = model_states_bytes(total, n_train, zero, gpus, "bf16", largest)
        fits = {}
        for size in gpu_sizes_gb:
            room = usable * size * GB - states - act.at(0) - sum(frozen.values())
            fits[size] = act.max_batch(room) if act.per_sample > 0 or act.per_pair > 0 else None
        rows.append({"zero": zero, "states_gb": states / GB, "max_batch": fits})
    return {"method": method, "preset": preset, "voxels": info.voxels, "gpus": gpus, "usable": usable,
            "params": total, "trainable": n_train, "largest_layer": largest,
            "activations_per_sample_gb_bf16": 0.5 * act.per_sample / GB, "activations_fixed_gb_bf16": 0.5 * act.fixed / GB,
            "activations_per_pair_gb_bf16": 0.5 * act.per_pair / GB,
            "frozen_encoders_gb": {k: v / GB for k, v in frozen.items()},
            "zero": rows, "gpu_sizes_gb": list(gpu_sizes_gb)}


def format_memory_plan(plan: dict, batch: int | None = None) -> str:
    sizes = plan["gpu_sizes_gb"]
    head = (f"{plan['method']} ({plan['preset']}), {plan['params']:,} parameters ({plan['trainable']:,} trainable), "
            f"{plan['gpus']} GPUs, bf16 + fp32 Adam states\nactivations (bf16): "
            f"{plan['activations_per_sample_gb_bf16'] * 1e3:.1f} MB per sample + "
            + (f"{plan['activations_per_pair_gb_bf16'] * 1e6:.1f} KB x batch^2 + "
               if plan.get("activations_per_pair_gb_bf16") else "")
            + f"{plan['activations_fixed_gb_bf16'] * 1e3:.1f} MB; usable memory {plan['usable']:.0%} of each GPU\n")
    if plan.get("frozen_encoders_gb"):
        head += ("frozen target encoders on every GPU (fp32): "
                 + ", ".join(f"{k} {v:.2f} GB" for k, v in plan["frozen_encoders_gb"].items()) + "\n")
    rows = [[f"ZeRO-{r['zero']}", f"{r['states_gb']:.1f}"]
            + [("-" if r["max_batch"][s] is None else ("does not fit" if r["max_batch"][s] == 0
                                                        else str(r["max_batch"][s]))) for s in sizes]
            for r in plan["zero"]]
    out = head + table(["stage", "model states GB/GPU"] + [f"max batch/GPU {s} GB" for s in sizes], rows)
    if batch:
        advice = []
        for s in sizes:
            ok = [r["zero"] for r in plan["zero"] if (r["max_batch"][s] or 0) >= batch]
            advice.append(f"{s} GB: " + (f"deepspeed.zero_stage {ok[0]}" if ok else
                                          f"does not fit at batch {batch}: lower optim.batch_size or add GPUs"))
        out += f"\n\nat optim.batch_size {batch}: " + "; ".join(advice)
    return out
