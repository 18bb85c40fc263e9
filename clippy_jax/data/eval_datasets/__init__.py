"""TFDS builders for the evaluation datasets, read from their official layouts (no downloads).

    ds = eval_datasets.load("voc2012_seg", manual_dir="/data/voc", data_dir="/data/tfds")

builds the TFRecords once into `data_dir` and returns the evaluation split. Where to get each
dataset and its label conventions: README.md in this folder.
"""

import tensorflow as tf
import tensorflow_datasets as tfds

from clippy_jax.data.eval_datasets import ade20k, cityscapes, coco, imagenet, voc, waterbirds
from clippy_jax.data.eval_datasets.common import IGNORE_LABEL, EvalBuilder

BUILDERS: dict[str, type[EvalBuilder]] = {
    builder.name: builder
    for builder in (
        voc.Voc2012Segmentation,
        coco.CocoPanoptic133,
        coco.CocoObject,
        ade20k.Ade20k150,
        cityscapes.Cityscapes27,
        imagenet.ImageNet2012Val,
        imagenet.ImageNetV2,
        waterbirds.Waterbirds,
    )
}

__all__ = ["BUILDERS", "IGNORE_LABEL", "builder", "load"]


def builder(name: str, manual_dir: str, data_dir: str) -> EvalBuilder:
    """Returns the named builder with its dataset prepared in `data_dir` (built on first use)."""
    if name not in BUILDERS:
        raise KeyError(f"Unknown evaluation dataset {name!r}; known: {sorted(BUILDERS)}.")
    dataset_builder = BUILDERS[name](data_dir=data_dir)
    dataset_builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return dataset_builder


def load(name: str, manual_dir: str, data_dir: str, split: str | None = None) -> tf.data.Dataset:
    """Builds the named dataset once (cached in `data_dir`) and returns `split`.

    `split` defaults to the builder's evaluation split (`EVAL_SPLIT`: "validation", or "test" for
    ImageNet-V2 and Waterbirds). Examples come in file order, unshuffled.
    """
    dataset_builder = builder(name, manual_dir, data_dir)
    return dataset_builder.as_dataset(
        split=split or dataset_builder.EVAL_SPLIT, shuffle_files=False
    )
