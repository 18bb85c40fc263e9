"""ADE20K SceneParsing (ADEChallengeData2016) val: 150 classes, 2000 images."""

from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from clippy_jax.data.eval_datasets import common

ADE20K_CLASS_NAMES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip

_IMAGES = "ADEChallengeData2016/images/validation"
_LABELS = "ADEChallengeData2016/annotations/validation"


class Ade20k150(common.PairedSegmentationBuilder):
    """ADE20K SceneParsing-150 val: annotation 0 ("other") -> 255, 1..150 -> 0..149."""

    name = "ade20k_150"
    DESCRIPTION = __doc__
    HOMEPAGE = "http://sceneparsing.csail.mit.edu/"
    CLASS_NAMES = ADE20K_CLASS_NAMES
    LABEL_TABLE = common.lookup_table({i + 1: i for i in range(len(ADE20K_CLASS_NAMES))})
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download ADEChallengeData2016.zip (the SceneParsing train/val data) from {HOMEPAGE} and extract
    it. Point manual_dir at the folder that contains `ADEChallengeData2016/`, i.e. holding
    {_IMAGES}/*.jpg and {_LABELS}/*.png.
    """

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = self._manual_root(dl_manager, _IMAGES, _LABELS)
        return {"validation": self._generate_examples(_pairs(root))}


def _pairs(root: epath.Path) -> Iterator[common.Pair]:
    for image_path in common.list_images(root / _IMAGES):
        yield image_path.stem, image_path, root / _LABELS / f"{image_path.stem}.png"
