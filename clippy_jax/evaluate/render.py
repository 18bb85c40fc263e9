"""Overlay figures: image | ground truth | prediction, with a colour legend of the classes shown."""

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

IGNORE_COLOR = (1.0, 1.0, 1.0)


def palette(num_classes: int) -> np.ndarray:
    """[C, 3] float colours in [0, 1]; class 0 (background) is black."""
    colors = plt.get_cmap("tab20")(np.arange(max(num_classes - 1, 1)) % 20)[:, :3]
    return np.concatenate([np.zeros((1, 3)), colors])[:num_classes]


def colorize(labels: np.ndarray, colors: np.ndarray, ignore_label: int = 255) -> np.ndarray:
    """int [H, W] -> float RGB [H, W, 3]; ignored pixels white."""
    out = colors[np.clip(labels, 0, len(colors) - 1)]
    out[labels == ignore_label] = IGNORE_COLOR
    return out


def figure_to_array(fig: plt.Figure) -> np.ndarray:
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def segmentation_overlay(
    image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray, class_names: Sequence[str],
    alpha: float = 0.55,
) -> np.ndarray:
    """uint8 RGB [h, w, 3] figure: image | ground truth | prediction blended over the image, with a
    legend of the classes that appear in either map."""
    colors = palette(len(class_names))
    base = image.astype(np.float32) / 255.0
    panels = [("image", base)]
    if truth is not None:
        panels.append(("ground truth", (1 - alpha) * base + alpha * colorize(truth, colors)))
    panels.append(("prediction", (1 - alpha) * base + alpha * colorize(prediction, colors)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) + 1.6, 2.4), dpi=80)
    for ax, (title, panel) in zip(np.atleast_1d(axes), panels):
        ax.imshow(np.clip(panel, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    shown = np.union1d(prediction, prediction if truth is None else truth).astype(np.int64)
    handles = [Patch(color=colors[c], label=class_names[c]) for c in shown if c < len(class_names)]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.01, right=0.78, wspace=0.05)
    return figure_to_array(fig)


def classification_figure(
    image: np.ndarray, names: Sequence[str], probabilities: np.ndarray, top: int = 5
) -> np.ndarray:
    """uint8 RGB figure: the image and a bar chart of its `top` most probable labels."""
    order = np.argsort(-probabilities)[:top]
    fig, (left, right) = plt.subplots(1, 2, figsize=(5.6, 2.4), dpi=80, gridspec_kw=dict(width_ratios=(1, 1.3)))
    left.imshow(image, interpolation="nearest")
    left.axis("off")
    right.barh(np.arange(len(order))[::-1], probabilities[order], color=palette(len(order) + 1)[1:])
    right.set_yticks(np.arange(len(order))[::-1], [names[i] for i in order], fontsize=7)
    right.set_xlim(0, 1)
    right.tick_params(axis="x", labelsize=7)
    fig.subplots_adjust(left=0.02, right=0.98, wspace=0.6)
    return figure_to_array(fig)
