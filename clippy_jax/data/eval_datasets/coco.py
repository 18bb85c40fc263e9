"""COCO 2017 val segmentation: panoptic 133 classes ("COCO" in the paper) and COCO-Object 80+bg."""

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from pycocotools import coco as coco_api

from clippy_jax.data.eval_datasets import common

COCO_THING_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COCO_OBJECT_CLASS_NAMES = ("background", *COCO_THING_NAMES)
BACKGROUND = 0

_IMAGES = "val2017"
_PANOPTIC_JSON = "annotations/panoptic_val2017.json"
_PANOPTIC_PNGS = "annotations/panoptic_val2017"
_INSTANCES_JSON = "annotations/instances_val2017.json"
_HOMEPAGE = "https://cocodataset.org/#download"
# Panoptic PNGs encode segment ids as R + 256 * G + 256**2 * B.
_RGB_ID_BASE = 256
_INSTRUCTIONS = """
    From {homepage} download "2017 Val images" (val2017.zip) and {annotations}, and extract them
    into one folder. Point manual_dir at that folder, i.e. the one holding {paths}.
    """


def _contiguous_ids(category_ids: Sequence[int], first: int) -> dict[int, int]:
    """Maps sorted COCO category ids to consecutive labels starting at `first`."""
    return {cat: first + i for i, cat in enumerate(sorted(category_ids))}


def _rgb_to_segment_ids(path: epath.Path) -> np.ndarray:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + _RGB_ID_BASE * rgb[..., 1] + _RGB_ID_BASE**2 * rgb[..., 2]


class CocoPanoptic133(common.SegmentationBuilder):
    """COCO 2017 panoptic val as semantic segmentation: 80 things + 53 stuff -> 0..132.

    Category ids of `panoptic_val2017.json` map in sorted order to 0..132 (their names land in
    `info.metadata["class_names"]` at build time); void pixels (segment id 0 or not listed in
    `segments_info`) are 255. Crowd segments keep their category.
    """

    name = "coco_panoptic133"
    DESCRIPTION = __doc__
    HOMEPAGE = _HOMEPAGE
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
        homepage=_HOMEPAGE,
        annotations='"2017 Panoptic Train/Val annotations" (panoptic_annotations_trainval2017.zip;'
        " also extract the inner annotations/panoptic_val2017.zip)",
        paths=f"{_IMAGES}/, {_PANOPTIC_JSON} and {_PANOPTIC_PNGS}/",
    )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = self._manual_root(dl_manager, _IMAGES, _PANOPTIC_JSON, _PANOPTIC_PNGS)
        panoptic = json.loads((root / _PANOPTIC_JSON).read_text())
        categories = sorted(panoptic["categories"], key=lambda c: c["id"])
        if len(categories) >= common.IGNORE_LABEL:
            raise ValueError(f"{len(categories)} categories do not fit below the ignore label.")
        self.info.metadata["class_names"] = [c["name"] for c in categories]
        return {
            "validation": self._generate_examples(
                root, panoptic, _contiguous_ids([c["id"] for c in categories], first=0)
            )
        }

    def _generate_examples(
        self, root: epath.Path, panoptic: Mapping[str, Any], labels: Mapping[int, int]
    ) -> Iterator[common.Example]:
        file_names = {image["id"]: image["file_name"] for image in panoptic["images"]}
        for annotation in panoptic["annotations"]:
            segment_ids = _rgb_to_segment_ids(root / _PANOPTIC_PNGS / annotation["file_name"])
            label = np.full(segment_ids.shape, common.IGNORE_LABEL, np.uint8)
            for segment in annotation["segments_info"]:
                label[segment_ids == segment["id"]] = labels[segment["category_id"]]
            image_path = root / _IMAGES / file_names[annotation["image_id"]]
            yield self._example(image_path.stem, image_path, label)


class CocoObject(common.SegmentationBuilder):
    """COCO-Object: COCO 2017 val instances as semantic segmentation, 0 = background, 1..80 things.

    Instances are painted in annotation order (later over earlier); crowd regions become 255 where
    no non-crowd instance covers them.
    """

    name = "coco_object"
    DESCRIPTION = __doc__
    HOMEPAGE = _HOMEPAGE
    CLASS_NAMES = COCO_OBJECT_CLASS_NAMES
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS.format(
        homepage=_HOMEPAGE,
        annotations='"2017 Train/Val annotations" (annotations_trainval2017.zip)',
        paths=f"{_IMAGES}/ and {_INSTANCES_JSON}",
    )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = self._manual_root(dl_manager, _IMAGES, _INSTANCES_JSON)
        coco = coco_api.COCO(str(root / _INSTANCES_JSON))
        category_ids = sorted(coco.getCatIds())
        names = tuple(coco.cats[c]["name"] for c in category_ids)
        if names != COCO_THING_NAMES:
            raise ValueError(
                f"{_INSTANCES_JSON} categories {names} differ from the 80 COCO things."
            )
        return {
            "validation": self._generate_examples(
                root, coco, _contiguous_ids(category_ids, first=BACKGROUND + 1)
            )
        }

    def _generate_examples(
        self, root: epath.Path, coco: coco_api.COCO, labels: Mapping[int, int]
    ) -> Iterator[common.Example]:
        for image_id in sorted(coco.getImgIds()):
            info = coco.imgs[image_id]
            label = np.full((info["height"], info["width"]), BACKGROUND, np.uint8)
            crowd = np.zeros(label.shape, bool)
            for annotation in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
                mask = coco.annToMask(annotation).astype(bool)
                if annotation["iscrowd"]:
                    crowd |= mask
                else:
                    label[mask] = labels[annotation["category_id"]]
            label[crowd & (label == BACKGROUND)] = common.IGNORE_LABEL
            image_path = root / _IMAGES / info["file_name"]
            yield self._example(image_path.stem, image_path, label)
