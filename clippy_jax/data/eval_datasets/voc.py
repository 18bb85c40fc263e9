"""PASCAL VOC 2012 semantic segmentation, val split (1449 images)."""

from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from clippy_jax.data.eval_datasets import common

VOC_CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip

_ROOT = "VOCdevkit/VOC2012"
_IMAGES = f"{_ROOT}/JPEGImages"
_LABELS = f"{_ROOT}/SegmentationClass"
_SPLIT_FILE = f"{_ROOT}/ImageSets/Segmentation/val.txt"


class Voc2012Segmentation(common.PairedSegmentationBuilder):
    """PASCAL VOC 2012 segmentation val: 0 = background, 1..20 objects, 255 = boundaries/ignore."""

    name = "voc2012_seg"
    DESCRIPTION = __doc__
    HOMEPAGE = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
    CLASS_NAMES = VOC_CLASS_NAMES
    # SegmentationClass PNGs store palette indices 0..20 and 255; anything else is ignored too.
    LABEL_TABLE = common.lookup_table({i: i for i in range(len(VOC_CLASS_NAMES))})
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download VOCtrainval_11-May-2012.tar from {HOMEPAGE} (section "Development Kit") and extract it.
    Point manual_dir at the folder that contains `VOCdevkit/`, i.e. holding
    {_IMAGES}/, {_LABELS}/ and {_SPLIT_FILE}.
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = self._manual_root(dl_manager, _IMAGES, _LABELS, _SPLIT_FILE)
        return {"validation": self._generate_examples(_pairs(root))}


def _pairs(root: epath.Path) -> Iterator[common.Pair]:
    for image_id in (root / _SPLIT_FILE).read_text().split():
        yield image_id, root / _IMAGES / f"{image_id}.jpg", root / _LABELS / f"{image_id}.png"
