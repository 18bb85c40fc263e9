"""ImageNet (ILSVRC2012) val and ImageNet-V2 matched-frequency: 1000-way classification."""

import csv
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from clippy_jax.data.eval_datasets import common

# The 1000 WordNet synsets in sorted order, i.e. the standard class index (identical to sorting
# the synset folders of a complete copy); tensorflow_datasets ships the list.
IMAGENET_SYNSETS = tuple(
    tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
)
_SYNSET_INDEX = {synset: i for i, synset in enumerate(IMAGENET_SYNSETS)}

_FOLDER_LAYOUT = "val"
_FLAT_IMAGES = "ILSVRC2012_img_val"
_FLAT_SOLUTION = "LOC_val_solution.csv"
_V2_FOLDER = "imagenetv2-matched-frequency-format-val"


class ImageNet2012Val(common.ClassificationBuilder):
    """ILSVRC2012 val (50k images); labels index `IMAGENET_SYNSETS`, the ClassLabel names."""

    name = "imagenet2012_val"
    DESCRIPTION = __doc__
    HOMEPAGE = "https://image-net.org/challenges/LSVRC/2012/"
    CLASS_NAMES = IMAGENET_SYNSETS
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Get the ILSVRC2012 validation images from {HOMEPAGE} (ILSVRC2012_img_val.tar, login required)
    or from the Kaggle "ImageNet Object Localization Challenge" (which adds {_FLAT_SOLUTION}).
    Point manual_dir at a folder holding either
      * {_FOLDER_LAYOUT}/<synset>/*.JPEG (the usual PyTorch ImageFolder layout), or
      * {_FLAT_IMAGES}/*.JPEG (the extracted tar) and {_FLAT_SOLUTION}.
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = epath.Path(dl_manager.manual_dir)
        if (root / _FOLDER_LAYOUT).is_dir():
            samples = _folder_samples(root / _FOLDER_LAYOUT)
        else:
            self._manual_root(dl_manager, _FLAT_IMAGES, _FLAT_SOLUTION)
            samples = _flat_samples(root / _FLAT_IMAGES, root / _FLAT_SOLUTION)
        return {"validation": self._generate_examples(samples)}


def _folder_samples(directory: epath.Path) -> Iterator[common.Sample]:
    for class_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        if class_dir.name not in _SYNSET_INDEX:
            raise ValueError(f"{class_dir} is not named after an ImageNet-1k synset.")
        for path in common.list_images(class_dir):
            yield path.stem, path, {"label": _SYNSET_INDEX[class_dir.name]}


def _flat_samples(directory: epath.Path, solution: epath.Path) -> Iterator[common.Sample]:
    """Labels come from the first synset of each row's PredictionString (all boxes share it)."""
    with solution.open() as f:
        rows = sorted(
            (row["ImageId"], row["PredictionString"].split()[0]) for row in csv.DictReader(f)
        )
    for image_id, synset in rows:
        yield image_id, directory / f"{image_id}.JPEG", {"label": _SYNSET_INDEX[synset]}


class ImageNetV2(common.ClassificationBuilder):
    """ImageNet-V2 matched-frequency (10k images), same 1000 classes and order as ImageNet."""

    name = "imagenet_v2_matched_frequency"
    DESCRIPTION = __doc__
    HOMEPAGE = "https://github.com/modestyachts/ImageNetV2"
    CLASS_NAMES = IMAGENET_SYNSETS
    EVAL_SPLIT = "test"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download imagenetv2-matched-frequency.tar.gz (linked from {HOMEPAGE}, hosted on the Hugging
    Face hub under vaishaal/ImageNetV2) and extract it. Point manual_dir at the folder that
    contains `{_V2_FOLDER}/`, whose subfolders 0..999 are class indices.
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = self._manual_root(dl_manager, _V2_FOLDER)
        return {"test": self._generate_examples(_v2_samples(root / _V2_FOLDER))}


def _v2_samples(directory: epath.Path) -> Iterator[common.Sample]:
    class_dirs = sorted((p for p in directory.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    for class_dir in class_dirs:
        label = int(class_dir.name)
        if not 0 <= label < len(IMAGENET_SYNSETS):
            raise ValueError(f"{class_dir} is not a class index in [0, {len(IMAGENET_SYNSETS)}).")
        for path in common.list_images(class_dir):
            yield f"{label}/{path.stem}", path, {"label": label}
