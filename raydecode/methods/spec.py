"""MethodSpec: the one seam between a method and the infrastructure (train loop, sweeps, evaluation).

Each method module builds one :class:`MethodSpec` and registers it with
:func:`register`; the train loop asks the spec for the model, its trainable
parameter groups, the loss and the predictions, and never imports a method.
Nothing here knows about Ray.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

import torch
from pydantic import BaseModel, ValidationError

from raydecode.config import format_validation_error
from raydecode.errors import ConfigError
from raydecode.nn.context import DatasetInfo, Progress

# -- capabilities: what a method can do beyond the core, declared by listing them in its spec ------------------


@dataclass(frozen=True)
class EmbedsTargets:
    """Frozen image encoders whose outputs batches carry as ``<key>_tokens`` / ``<key>_pooled``:
    ``targets(cfg)`` -> {key: encoder name}, read from the store's embeddings or computed in the loop."""

    targets: Callable[[Any], dict[str, str]]


@dataclass(frozen=True)
class Adapts:
    """Starts from another run's checkpoint (``init_from``, of a method in ``from_methods``; default its own):
    ``load_pretrained(model, state)`` loads what applies and returns the keys left at initialisation."""

    load_pretrained: Callable[[torch.nn.Module, dict[str, torch.Tensor]], list[str]]
    from_methods: tuple[str, ...] = ()


@dataclass(frozen=True)
class NeedsStatistics:
    """Class statistics of the ``init_from`` model over its source subjects (:mod:`raydecode.data.stats`) in the
    embedding ``spaces(cfg)``; ``attach(model, tensors)`` hands them to the model before training."""

    spaces: Callable[[Any], list[str]]
    attach: Callable[[torch.nn.Module, dict[str, torch.Tensor]], None]


@dataclass(frozen=True)
class ReadsWindows:
    """Reads windows of the BOLD time series (batches carry ``bold`` (B, T, width)) instead of betas:
    ``window(cfg)`` -> a :class:`~raydecode.config.WindowConfig`."""

    window: Callable[[Any], Any]


@dataclass(frozen=True)
class ReadsVolume:
    """Needs every subject's voxel coordinates (``DatasetInfo.coords``, from the store's voxel tables): the model
    places betas back on the 3D grid (e.g. MindLink's cubic patches). ``resolve(cfg, store_coords, pretrained)``,
    when given, fixes what the frame depends on at launch: ``store_coords`` holds every subject of the store (not
    only the run's), ``pretrained`` the ``init_from`` checkpoint's method config (or None); it returns the config
    the run (and its checkpoint) keeps."""

    resolve: Callable[[Any, dict[int, Any], dict | None], Any] | None = None


@dataclass(frozen=True)
class FitsRoiPCA:
    """Reduces each ROI of each subject to ``width(cfg)`` dimensions by a PCA fitted before training on the run's
    train trials only (:mod:`raydecode.data.pca`; test trials never enter it). ``groups(cfg)`` lists the ROI
    groups, each a list of the store's voxel ``roi`` labels forming one group; ``DatasetInfo.rois`` carries every
    voxel's label. The driver fits; ``attach(model, tensors)`` hands the model ``<subject>.<group>.mean`` (voxels,)
    and ``<subject>.<group>.components`` (width, voxels) (rows past the ROI's rank are zero): the model keeps them
    as buffers, so checkpoints carry them. ``enabled(cfg)`` false: this configuration reduces no ROI by PCA."""

    groups: Callable[[Any], list[list[str]]]
    width: Callable[[Any], int]
    attach: Callable[[torch.nn.Module, dict[str, torch.Tensor]], None]
    enabled: Callable[[Any], bool] = lambda cfg: True  # a config may not use the PCA (nothing fitted then)


@dataclass(frozen=True)
class RowMetrics:
    """Per-row test values (``values(model, batch)``, e.g. denoising losses) averaged over the test split at every
    evaluation and logged as ``test.<name>``; ``summarize(means)`` may derive more (e.g. gains)."""

    values: Callable[[Any, dict], dict[str, torch.Tensor]]
    summarize: Callable[[dict[str, float]], dict[str, float]] = field(default=lambda means: means)
    headline: str | None = None  # the one a time-resolved curve shows when nothing else is measured (test.<name>)


@dataclass(frozen=True)
class FreezesWeights:
    """Checkpoints hold only ``persisted_keys(model)``; the rest (e.g. a pretrained diffusion UNet) is rebuilt by
    ``build_model`` from the config, and checked against the digest training recorded."""

    persisted_keys: Callable[[torch.nn.Module], set[str]]


@dataclass(frozen=True)
class Reconstructs:
    """Decodes images itself: ``reconstruct(model, batch, seeds, steps, guidance)`` -> uint8 (B, H, W, 3), one seed
    per row (``None`` steps / guidance: the model's ``defaults(cfg)``); ``export(model, out_dir)`` writes its weights
    in their ecosystem's formats (e.g. diffusers LoRA)."""

    reconstruct: Callable[..., torch.Tensor]
    export: Callable[[torch.nn.Module, str], list[str]] | None = None
    defaults: Callable[[Any], tuple[int, float]] = field(default=lambda cfg: (20, 3.0))  # (steps, guidance) of cfg


@dataclass(frozen=True)
class EmbedsImages:
    """Predicts image embeddings an image generator (:mod:`raydecode.evaluate.unclip`) decodes:
    ``image_embeddings(model, batch, seeds)`` -> ``clip_tokens`` (B, N, D) and optionally ``lowlevel_latents``
    (a blurry image's VAE latents)."""

    image_embeddings: Callable[..., dict[str, torch.Tensor]]


C = TypeVar("C")


@dataclass(frozen=True)
class MethodSpec:
    """Everything method-specific the generic loop needs: a small core, plus ``capabilities`` (the classes above)
    for what only some methods do.

    - ``config_model`` / ``presets``: the method's pydantic config and its named sizes (tiny, demo, paper);
    - ``build_model(cfg, info)``: the ``nn.Module`` (all parameters in submodules called through their
      ``forward``, so ZeRO-3 can gather them);
    - ``param_groups(model, cfg, weight_decay)``: trainable parameter groups for the optimizer (a group's
      ``lr_scale`` multiplies ``optim.lr`` for it, under every schedule);
    - ``loss(model, batch, progress)``: ``(loss, metrics)``; ``model`` may be a DeepSpeed engine;
    - ``predict(model, batch)``: named tensors, one row per batch row; evaluation reads ``brain`` and ``image``
      (retrieval embeddings), ``embedding`` (the representation its t-SNE maps; default ``brain``) and ``logits``
      (80-way class scores: the semantic metrics); other names are the method's own (e.g. statistics spaces);
    - ``columns``: batch columns the model reads (``betas_repeats``: the averaged test split also carries each
      repetition's betas, for a model that averages its outputs over them, as MindEye2's reference does).
    """

    name: str
    config_model: type[BaseModel]
    presets: dict[str, dict]
    build_model: Callable[[Any, DatasetInfo], torch.nn.Module]
    param_groups: Callable[[torch.nn.Module, Any, float], list[dict]]
    loss: Callable[[Any, dict, Progress], tuple[torch.Tensor, dict[str, float]]]
    predict: Callable[[Any, dict], dict[str, torch.Tensor]]
    columns: tuple[str, ...]
    capabilities: tuple = ()

    def __post_init__(self):
        kinds = [type(c) for c in self.capabilities]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"method {self.name!r}: a capability is listed twice ({[k.__name__ for k in kinds]})")

    def get(self, kind: type[C]) -> C | None:
        """The capability of class ``kind``, or None if the method does not have it."""
        return next((c for c in self.capabilities if isinstance(c, kind)), None)

    # what the generic code asks, with the answer for methods without the capability

    def targets(self, cfg) -> dict[str, str]:
        cap = self.get(EmbedsTargets)
        return cap.targets(cfg) if cap else {}

    def window(self, cfg):
        cap = self.get(ReadsWindows)
        return cap.window(cfg) if cap else None

    def statistics(self, cfg) -> list[str]:
        cap = self.get(NeedsStatistics)
        return cap.spaces(cfg) if cap else []

    @property
    def init_methods(self) -> tuple[str, ...]:
        """Methods whose checkpoints ``init_from`` may name."""
        cap = self.get(Adapts)
        return (cap.from_methods or (self.name,)) if cap else (self.name,)

    def load_pretrained(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
        cap = self.get(Adapts)
        if cap is None:
            model.load_state_dict(state)
            return []
        return cap.load_pretrained(model, state)

    @property
    def partial_checkpoints(self) -> bool:
        """Checkpoints leave frozen weights out (:class:`FreezesWeights`)."""
        return self.get(FreezesWeights) is not None

    def state_to_save(self, state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``state`` restricted to what checkpoints hold (:class:`FreezesWeights`)."""
        cap = self.get(FreezesWeights)
        if cap is None:
            return state
        keep = cap.persisted_keys(model)
        return {k: v for k, v in state.items() if k in keep}

    def test_values(self, model, batch: dict) -> dict[str, torch.Tensor]:
        cap = self.get(RowMetrics)
        return cap.values(model, batch) if cap else {}

    def test_summary(self, sums: dict[str, float], rows: int) -> dict[str, float]:
        """``test.*`` metrics from the per-row :class:`RowMetrics` summed over ``rows`` rows: their means and what
        the method derives from them (e.g. Dynadiff's condition and image gains)."""
        cap = self.get(RowMetrics)
        if cap is None or not rows or not sums:
            return {}
        return {f"test.{k}": v for k, v in cap.summarize({k: v / rows for k, v in sums.items()}).items()}

    def config(self, preset: str, overrides: dict | None = None) -> BaseModel:
        if preset not in self.presets:
            raise ConfigError(f"preset {preset!r} of method {self.name!r}: allowed values: {', '.join(self.presets)}")
        values = {**self.presets[preset], **(overrides or {})}
        try:
            return self.config_model(**values)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(self.config_model, exc, f"model ({self.name}, preset {preset})")) from None


_REGISTRY: dict[str, MethodSpec] = {}
ENTRY_POINTS = "raydecode.methods"  # other packages' methods: ``[project.entry-points."raydecode.methods"]``
_NOT_METHODS = {"spec"}


def register(spec: MethodSpec) -> MethodSpec:
    """Make ``spec`` known by its name; a second method under a name already taken is refused."""
    known = _REGISTRY.get(spec.name)
    if known is not None and known is not spec:
        raise ValueError(f"method {spec.name!r} is registered twice ({known.build_model.__module__} and "
                         f"{spec.build_model.__module__})")
    _REGISTRY[spec.name] = spec
    return spec


def _builtin() -> dict[str, str]:
    """Method name -> module: every module of this package except :mod:`spec` is one method, named as its file."""
    import raydecode.methods as package

    return {m.name: f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
            if m.name not in _NOT_METHODS and not m.name.startswith("_")}


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)}


def get_method(name: str) -> MethodSpec:
    """The method registered as ``name``, importing its module on first use: ``raydecode/methods/<name>.py``, an
    installed package's ``raydecode.methods`` entry point, or ``module:name`` for a method defined in any importable
    module (e.g. a lab's own package; Ray's workers import it too, so it must be importable there)."""
    module, _, short = name.rpartition(":")
    if short not in _REGISTRY:
        builtin, plugins = _builtin(), _plugins()
        if module:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise ConfigError(f"method {name!r}: module {module!r} does not import ({exc})") from None
        elif short in builtin:
            importlib.import_module(builtin[short])
        elif short in plugins:
            plugins[short].load()
        else:
            raise ConfigError(f"method {name!r}: allowed values: {', '.join(methods())} (or module:name)")
        if short not in _REGISTRY:
            raise ConfigError(f"method {name!r}: its module registers no method named {short!r}")
    return _REGISTRY[short]


def methods() -> list[str]:
    return sorted(set(_builtin()) | set(_plugins()) | set(_REGISTRY))


def count_parameters(model: torch.nn.Module, trainable: Iterable[torch.nn.Parameter] | None = None) -> dict:
    """Parameters per top-level module, total and trainable (works on the meta device)."""
    train_ids = {id(p) for p in (trainable if trainable is not None else model.parameters()) if p.requires_grad}
    rows = {}
    for name, child in model.named_children():
        ps = list(child.parameters())
        rows[name] = {"total": sum(p.numel() for p in ps), "trainable": sum(p.numel() for p in ps if id(p) in train_ids)}
    total = sum(p.numel() for p in model.parameters())
    trainable_n = sum(p.numel() for p in model.parameters() if id(p) in train_ids)
    return {"modules": rows, "total": total, "trainable": trainable_n}
