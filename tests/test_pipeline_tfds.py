"""The pipeline on a TFDS dataset with several captions per image (the `coco_captions` layout)."""

import collections

import numpy as np
import pytest
import tensorflow_datasets as tfds

from clippy_jax.data import pipeline, sources
from tests.test_pipeline import GEOMETRY, data_config, decode_captions, tokenizer  # noqa: F401 (fixture)

NUM_EXAMPLES = 12
NO_CAPTION = 7  # this example's captions are all empty


class ClippyTestCaptions(tfds.core.GeneratorBasedBuilder):
    """Images with a sequence of captions, as `coco_captions` has under `captions/text`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Test data."}
    url_infos = None  # nothing to download; skips tfds' checksum lookup (it needs importlib_resources)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(NUM_EXAMPLES):
            texts = ["", " "] if i == NO_CAPTION else [f"photo number {i}", "", f"photo number {i + 50}"]
            image = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            yield i, {"image": image, "captions": {"text": texts}}


@pytest.fixture(scope="module")
def tfds_config(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    ClippyTestCaptions(data_dir=data_dir).download_and_prepare()
    return data_config(source="tfds", tfds_name="clippy_test_captions", tfds_data_dir=data_dir, image_key="image",
                       text_key="captions/text", interleave=1)


def test_one_caption_is_drawn_per_pass_and_empty_ones_are_skipped(tfds_config, tokenizer):  # noqa: F811
    dataset = pipeline.train_dataset(tfds_config, tokenizer, 11, patch_geometry=GEOMETRY, seed=0)
    iterator = pipeline.InputIterator(dataset)
    drawn = collections.defaultdict(set)
    for _ in range(8):  # 8 passes over the 11 usable examples
        for text in decode_captions(tokenizer, next(iterator)["tokens"]):
            number = int(text.split()[-1])
            drawn[number % 50].add(number)
    assert sorted(drawn) == [i for i in range(NUM_EXAMPLES) if i != NO_CAPTION]
    assert all(numbers == {i, i + 50} for i, numbers in drawn.items())
    assert 7 <= iterator.counters()["data/skipped_empty_caption"] <= 8


def test_processes_read_disjoint_slices(tfds_config):
    seen = []
    for index in range(2):
        stream = sources.examples(tfds_config, seed=0, process_index=index, process_count=2, epochs=1)
        seen.append({e["captions"][0] for e in stream.as_numpy_iterator() if e["status"] == sources.OK})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == NUM_EXAMPLES - 1
