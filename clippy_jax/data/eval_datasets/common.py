"""Shared pieces of the evaluation dataset builders.

Every builder reads an official on-disk layout from the TFDS manual directory and never downloads
anything. Segmentation examples are `{"image": uint8 [H, W, 3], "label": uint8 [H, W], "image_id":
str}` with `IGNORE_LABEL` marking pixels excluded from evaluation; classification examples are
`{"image", "label": int64, "image_id"}`.
"""

import io
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from clippy_jax.data.labels import IGNORE_LABEL

# Label lookup tables cover every value a raw uint8 annotation can take.
_NUM_UINT8_VALUES = 256
# Encoded images kept byte-for-byte; anything else (CMYK, RGBA, palette, other formats) is
# converted to RGB and stored as lossless PNG.
_PASSTHROUGH_FORMATS = ("JPEG", "PNG")
_PASSTHROUGH_MODES = ("RGB", "L")
# PIL modes of single-channel PNGs whose pixel values are class indices.
_INDEX_MODES = ("P", "L")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

Example = tuple[str, dict[str, Any]]
# (image_id, image path, label path) of a paired segmentation dataset.
Pair = tuple[str, epath.Path, epath.Path]
# (image_id, image path, label features) of a classification dataset.
Sample = tuple[str, epath.Path, dict[str, Any]]


def read_image(path: epath.Path) -> tuple[bytes, tuple[int, int]]:
    """Returns the encoded bytes of an image that decodes to RGB, and its (height, width)."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        size = (image.height, image.width)
        if image.format in _PASSTHROUGH_FORMATS and image.mode in _PASSTHROUGH_MODES:
            return data, size
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue(), size


def read_index_png(path: epath.Path) -> np.ndarray:
    """Reads a palette or grayscale PNG as its raw uint8 indices (never the palette colours)."""
    with Image.open(path) as image:
        if image.mode not in _INDEX_MODES:
            raise ValueError(
                f"{path}: expected a palette or grayscale label PNG, got mode {image.mode!r}."
            )
        return np.asarray(image, dtype=np.uint8)


def lookup_table(mapping: Mapping[int, int]) -> np.ndarray:
    """A uint8 lookup table raw value -> label; values not in `mapping` go to `IGNORE_LABEL`."""
    table = np.full(_NUM_UINT8_VALUES, IGNORE_LABEL, np.uint8)
    for raw, label in mapping.items():
        table[raw] = label
    return table


def list_images(directory: epath.Path) -> list[epath.Path]:
    """Image files directly inside `directory`, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class EvalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the manual-directory evaluation builders."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    DESCRIPTION = ""
    HOMEPAGE = ""
    CLASS_NAMES: tuple[str, ...] = ()
    # The split `load` returns when none is requested.
    EVAL_SPLIT = "validation"
    # Manual-only builders download nothing, so there are no URL checksums to look up. Declaring
    # that also skips tfds' lookup of the builder's source file, which imports the
    # `importlib_resources` backport that the pinned stack does not install.
    url_infos = None

    def _features(self) -> dict[str, tfds.features.FeatureConnector]:
        raise NotImplementedError

    def _metadata(self) -> tfds.core.MetadataDict | None:
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(self._features()),
            homepage=self.HOMEPAGE,
            metadata=self._metadata(),
            # Keep examples in generation (file) order so evaluations are reproducible.
            disable_shuffling=True,
        )

    def _manual_root(self, dl_manager: tfds.download.DownloadManager, *required: str) -> epath.Path:
        """The manual directory, after checking that the `required` relative paths exist in it."""
        root = epath.Path(dl_manager.manual_dir)
        missing = [str(root / p) for p in required if not (root / p).exists()]
        if missing:
            raise FileNotFoundError(
                f"{self.name}: missing {', '.join(missing)}.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
            )
        return root


class SegmentationBuilder(EvalBuilder, skip_registration=True):
    """Semantic segmentation; class names and the ignore label live in `info.metadata`."""

    def _features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.Tensor(
                shape=(None, None), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
            ),
            "image_id": tfds.features.Text(),
        }

    def _metadata(self) -> tfds.core.MetadataDict:
        return tfds.core.MetadataDict(class_names=list(self.CLASS_NAMES), ignore_label=IGNORE_LABEL)

    def _example(self, image_id: str, image_path: epath.Path, label: np.ndarray) -> Example:
        image, size = read_image(image_path)
        if label.shape != size:
            raise ValueError(f"{image_id}: label shape {label.shape} != image shape {size}.")
        return image_id, {"image": image, "label": label, "image_id": image_id}


class PairedSegmentationBuilder(SegmentationBuilder, skip_registration=True):
    """One index-PNG label map per image, remapped through `LABEL_TABLE`."""

    LABEL_TABLE: np.ndarray

    def _generate_examples(self, pairs: Iterable[Pair]) -> Iterator[Example]:
        """Yields examples from (image_id, image_path, label_path) triples."""
        for image_id, image_path, label_path in pairs:
            yield self._example(image_id, image_path, self.LABEL_TABLE[read_index_png(label_path)])


class ClassificationBuilder(EvalBuilder, skip_registration=True):
    """Image classification with `CLASS_NAMES` as the names of the `label` ClassLabel."""

    def _features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=self.CLASS_NAMES),
            "image_id": tfds.features.Text(),
        }

    def _generate_examples(self, samples: Iterable[Sample]) -> Iterator[Example]:
        """Yields examples from (image_id, image_path, label fields) triples."""
        for image_id, path, fields in samples:
            image, _ = read_image(path)
            yield image_id, {"image": image, "image_id": image_id, **fields}
