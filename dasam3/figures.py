"""Pictures people would rather look at than read: segmentation overlays and expert routing."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .io import atomic_output

# One colour per class label (1, 2, ...), as RGB in [0, 1].
CLASS_COLOURS = np.array([[0.95, 0.35, 0.25], [0.25, 0.6, 1.0], [0.3, 0.85, 0.35], [0.95, 0.8, 0.2],
                          [0.75, 0.4, 0.9], [0.2, 0.85, 0.85], [1.0, 0.55, 0.75], [0.6, 0.6, 0.6]])


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - only without the extra
        raise ImportError("figures need matplotlib: pip install 'dasam3[medical]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def blend(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """An RGB picture of a grey slice with each labelled pixel tinted by its class colour.

    image: [H, W] in [0, 1]; labels: int [H, W] (0 = background).  Returns float [H, W, 3].
    """
    rgb = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
    tinted = labels > 0
    colours = CLASS_COLOURS[(labels[tinted] - 1) % len(CLASS_COLOURS)]
    rgb[tinted] = (1 - alpha) * rgb[tinted] + alpha * colours
    return rgb


def overlay_figure(image: np.ndarray, truth: np.ndarray, predictions: Mapping[str, np.ndarray],
                   classes: Sequence[str], path: str | Path, num_slices: int = 3, title: str = "") -> Path:
    """Rows: evenly spaced slices; columns: the image, the ground truth, then each method's labels.

    image: [D, H, W] in [0, 1]; truth and every prediction: int [D, H, W] in the same layout.
    """
    plt = _pyplot()
    depth = image.shape[0]
    slices = np.linspace(0, depth - 1, num_slices + 2)[1:-1].round().astype(int) if depth > 2 else [0]
    columns = {"image": None, "ground truth": truth, **predictions}
    fig, axes = plt.subplots(len(slices), len(columns), figsize=(2.4 * len(columns), 2.4 * len(slices)),
                             squeeze=False)
    for row, index in enumerate(slices):
        for col, (name, labels) in enumerate(columns.items()):
            shown = image[index] if labels is None else blend(image[index], labels[index])
            axes[row, col].imshow(shown, cmap="gray" if labels is None else None, vmin=0, vmax=1)
            axes[row, col].set_axis_off()
            if row == 0:
                axes[row, col].set_title(name, fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=CLASS_COLOURS[i % len(CLASS_COLOURS)]) for i in range(len(classes))]
    fig.legend(handles, list(classes), loc="lower center", ncol=len(classes), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95 if title else 1))
    return _save(fig, path)


def routing_figure(shares: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = "") -> Path:
    """One panel per DA-MoE layer: the share of tokens each expert receives, a bar per concept.

    shares: concept → layer name → [E] shares (each summing to 1).
    """
    plt = _pyplot()
    concepts = list(shares)
    layers = list(next(iter(shares.values())))
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.0), squeeze=False, sharey=True)
    width = 0.8 / len(concepts)
    for panel, layer in zip(axes[0], layers):
        experts = np.arange(len(shares[concepts[0]][layer]))
        for i, concept in enumerate(concepts):
            panel.bar(experts + (i - (len(concepts) - 1) / 2) * width, shares[concept][layer], width,
                      label=concept, color=CLASS_COLOURS[i % len(CLASS_COLOURS)])
        panel.set_title(layer, fontsize=9)
        panel.set_xticks(experts, [f"E{e}" for e in experts])
        panel.set_xlabel("expert")
    axes[0, 0].set_ylabel("share of routed tokens")
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_output(path) as staging:
        fig.savefig(staging, dpi=110)
    plt.close(fig)
    return Path(path)
