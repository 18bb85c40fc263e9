"""The image towers by name (`config.model.image.tower`): the ViT (CLIPpy) or an EfficientNet (the paper's
CNN baseline, appendix F, Tab. 3), their presets and the geometry of their per-location features.

A ViT gives one feature per patch (its patch grid, `vit.patch_grid`) and may take pre-patchified kept
patches (patch dropping); a CNN takes whole images and gives its last feature map, stride `CNN_STRIDE`.
"""

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn

from clippy_jax.models import efficientnet, vit

IMAGE_TOWERS = ("vit", "efficientnet")
CNN_STRIDE = 32  # EfficientNet's last feature map: five stride-2 layers, each mapping n to ceil(n / 2)


def tower_name(image: Mapping) -> str:
    """The tower of settings `image`; configs recorded before the CNN tower name none: 'vit'."""
    tower = image.get("tower", "vit")
    if tower not in IMAGE_TOWERS:
        raise ValueError(f"Unknown model.image.tower={tower!r}; choose from {IMAGE_TOWERS}.")
    return tower


def is_cnn(image: Mapping) -> bool:
    return tower_name(image) != "vit"


def expand_image(image: Mapping) -> dict:
    """Expands the preset of settings `image` (ViT `variant` 'B/16', EfficientNet `preset` 'b5');
    keys given explicitly override the preset's; `tower` is kept."""
    image = dict(image)
    if "variant" in image:
        image = {**vit.vit_config(image.pop("variant")), **image}
    if "preset" in image:
        image = {**efficientnet.efficientnet_config(image.pop("preset")), **image}
    return image


def build_image_tower(image: Mapping, **kwargs) -> nn.Module:
    """The tower module of expanded settings `image` (`expand_image`), with `kwargs` (dtypes)."""
    settings = {k: v for k, v in image.items() if k != "tower"}
    if is_cnn(image):
        return efficientnet.EfficientNet(**settings, **kwargs)
    return vit.VisionTransformer(**settings, **kwargs)


def has_cls(image: Mapping) -> bool:
    """Whether the tower of expanded settings `image` has a CLS token (a ViT with `use_cls_token`)."""
    return not is_cnn(image) and image.get("use_cls_token", vit.VisionTransformer.use_cls_token)


def patch_geometry(image: Mapping) -> tuple[int, int] | None:
    """(patch size, stride) the pipeline cuts for a ViT (`vit.patch_geometry`); None for a CNN (whole images)."""
    return None if is_cnn(image) else vit.patch_geometry(image)


def feature_grid(image: Mapping, image_shape: Sequence[int]) -> tuple[int, int]:
    """(gh, gw) of the per-location features of expanded settings `image` on an (H, W) image: the ViT's
    patch grid, or the CNN's last feature map (ceil(H / 32), ceil(W / 32))."""
    if is_cnn(image):
        return tuple(math.ceil(n / CNN_STRIDE) for n in image_shape[:2])
    return vit.patch_grid(image_shape, *vit.patch_geometry(image))


def size_multiple(image: Mapping) -> int:
    """Image sides that are multiples of this map exactly onto the feature grid: the patch size or the CNN stride."""
    return CNN_STRIDE if is_cnn(image) else vit.patch_geometry(image)[0]
