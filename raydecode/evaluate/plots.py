"""Figures and tables of a comparison: retrieval bars, a t-SNE of the shared latent, the papers' Table-1 layout.

- :func:`retrieval_png`: top-1 retrieval in percent (MindEye's protocol, :func:`raydecode.evaluate.retrieval
  .retrieval_top1`), brain->image and image->brain side by side per label, 95% intervals over draws as error
  bars, chance dashed;
- :func:`tsne_png`: Duala's Figure 7, a 2-D t-SNE of embeddings coloured by subject (left) and by each
  image's primary COCO category (right; :func:`raydecode.data.schema.primary_category`);
- :func:`metrics_table_md`: one Markdown row per model, one column per metric.
"""

from __future__ import annotations

import math
import os

import numpy as np

from raydecode.errors import ConfigError
from raydecode.report import _fmt

DIRECTIONS = (("brain_to_image_top1", "brain \u2192 image"), ("image_to_brain_top1", "image \u2192 brain"))
MISSING = "\u2013"  # en dash


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def retrieval_png(results: dict[str, dict], path: str, chance: float | None = None) -> str:
    """``results``: label -> :func:`retrieval_top1`'s dict. ``chance`` (a fraction) overrides each result's."""
    if not results:
        raise ConfigError("retrieval plot: no results to plot")
    for label, r in results.items():
        for key, _ in DIRECTIONS:
            if key not in r:
                raise ConfigError(f"retrieval plot: result {label!r} has no {key!r}")
    plt = _pyplot()
    labels = list(results)
    x, width = np.arange(len(labels)), 0.38
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(labels) + 1.5), 3.8))
    top = 0.0
    for k, (key, name) in enumerate(DIRECTIONS):
        values = np.array([100 * results[lb][key] for lb in labels])
        errors = np.array([100 * results[lb].get(f"{key}_ci95", 0.0) for lb in labels])
        bars = ax.bar(x + (k - 0.5) * width, values, width, yerr=errors, capsize=3, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        top = max(top, float((values + errors).max()))
    chances = [chance] * len(labels) if chance is not None else [results[lb].get("chance") for lb in labels]
    if len({c for c in chances if c is not None}) == 1 and None not in chances:
        ax.axhline(100 * chances[0], color="k", ls="--", lw=1, label=f"chance ({100 * chances[0]:.2g}%)")
    else:  # candidate sets differ: a dashed segment over each label's bars
        labelled = False
        for i, c in enumerate(chances):
            if c is not None:
                ax.hlines(100 * c, i - width, i + width, colors="k", linestyles="--", lw=1,
                          label=None if labelled else "chance")
                labelled = True
    ax.set_xticks(x, labels)
    ax.set_ylabel("top-1 retrieval (%)")
    ax.set_ylim(0, min(100.0, top) * 1.15 + 2)
    ax.legend(fontsize=8, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _subject_name(s) -> str:
    return f"subj{int(s):02d}" if isinstance(s, (int, np.integer)) else str(s)


def tsne_png(embeddings: np.ndarray, subjects: np.ndarray, categories: np.ndarray | None, path: str,
             seed: int = 0, title: str = "") -> np.ndarray:
    """t-SNE of (N, D) embeddings; left panel by subject, right (when ``categories``, (N, C) multi-hot, are
    given) by primary category, the 10 most frequent named in the legend. Returns the (N, 2) coordinates."""
    from sklearn.manifold import TSNE

    from raydecode.data.schema import COCO_CATEGORIES, primary_category

    x = np.asarray(embeddings, dtype=np.float64)
    x = x.reshape(len(x), -1)
    n = len(x)
    subjects = np.asarray(subjects)
    if n < 5:
        raise ConfigError(f"t-SNE needs at least 5 embeddings, got {n}")
    if subjects.shape != (n,):
        raise ConfigError(f"t-SNE: subjects has shape {subjects.shape}, expected ({n},) for {n} embeddings")
    if categories is not None and (np.ndim(categories) != 2 or len(categories) != n):
        raise ConfigError(f"t-SNE: categories has shape {np.shape(categories)}, expected ({n}, C) multi-hot")
    xy = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=seed).fit_transform(x)

    plt = _pyplot()
    panels = 1 if categories is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.6), squeeze=False)
    ax = axes[0, 0]
    for i, s in enumerate(np.unique(subjects)):
        m = subjects == s
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=plt.get_cmap("tab10")(i % 10), label=_subject_name(s))
    ax.set_title("by subject")
    ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if categories is not None:
        ax = axes[0, 1]
        primary = primary_category(categories)
        names = COCO_CATEGORIES if np.shape(categories)[1] == len(COCO_CATEGORIES) else None
        classes, counts = np.unique(primary[primary >= 0], return_counts=True)
        frequent = classes[np.argsort(-counts, kind="stable")[:10]]
        none, other = primary < 0, (primary >= 0) & ~np.isin(primary, frequent)
        ax.scatter(xy[none, 0], xy[none, 1], s=6, color="lightgrey", label="no category")
        ax.scatter(xy[other, 0], xy[other, 1], s=6, color="tan", label="other categories")
        for i, c in enumerate(frequent):
            m = primary == c
            ax.scatter(xy[m, 0], xy[m, 1], s=6, color=plt.get_cmap("tab10")(i),
                       label=names[c] if names else f"class {c}")
        ax.set_title("by primary category")
        ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    return xy


def _cell(v) -> str:
    if isinstance(v, (float, np.floating)):
        return MISSING if math.isnan(v) else f"{v:.4g}"
    return MISSING if v is None else _fmt(v).replace("|", "\\|")


def metrics_table_md(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    """The papers' Table-1 layout: a header, a separator, one row per model; a missing metric shows as a dash."""
    cells = [["model", *columns]] + [[_cell(label), *(_cell(r.get(c)) for c in columns)] for label, r in rows.items()]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(cells[0]))]  # GFM: 3+ dashes
    lines = ["| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"
             for row in cells]  # model names left-aligned, numbers right-aligned
    lines.insert(1, "| " + " | ".join("-" * (w - 1) + ":" if i else ":" + "-" * (w - 1)
                                      for i, w in enumerate(widths)) + " |")
    return "\n".join(lines)
