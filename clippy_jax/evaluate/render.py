"""Overlay figures: image | ground truth | prediction, with a colour legend of the classes shown
(evaluations), and label maps blended over an image at the image's own resolution (inference)."""

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from clippy_jax.data.eval_datasets.common import IGNORE_LABEL  # noqa: E402

IGNORE_COLOR = (1.0, 1.0, 1.0)


def palette(num_classes: int) -> np.ndarray:
    """[C, 3] float colours in [0, 1]; class 0 (background) is black."""
    colors = plt.get_cmap("tab20")(np.arange(max(num_classes - 1, 1)) % 20)[:, :3]
    return np.concatenate([np.zeros((1, 3)), colors])[:num_classes]


def colorize(labels: np.ndarray, colors: np.ndarray, ignore_label: int = IGNORE_LABEL) -> np.ndarray:
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
    """uint8 RGB figure: image | ground truth | prediction blended over the image, each panel at the
    image's height (clipped to [160, 480] pixels), with a legend of the classes that appear in either map."""
    colors = palette(len(class_names))
    base = image.astype(np.float32) / 255.0
    panels = [("image", base)]
    if truth is not None:
        panels.append(("ground truth", (1 - alpha) * base + alpha * colorize(truth, colors)))
    panels.append(("prediction", (1 - alpha) * base + alpha * colorize(prediction, colors)))
    dpi, height = 80, float(np.clip(image.shape[0], 160, 480))  # panels at the image's height, within limits
    width = height * image.shape[1] / image.shape[0]
    fig, axes = plt.subplots(1, len(panels), figsize=((width * len(panels) + 130) / dpi, (height + 30) / dpi),
                             dpi=dpi)
    for ax, (title, panel) in zip(np.atleast_1d(axes), panels):
        ax.imshow(np.clip(panel, 0, 1), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    shown = np.union1d(prediction, prediction if truth is None else truth).astype(np.int64)
    handles = [Patch(color=colors[c], label=class_names[c]) for c in shown if c < len(class_names)]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.subplots_adjust(left=0.01, right=1 - 125 / (width * len(panels) + 130), bottom=0.01,
                        top=1 - 25 / (height + 30), wspace=0.05)
    return figure_to_array(fig)


def labelled_overlay(image: np.ndarray, labels: np.ndarray, names: Sequence[str], colors: np.ndarray,
                     alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB [H, W, 3] at the image's resolution: `labels` (int [H, W], indices into `names` and
    `colors` [C, 3] in [0, 1]) blended over `image` (uint8 [H, W, 3]), with a legend in the top-left
    corner of the labels present, largest first, with their share of the pixels."""
    blend = (1 - alpha) * image.astype(np.float32) + alpha * 255.0 * colors[labels]
    canvas = Image.fromarray(np.clip(np.round(blend), 0, 255).astype(np.uint8)).convert("RGBA")
    counts = np.bincount(labels.ravel(), minlength=len(names))
    shown = [c for c in np.argsort(-counts, kind="stable") if counts[c]]
    font_size = int(np.clip(min(image.shape[:2]) / 24, 8, 28))
    font = ImageFont.load_default(size=font_size)
    lines = [f"{names[c]} {100.0 * counts[c] / labels.size:.0f}%" for c in shown]
    line_height, pad = font_size + font_size // 3, font_size // 3 + 1
    width = max(int(font.getlength(line)) for line in lines) + line_height + 2 * pad
    legend = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(legend)
    draw.rectangle((0, 0, width, 2 * pad + line_height * len(lines)), fill=(255, 255, 255, 200))
    for row, (c, line) in enumerate(zip(shown, lines)):
        y = pad + row * line_height
        swatch = tuple(int(round(255 * v)) for v in colors[c])
        draw.rectangle((pad, y + 1, pad + font_size, y + 1 + font_size), fill=(*swatch, 255), outline=(0, 0, 0, 255))
        draw.text((pad + line_height, y), line, fill=(0, 0, 0, 255), font=font)
    return np.asarray(Image.alpha_composite(canvas, legend).convert("RGB"))


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
