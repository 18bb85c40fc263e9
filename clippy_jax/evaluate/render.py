"""Overlay figures: image | ground truth | prediction, with a colour legend of the classes shown
(evaluations), and label maps blended over an image at the image's own resolution (inference)."""

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from clippy_jax.data.labels import IGNORE_LABEL  # noqa: E402

IGNORE_COLOR = (1.0, 1.0, 1.0)


# Matplotlib's tab10 without its grey: neighbouring labels differ in hue, none is lost on black or white.
_NAMED_COLORS = (("blue", "#1f77b4"), ("orange", "#ff7f0e"), ("green", "#2ca02c"), ("red", "#d62728"),
                 ("purple", "#9467bd"), ("cyan", "#17becf"), ("pink", "#e377c2"), ("olive", "#bcbd22"),
                 ("brown", "#8c564b"))
_GOLDEN_ANGLE = 0.381966  # hue step (in turns) that keeps every next colour far from the ones before


def palette(num_classes: int) -> np.ndarray:
    """[C, 3] float colours in [0, 1]; class 0 (background) is black, then `_NAMED_COLORS`, then hues a
    golden angle apart (alternating brightness), so that neighbouring labels never share a hue."""
    named = [matplotlib.colors.to_rgb(code) for _, code in _NAMED_COLORS]
    more = [matplotlib.colors.hsv_to_rgb(((0.45 + i * _GOLDEN_ANGLE) % 1.0, 0.75, 0.95 if i % 2 else 0.7))
            for i in range(max(0, num_classes - 1 - len(named)))]
    return np.asarray([(0.0, 0.0, 0.0), *named, *more])[:num_classes]


def color_name(index: int) -> str:
    """The name of `palette`'s colour `index` (a number past the named ones)."""
    return "black" if index == 0 else _NAMED_COLORS[index - 1][0] if index <= len(_NAMED_COLORS) else f"colour {index}"


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


MIN_DISPLAY_SIDE = 384  # overlays of smaller images are enlarged (nearest neighbour) to at least this side


def labelled_overlay(image: np.ndarray, labels: np.ndarray, names: Sequence[str], colors: np.ndarray,
                     alpha: float = 0.5, title: str = "") -> np.ndarray:
    """uint8 RGB figure: `labels` (int [H, W], indices into `names` and `colors` [C, 3] in [0, 1]) blended
    over `image` (uint8 [H, W, 3]), enlarged by an integer factor (nearest neighbour) to a shorter side of
    at least `MIN_DISPLAY_SIDE`, and beside it a legend of the labels present, largest first, with their
    share of the pixels, under `title`. The legend's text scales with the image (legible at screen width
    on a 4000 x 3000 photo); it never covers the image."""
    scale = int(np.ceil(MIN_DISPLAY_SIDE / min(image.shape[:2])))
    blend = (1 - alpha) * image.astype(np.float32) + alpha * 255.0 * colors.astype(np.float32)[labels]
    blend = np.clip(np.round(blend), 0, 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    height, width = blend.shape[:2]
    counts = np.bincount(labels.ravel(), minlength=len(names))
    shown = [c for c in np.argsort(-counts, kind="stable") if counts[c]]
    font_size = max(14, round(max(height, width) / 64))
    font = ImageFont.load_default(size=font_size)
    lines = [f"{names[c]}  {100.0 * counts[c] / labels.size:.0f}%" for c in shown]
    line_height, pad = round(font_size * 1.4), font_size // 2
    top = pad + (line_height if title else 0)
    rows = max(1, (height - top - pad) // line_height)
    column = max(int(font.getlength(line)) for line in lines) + line_height + 2 * pad
    columns = -(-len(lines) // rows)
    legend_width = max(columns * column, int(font.getlength(title)) + 2 * pad if title else 0) + pad
    canvas = Image.new("RGB", (width + legend_width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width + pad, pad), title, fill=(0, 0, 0), font=font)
    for i, (c, line) in enumerate(zip(shown, lines)):
        x, y = width + pad + (i // rows) * column, top + (i % rows) * line_height
        swatch = tuple(int(round(255 * v)) for v in colors[c])
        draw.rectangle((x, y + 1, x + font_size, y + 1 + font_size), fill=swatch, outline=(0, 0, 0))
        draw.text((x + line_height, y), line, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


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
