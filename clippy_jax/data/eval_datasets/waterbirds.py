"""Waterbirds (Sagawa et al., 2020): CUB birds pasted on Places backgrounds."""

import csv
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

from clippy_jax.data.eval_datasets import common

WATERBIRDS_CLASS_NAMES = ("landbird", "waterbird")
WATERBIRDS_PLACE_NAMES = ("land", "water")

_ROOT = "waterbird_complete95_forest2water2"
_METADATA = f"{_ROOT}/metadata.csv"
# Values of the metadata `split` column.
_SPLITS = {"train": 0, "validation": 1, "test": 2}


class Waterbirds(common.ClassificationBuilder):
    """Waterbirds: label y (0 landbird, 1 waterbird) and background place (0 land, 1 water)."""

    name = "waterbirds"
    DESCRIPTION = __doc__
    HOMEPAGE = "https://github.com/kohpangwei/group_DRO"
    CLASS_NAMES = WATERBIRDS_CLASS_NAMES
    EVAL_SPLIT = "test"
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download waterbird_complete95_forest2water2.tar.gz (linked from the "Waterbirds" section of
    {HOMEPAGE}: https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz) and
    extract it. Point manual_dir at the folder that contains `{_ROOT}/`, i.e.
    holding {_METADATA} and the image folders it lists.
    """

    def _features(self) -> dict[str, tfds.features.FeatureConnector]:
        return {
            **super()._features(),
            "place": tfds.features.ClassLabel(names=WATERBIRDS_PLACE_NAMES),
        }

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = self._manual_root(dl_manager, _METADATA)
        with (root / _METADATA).open() as f:
            rows = list(csv.DictReader(f))
        return {
            split: self._generate_examples(_samples(root / _ROOT, rows, value))
            for split, value in _SPLITS.items()
        }


def _samples(
    directory: epath.Path, rows: list[dict[str, str]], split: int
) -> Iterator[common.Sample]:
    for row in rows:
        if int(row["split"]) == split:
            fields = {"label": int(row["y"]), "place": int(row["place"])}
            yield row["img_filename"], directory / row["img_filename"], fields
