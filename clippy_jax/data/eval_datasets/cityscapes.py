"""Cityscapes val with the 27 classes of the unsupervised segmentation setup (PiCIE, STEGO)."""

from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from clippy_jax.data.eval_datasets import common

# Cityscapes labelIds 7..33 in order: every non-void category (flat, construction, object, nature,
# sky, human, vehicle), including the classes that the 19-class benchmark ignores.
CITYSCAPES27_CLASS_NAMES = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
# labelIds 0..6 are the void classes (unlabeled, ego vehicle, ..., ground).
FIRST_NON_VOID_LABEL_ID = 7

_IMAGES = "leftImg8bit/val"
_LABELS = "gtFine/val"
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


class Cityscapes27(common.PairedSegmentationBuilder):
    """Cityscapes val, 27 classes: labelIds 7..33 -> 0..26, everything else -> 255."""

    name = "cityscapes27"
    DESCRIPTION = __doc__
    HOMEPAGE = "https://www.cityscapes-dataset.com/downloads/"
    CLASS_NAMES = CITYSCAPES27_CLASS_NAMES
    LABEL_TABLE = common.lookup_table(
        {FIRST_NON_VOID_LABEL_ID + i: i for i in range(len(CITYSCAPES27_CLASS_NAMES))}
    )
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Register at {HOMEPAGE}, download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip and
    extract both into one folder. Point manual_dir at that folder, i.e. the one holding
    {_IMAGES}/<city>/*{_IMAGE_SUFFIX} and {_LABELS}/<city>/*{_LABEL_SUFFIX}.
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = self._manual_root(dl_manager, _IMAGES, _LABELS)
        return {"validation": self._generate_examples(_pairs(root))}


def _pairs(root: epath.Path) -> Iterator[common.Pair]:
    for image_path in sorted((root / _IMAGES).glob(f"*/*{_IMAGE_SUFFIX}")):
        image_id = image_path.name.removesuffix(_IMAGE_SUFFIX)
        city = image_path.parent.name
        yield image_id, image_path, root / _LABELS / city / f"{image_id}{_LABEL_SUFFIX}"
