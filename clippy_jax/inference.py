"""CLIPpy on single images, for notebooks and scripts.

    from clippy_jax.inference import Clippy, read_image

    clippy = Clippy.load("workdirs/demo")       # a training workdir, or a converted checkpoint folder
    image = read_image("photo.jpg")              # or a numpy array / PIL image (see below)
    out = clippy.segment(image, ["zebra", "tiger", ["grass", "sand"]], render=True)
    out.labels          # int [H, W]: index of the best label at every pixel
    out.overlay         # uint8 figure: the labels over the image (small ones enlarged), a legend beside it
    clippy.group(image, num_groups=4).groups           # int [H, W] PCA groups
    clippy.classify(image, ["a zebra", "a tiger"]).probabilities
    clippy.segment([photo_a, photo_b], prompts)        # a list of images of any sizes: a list of results

What an image may be: a numpy (or JAX) array [H, W] (grayscale), [H, W, 1], [H, W, 3] (RGB) or
[H, W, 4] (RGBA; alpha is ignored) of uint8 in [0, 255], uint16 in [0, 65535] or float in [0, 1]
(checked); or a PIL image of any mode (EXIF orientation applied). `read_image(path)` reads JPEG, PNG,
WebP, ... files the same way. The sides may differ by at most `MAX_ASPECT_RATIO`.

The model sees an image with its shorter side resized to `image_size` (by default the training
config's `data.image_size`; `CONVERTED_IMAGE_SIZE` for converted checkpoints) and its longer side
rounded to a multiple of a quarter of that (and of the patch size), so that the aspect ratio changes
by at most ~12% and a folder of photos of mixed sizes compiles the image tower once per bucket
(landscape or portrait, aspect ratio to the nearest quarter), not once per photo; or, with `window`,
through `window` x `window` sliding windows at `stride` on that resized image, one window at a time
(one compilation). Score maps are bilinearly upsampled back to the input's size. The protocols are
those of the evaluations (clippy_jax/evaluate/README.md).

Memory: the full-resolution score maps take H * W * (labels + 4) * 4 bytes (plus the image); an
image whose estimate exceeds `max_bytes` (default `DEFAULT_MAX_BYTES`, 2 GiB) is refused before
any work, naming the sizes, so that no input allocates more than that budget.
"""

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image, ImageOps, UnidentifiedImageError

from clippy_jax import platforms
from clippy_jax.data.tokenizer import Tokenizer
from clippy_jax.evaluate import geometry, grouping, loading, zero_shot
from clippy_jax.evaluate.geometry import CLIP_MEAN, CLIP_STD
from clippy_jax.evaluate.render import classification_figure, color_name, labelled_overlay, palette
from clippy_jax.models import as_variables, towers

CONVERTED_IMAGE_SIZE = 448  # the released CLIPpy checkpoints' evaluation resolution (paper Sec. 4)
MAX_ASPECT_RATIO = 8.0
DEFAULT_MAX_BYTES = 2 << 30
LABELS_TITLE = "label: share of the image"
_FLOAT_TOLERANCE = 1e-3  # float images may overshoot [0, 1] by rounding


@dataclasses.dataclass
class Segmentation:
    labels: np.ndarray  # int [H, W]: index into `names`
    scores: np.ndarray  # float [H, W, C]: cosine similarity to each label, upsampled
    names: list[str]
    overlay: np.ndarray | None = None  # uint8 figure (`render.labelled_overlay`)


@dataclasses.dataclass
class Grouping:
    groups: np.ndarray  # int [H, W]: index of the PCA half-axis (+v1, -v1, +v2, ...) of every pixel
    scores: np.ndarray  # float [H, W, G]: projections on the half-axes, upsampled
    names: list[str]
    overlay: np.ndarray | None = None  # uint8 figure (`render.labelled_overlay`)


@dataclasses.dataclass
class Classification:
    probabilities: np.ndarray  # [C]: softmax of the similarities at the model's learned temperature
    similarities: np.ndarray  # [C]: cosine similarity of the pooled image embedding to each label
    names: list[str]
    overlay: np.ndarray | None = None


def read_image(path: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file (any format and mode PIL reads; EXIF orientation applied).
    Errors name `path`: FileNotFoundError (does not exist), IsADirectoryError, or ValueError (not an
    image, truncated or corrupt, or a shape the model does not take)."""
    file = epath.Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not an image file.")
    if not file.exists():
        raise FileNotFoundError(f"{path} does not exist.")
    with file.open("rb") as f:
        try:
            with Image.open(f) as image:
                return as_rgb(image, f"image file {path}")
        except UnidentifiedImageError:
            raise ValueError(f"{path} is not an image (no format PIL reads: JPEG, PNG, WebP, ...).") from None
        except (OSError, SyntaxError) as error:  # PIL's decoders on damaged data
            what = "is truncated" if "truncated" in str(error).lower() else "is corrupt"
            raise ValueError(f"{path} {what} ({error}); save or download it again.") from None


def _check_shape(shape: Sequence[int], name: str) -> None:
    if len(shape) == 3 and shape[-1] not in (1, 3, 4) or len(shape) not in (2, 3):
        raise ValueError(
            f"{name} has shape {tuple(shape)}; one image is [H, W] or [H, W, C] with C = 1, 3 or 4. For a batch, "
            "pass a list of images."
        )
    height, width = shape[:2]
    if min(height, width) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(shape)}).")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"{name} has shape {tuple(shape)}, an aspect ratio of {max(height, width) / min(height, width):.1f}:1, "
            f"beyond the {MAX_ASPECT_RATIO:g}:1 this model takes; crop it into parts of at most that ratio."
        )


def _shape(image, name: str) -> tuple[int, ...]:
    """The shape of an array-like image, or (H, W, 3) of a PIL image, without converting it."""
    if isinstance(image, Image.Image):
        return image.height, image.width, 3
    if isinstance(image, list | tuple | str | bytes):
        raise ValueError(f"{name} is a {type(image).__name__}; pass an array or a PIL image per image.")
    return tuple(np.shape(image))


def as_rgb(image, name: str = "image") -> np.ndarray:
    """uint8 RGB [H, W, 3] of one image (see the module docstring); ValueError naming `name` otherwise."""
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = np.asarray(image)  # 16-bit / float grayscale: scaled below by dtype
        else:
            image = image.convert("RGB")
    _check_shape(_shape(image, name), name)
    array = np.asarray(image)
    height, width = array.shape[:2]
    if array.dtype == np.uint16:
        array = (array.astype(np.uint32) + 128) // 257
    elif np.issubdtype(array.dtype, np.floating):
        low, high = float(np.min(array)), float(np.max(array))
        if not (np.isfinite(low) and np.isfinite(high)) or low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ValueError(
                f"{name} is {array.dtype} with values in [{low:.4g}, {high:.4g}]; float images must be in [0, 1] "
                "(uint8 images in [0, 255]): divide by 255, or pass uint8."
            )
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0)
    elif array.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {array.dtype}; images are uint8 [0, 255], uint16 or float [0, 1].")
    array = array.astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    return np.ascontiguousarray(np.broadcast_to(array[..., :3], (height, width, 3)))


def bucketed_shape(shape: Sequence[int], short_side: int, patch_size: int) -> tuple[int, int]:
    """(H', W'): the shorter side `short_side`, the longer one the closest multiple of a quarter of it
    (rounded to the patch size) to the aspect ratio; both multiples of `patch_size`."""
    step = max(patch_size, int(round(short_side / 4 / patch_size)) * patch_size)
    short = max(patch_size, int(round(short_side / patch_size)) * patch_size)
    long = max(short, int(round(short_side * max(shape[:2]) / min(shape[:2]) / step)) * step)
    return (short, long) if shape[0] <= shape[1] else (long, short)


def _upsample(scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of [..., h, w, K] score maps in numpy (`geometry.upsample`'s interpolation): nothing
    compiles per image size, and the full-resolution maps stay off the accelerator."""
    return geometry.resize(scores, shape, antialias=False)


def _prompt_groups(prompts: Sequence[str | Sequence[str]], name: str) -> tuple[list[list[str]], list[str]]:
    """Each entry is a label: a prompt, or a list of prompts averaged into one embedding (named by the first)."""
    if isinstance(prompts, str) or not len(prompts):
        raise ValueError(f"{name} must be a non-empty list of prompts (or of lists of prompts), got {prompts!r}.")
    groups = [[p] if isinstance(p, str) else list(p) for p in prompts]
    if any(not g or not all(isinstance(p, str) and p.strip() for p in g) for g in groups):
        raise ValueError(f"{name} has an empty prompt or an empty list of prompts: {prompts!r}.")
    return groups, [g[0] for g in groups]


def image_functions(model: nn.Module, device: jax.Device) -> tuple[Callable, Callable]:
    """The jitted image functions of `Clippy`, compiled for `device`'s platform: (params, images [B, H, W, 3])
    -> unit per-location embeddings [B, gh, gw, E], and (params, images, label_emb [C, E]) -> logits [B, C]."""
    dense = platforms.jit(lambda params, images: zero_shot.encode_image(model, params, images)[1], device)
    pooled = platforms.jit(lambda params, images, emb: zero_shot.encode_image(model, params, images, emb)[0], device)
    return dense, pooled


class Clippy:
    """A model with its parameters (or variables: `models.as_variables`), tokenizer and image settings; see the
    module docstring. `device`: where the image tower runs (default: the first device)."""

    def __init__(self, model: nn.Module, params, tokenizer: Tokenizer, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, image_size: int = CONVERTED_IMAGE_SIZE, window: int = 0,
                 stride: int = 0, max_bytes: int = DEFAULT_MAX_BYTES, device: jax.Device | None = None,
                 data_config: ml_collections.ConfigDict | None = None):
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.data_config = data_config  # the training run's data settings; None for converted checkpoints
        self.mean, self.std = tuple(mean), tuple(std)
        self.patch_size = towers.size_multiple(model.image)  # a ViT's patch size, a CNN's stride
        if image_size < self.patch_size:
            raise ValueError(f"image_size={image_size} is below the patch size (or CNN stride) {self.patch_size}.")
        self.image_size, self.window, self.stride = image_size, window, stride or window * 2 // 3
        if window and not 0 < self.stride <= window <= image_size:
            raise ValueError(f"Sliding windows need 0 < stride <= window <= image_size, got stride={self.stride}, "
                             f"window={window}, image_size={image_size}.")
        self.max_bytes = max_bytes
        self._dense, self._pooled = image_functions(model, device or jax.devices()[0])

    @classmethod
    def load(cls, checkpoint_dir: str, model_config: str = "", tokenizer_path: str = "",
             mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, max_text_length: int = 64,
             image_size: int = 0, **settings) -> "Clippy":
        """From a training workdir / checkpoint or a converted checkpoint directory (reads only; writes
        nothing). A training workdir brings the config recorded with its checkpoint, whose data
        settings replace mean / std / text length and give the default `image_size`; `model_config`
        (e.g. "configs/demo.py:size=tiny") replaces that config. `settings`: window, stride, max_bytes."""
        config = ml_collections.ConfigDict(dict(
            init_from=checkpoint_dir, model_config=model_config, tokenizer_path=tokenizer_path,
            data=dict(mean=tuple(mean), std=tuple(std), tokenizer_path="", max_text_length=max_text_length),
        ))
        loaded = loading.load(config)
        image_size = image_size or loaded.data_config.get("image_size", CONVERTED_IMAGE_SIZE)
        trained_on = loaded.data_config if loaded.step else None
        return cls(loaded.model, loaded.params, loaded.tokenizer, loaded.data_config.mean, loaded.data_config.std,
                   image_size=image_size, data_config=trained_on, **settings)

    def _check_budget(self, shape: Sequence[int], num_maps: int, name: str) -> None:
        needed = shape[0] * shape[1] * (num_maps + 4) * 4
        if needed > self.max_bytes:
            raise ValueError(
                f"{name} of {shape[0]}x{shape[1]} pixels with {num_maps} score maps needs "
                f"~{needed / 2**30:.2f} GiB at full resolution, over the budget max_bytes={self.max_bytes} "
                f"({self.max_bytes / 2**30:.2f} GiB); downscale it first (e.g. PIL's Image.thumbnail) or pass a larger "
                "max_bytes."
            )

    def _images(self, images, num_maps: int) -> tuple[list[np.ndarray], bool]:
        """(uint8 RGB images, whether one image was given), every image checked before any work."""
        single = not isinstance(images, list | tuple)
        if not single and not images:
            raise ValueError("images is an empty list.")
        names = ["image"] if single else [f"images[{i}]" for i in range(len(images))]
        images = [images] if single else list(images)
        for image, name in zip(images, names):  # every check before any conversion or allocation
            shape = _shape(image, name)
            _check_shape(shape, name)
            self._check_budget(shape, num_maps, name)
        return [as_rgb(image, name) for image, name in zip(images, names)], single

    def _geometry(self, image: np.ndarray) -> geometry.Geometry:
        if self.window:
            return geometry.Geometry(window=self.window, stride=self.stride, short_side=self.image_size)
        return geometry.Geometry(input_size=bucketed_shape(image.shape, self.image_size, self.patch_size))

    def _score_map(self, image: np.ndarray, head) -> np.ndarray:
        """head(dense [n, gh, gw, E]) -> [n, gh, gw, K]; returns float32 [H, W, K] at the image's size."""
        geo = self._geometry(image)
        crops, boxes, resized = geo.windows(image)
        pixels = geometry.normalize(crops, self.mean, self.std)
        dense = jnp.concatenate([self._dense(self.params, pixels[i:i + 1]) for i in range(len(pixels))])
        scores = np.asarray(head(dense))
        return np.asarray(geometry.to_label_resolution(scores, boxes, resized, geo.window_shape, image.shape[:2],
                                                       resize=_upsample))

    def label_embeddings(self, prompts: Sequence[Sequence[str]], templates: Sequence[str] = ("{}",)) -> jax.Array:
        return zero_shot.label_embeddings(self.model, self.params, self.tokenizer, prompts, templates)

    def segment(self, images, prompts: Sequence[str | Sequence[str]],
                background: Sequence[str] = (), render: bool = False) -> Segmentation | list[Segmentation]:
        """Top-down zero-shot segmentation: every pixel takes the label with the highest cosine similarity
        (bilinearly upsampled from the patch grid) between the label's embedding, the normalised mean
        over its prompts, and the per-location image embedding. `background` prompts form one more
        label, "background", listed first (black in the overlay). A list of images gives a list."""
        groups, names = _prompt_groups(prompts, "prompts")
        if background:
            background_groups, _ = _prompt_groups(background, "background")
            groups, names = [[p for g in background_groups for p in g]] + groups, ["background"] + names
        checked, single = self._images(images, len(groups))
        label_emb = self.label_embeddings(groups)
        colors = palette(len(names) + (0 if background else 1))[0 if background else 1:]
        results = []
        for image in checked:
            scores = self._score_map(image, lambda dense: zero_shot.location_logits(dense, label_emb))
            labels = scores.argmax(-1)
            overlay = labelled_overlay(image, labels, names, colors, title=LABELS_TITLE) if render else None
            results.append(Segmentation(labels, scores, names, overlay))
        return results[0] if single else results

    def group(self, images, num_groups: int = 2, render: bool = False) -> Grouping | list[Grouping]:
        """Bottom-up PCA grouping of an image's per-location embeddings (clippy_jax/evaluate/grouping.py);
        with sliding windows, PCA runs over the windows' locations together."""
        if isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer) or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}.")
        checked, single = self._images(images, num_groups)

        def head(dense: jax.Array) -> jax.Array:  # [n, gh, gw, E] -> [n, gh, gw, G]
            mean, axes = grouping.principal_axes(dense.reshape(-1, dense.shape[-1]), num_groups)
            return jnp.einsum("nhwe,ge->nhwg", dense - mean, axes)

        names = [f"group {i + 1}" for i in range(num_groups)]
        colors = palette(num_groups + 1)[1:]
        legend = [f"{name} ({color_name(i + 1)})" for i, name in enumerate(names)]
        title = f"{num_groups} PCA groups of the features: share of the image"
        results = []
        for image in checked:
            scores = self._score_map(image, head)
            groups = scores.argmax(-1)
            overlay = labelled_overlay(image, groups, legend, colors, title=title) if render else None
            results.append(Grouping(groups, scores, names, overlay))
        return results[0] if single else results

    def classify(self, images, labels: Sequence[str | Sequence[str]], templates: Sequence[str] = ("{}",),
                 render: bool = False) -> Classification | list[Classification]:
        """Zero-shot classification of the pooled embedding of an image, resized (shorter side
        `image_size`, longer side bucketed as for `segment`) without cropping."""
        groups, names = _prompt_groups(labels, "labels")
        if not templates or not all(isinstance(t, str) and "{}" in t for t in templates):
            raise ValueError(f"templates must be a non-empty list of strings with a '{{}}', got {templates!r}.")
        checked, single = self._images(images, 0)
        label_emb = self.label_embeddings(groups, templates)
        results = []
        for image in checked:
            shape = bucketed_shape(image.shape, self.image_size, self.patch_size)
            pixels = geometry.normalize(geometry.resize_image(image, shape), self.mean, self.std)
            similarities = np.asarray(self._pooled(self.params, pixels[None], label_emb))[0]
            logit_scale = as_variables(self.params)["params"]["logit_scale"]
            probabilities = np.asarray(jax.nn.softmax(jnp.exp(logit_scale) * similarities))
            overlay = classification_figure(image, names, probabilities) if render else None
            results.append(Classification(probabilities, similarities, names, overlay))
        return results[0] if single else results
