"""The suite's evaluation protocols: which test rows each one reads and how its metrics are named.

- ``averaged``: every shared test image once, its repetitions averaged (MindEye2's protocol);
- ``single``: one drawn presentation per test image (Dynadiff's single-trial protocol);
- ``shift+K`` / ``shift-K``: ``averaged`` on time-series windows moved by K TRs, W(t + K*TR, d) (Dynadiff's
  time-resolved decoding, Sec. 3.1): any method that reads windows gets it. With ``averaged`` as K = 0 the
  shifted protocols make the time-resolved curve (:func:`time_resolved`): ``time_resolved.json`` / ``.png``.
"""

from __future__ import annotations

import json
import os

from raydecode.config import DataSelection, EvaluateConfig, WindowConfig, protocol_infix, protocol_shift
from raydecode.data.pipeline import trials_dataset
from raydecode.data.windows import windows_dataset
from raydecode.errors import ConfigError
from raydecode.evaluate.images import time_curve_png
from raydecode.methods.spec import RowMetrics, get_method
from raydecode.report import table


def method_window(config: dict) -> WindowConfig | None:
    """The time-series window a trained model reads (None: it reads trials)."""
    spec = get_method(config["method"])
    return spec.window(spec.config_model(**config["model"]))


def check_protocols(cfg: EvaluateConfig, config: dict) -> None:
    """Shifted protocols need a model that reads windows (and a store with a TR)."""
    shifted = [p for p in cfg.protocols if protocol_shift(p)]
    if shifted and method_window(config) is None:
        raise ConfigError(f"protocols {', '.join(shifted)}: method {config['method']!r} reads trials, not "
                          "time-series windows (shifted protocols are for window-reading methods such as dynadiff)")


def test_selection(cfg: EvaluateConfig, config: dict, protocol: str) -> DataSelection:
    """What a protocol reads of the store's test split: the model's subjects and frozen targets, images and
    categories, repetitions averaged or one drawn presentation."""
    return cfg.data.model_copy(update={
        "subjects": cfg.subjects or config["info"]["subjects"], "sessions": None, "images": True, "categories": True,
        "embeddings": sorted(t["encoder"] for t in config["targets"].values() if t["source"] == "store"),
        "average_test_repeats": protocol != "single",
        "keep_test_repeats": protocol == "averaged" and "betas_repeats" in get_method(config["method"]).columns,
        "single_test_trial_seed": cfg.reconstruct.seed if protocol == "single" else None})


def test_rows(cfg: EvaluateConfig, config: dict, protocol: str):
    """One protocol's test split as a Ray dataset (trials, or time-series windows for methods that read them),
    without its stimulus columns: the suite adds them once for every protocol (:func:`with_stimuli`)."""
    window = method_window(config)
    sel = test_selection(cfg, config, protocol).model_copy(update={"images": False, "categories": False,
                                                                    "embeddings": []})
    if window is not None:
        return windows_dataset(cfg.store, "test", window, sel, cfg.s3, shift=protocol_shift(protocol) or 0).dataset
    return trials_dataset(cfg.store, "test", sel, cfg.s3).dataset


def named(metrics: dict[str, float], protocol: str) -> dict[str, float]:
    """``averaged`` keeps the names; another protocol's become ``<kind>.<protocol>.<name>`` (``recon.single.ssim``,
    ``test.shift-2.image_gain``)."""
    if protocol == "averaged":
        return dict(metrics)
    infix = protocol_infix(protocol)
    return {(f"{k.split('.', 1)[0]}.{infix}.{k.split('.', 1)[1]}" if "." in k else f"{infix}.{k}"): v
            for k, v in metrics.items()}


# -- the time-resolved curve ---------------------------------------------------------------------------------------


def time_resolved(metrics_by_protocol: dict[str, dict[str, float]], config: dict) -> list[dict]:
    """One point per shift (``averaged`` is shift 0), in time order: the shift, the window's start and end (s after
    image onset) and that protocol's metrics. Empty without shifted protocols."""
    shifts = {p: protocol_shift(p) for p in metrics_by_protocol}
    if not any(shifts.values()):
        return []
    window, tr = method_window(config), config["info"]["tr_s"]
    points = []
    for p, m in metrics_by_protocol.items():
        k = shifts[p] if p != "averaged" else 0
        if k is None:
            continue
        points.append({"shift": k, "window_start_s": round(window.start_s + k * tr, 4),
                       "window_end_s": round(window.end_s(tr, k), 4),
                       **{name: v for name, v in m.items() if name != "rows"}})
    return sorted(points, key=lambda point: point["shift"])


def curve_metric(points: list[dict], method: str) -> str | None:
    """What the curve shows: PixCorr when every shift was reconstructed, else retrieval, else the method's
    headline test value (:class:`~raydecode.methods.spec.RowMetrics`), else its first test value."""
    common = set.intersection(*(set(p) for p in points)) if points else set()
    cap = get_method(method).get(RowMetrics)
    preferred = ["recon.pixcorr", "retrieval.brain_to_image_top1"] + (
        [f"test.{cap.headline}"] if cap is not None and cap.headline else [])
    for key in preferred + sorted(k for k in common if k.startswith("test.")):
        if key in common:
            return key
    return None


def write_time_resolved(points: list[dict], key: str | None, out_dir: str, label: str = "general model") -> list[str]:
    """``time_resolved.json`` (every point) and ``time_resolved.png`` (``key`` against the window's end)."""
    with open(os.path.join(out_dir, "time_resolved.json"), "w") as f:
        json.dump(points, f, indent=1)
    if key is None:
        return ["time_resolved.json"]
    time_curve_png({label: [(p["window_end_s"], p[key]) for p in points]}, key,
                   os.path.join(out_dir, "time_resolved.png"))
    return ["time_resolved.json", "time_resolved.png"]


def time_resolved_table(points: list[dict], key: str | None, extra: dict[int, float] | None = None,
                        extra_name: str = "specialized") -> str:
    """The curve as a table: shift, window, the test values and ``key`` (and another model's ``key`` per shift)."""
    tests = sorted({k for p in points for k in p if k.startswith("test.") and "." not in k[5:]})
    cols = list(dict.fromkeys(([key] if key else []) + tests))
    head = ["shift (TR)", "window (s)"] + [c.split(".", 1)[1] for c in cols] + (
        [f"{extra_name} {key.split('.', 1)[1]}"] if extra else [])
    body = [[f"{p['shift']:+d}", f"{p['window_start_s']:.1f} .. {p['window_end_s']:.1f}"]
            + [f"{p[c]:.4f}" if c in p else "" for c in cols]
            + ([f"{extra[p['shift']]:.4f}" if p["shift"] in extra else ""] if extra else []) for p in points]
    return "time-resolved decoding (the model on shifted test windows)\n" + table(head, body)
