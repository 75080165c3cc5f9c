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
from typing import Any, Callable, Iterable

import torch
from pydantic import BaseModel, ValidationError

from raydecode.config import format_validation_error
from raydecode.errors import ConfigError
from raydecode.nn.context import DatasetInfo, Progress


@dataclass(frozen=True)
class MethodSpec:
    """Everything method-specific the generic loop needs.

    - ``config_model`` / ``presets``: the method's pydantic config and its named sizes (tiny, demo, paper);
    - ``build_model(cfg, info)``: the ``nn.Module`` (all parameters in submodules called through their
      ``forward``, so ZeRO-3 can gather them);
    - ``param_groups(model, cfg, weight_decay)``: trainable parameter groups for the optimizer;
    - ``loss(model, batch, progress)``: ``(loss, metrics)``; ``model`` may be a DeepSpeed engine;
    - ``predict(model, batch)``: tensors evaluation consumes (e.g. ``brain`` and ``image`` retrieval embeddings);
    - ``columns``: batch columns the model reads; ``targets(cfg)``: frozen encoders whose outputs the batch
      must carry as ``<key>_tokens`` / ``<key>_pooled``;
    - ``load_pretrained(model, state)``: start from the ``init_from`` checkpoint (of a method in
      ``init_methods``); returns the keys left at initialisation;
    - ``statistics(cfg)``: embedding spaces of the ``init_from`` model whose class statistics over its source
      subjects (:mod:`raydecode.data.stats`) training needs; ``attach_statistics(model, tensors)`` hands them over;
    - ``windows(cfg)``: a :class:`~raydecode.data.windows.WindowConfig` for methods that read windows of the BOLD
      time series (batches carry ``bold`` (B, T, width)) instead of betas; None for betas;
    - ``test_metrics(model, batch)``: per-row test values (averaged over the test split every evaluation, logged as
      ``test.<name>``), then ``summarize_test(means)`` may derive more;
    - ``persisted_keys(model)``: the state-dict keys checkpoints hold (default all; e.g. not a frozen diffusion
      UNet, which ``build_model`` rebuilds from its path);
    - ``reconstruct(model, batch, seeds, steps, guidance)``: images (B, H, W, 3) uint8 decoded from the batch,
      one seed per row; ``export(model, out_dir)``: the method's weights in their ecosystem's formats (files).
    - ``image_embeddings(model, batch, seeds, steps, guidance)``: CLIP-space methods: the predicted image tokens
      (``clip_tokens`` (B, N, D)) and optionally ``lowlevel_latents`` (a blurry image's VAE latents) that an
      image generator (:mod:`raydecode.evaluate.unclip`) turns into reconstructions.
    """

    name: str
    config_model: type[BaseModel]
    presets: dict[str, dict]
    build_model: Callable[[Any, DatasetInfo], torch.nn.Module]
    param_groups: Callable[[torch.nn.Module, Any, float], list[dict]]
    loss: Callable[[Any, dict, Progress], tuple[torch.Tensor, dict[str, float]]]
    predict: Callable[[Any, dict], dict[str, torch.Tensor]]
    columns: tuple[str, ...]
    targets: Callable[[Any], dict[str, str]] = field(default=lambda cfg: {})
    load_pretrained: Callable[[torch.nn.Module, dict[str, torch.Tensor]], list[str]] | None = None
    init_methods: tuple[str, ...] = ()  # methods whose checkpoints ``init_from`` may name (default: its own)
    statistics: Callable[[Any], list[str]] = field(default=lambda cfg: [])
    attach_statistics: Callable[[torch.nn.Module, dict[str, torch.Tensor]], None] | None = None
    windows: Callable[[Any], Any] = field(default=lambda cfg: None)
    test_metrics: Callable[[Any, dict], dict[str, torch.Tensor]] | None = None
    summarize_test: Callable[[dict[str, float]], dict[str, float]] = field(default=lambda means: means)
    persisted_keys: Callable[[torch.nn.Module], set[str]] | None = None
    reconstruct: Callable[..., torch.Tensor] | None = None
    export: Callable[[torch.nn.Module, str], list[str]] | None = None
    image_embeddings: Callable[..., dict[str, torch.Tensor]] | None = None

    def state_to_save(self, state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``state`` restricted to :attr:`persisted_keys`."""
        if self.persisted_keys is None:
            return state
        keep = self.persisted_keys(model)
        return {k: v for k, v in state.items() if k in keep}

    def test_summary(self, sums: dict[str, float], rows: int) -> dict[str, float]:
        """``test.*`` metrics from the per-row :attr:`test_metrics` summed over ``rows`` rows: their means and what
        :attr:`summarize_test` derives from them (e.g. Dynadiff's condition and image gains)."""
        if not rows or not sums:
            return {}
        return {f"test.{k}": v for k, v in self.summarize_test({k: v / rows for k, v in sums.items()}).items()}

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
    """The method registered as ``name``, importing its module on first use (``raydecode/methods/<name>.py``, or an
    installed package's ``raydecode.methods`` entry point)."""
    if name not in _REGISTRY:
        builtin, plugins = _builtin(), _plugins()
        if name in builtin:
            importlib.import_module(builtin[name])
        elif name in plugins:
            plugins[name].load()
        else:
            raise ConfigError(f"method {name!r}: allowed values: {', '.join(methods())}")
        if name not in _REGISTRY:
            raise ConfigError(f"method {name!r}: its module registers no method of that name")
    return _REGISTRY[name]


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
