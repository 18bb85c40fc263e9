"""The synthetic demo data: determinism and consistency of captions, masks and labels."""

import numpy as np
import pytest

from clippy_jax.data import synthetic


def test_examples_are_a_pure_function_of_seed_and_index():
    a, b = synthetic.make_example(7, 11), synthetic.make_example(7, 11)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.segmentation, b.segmentation)
    np.testing.assert_array_equal(a.instances, b.instances)
    assert a.caption == b.caption and a.labels == b.labels
    c = synthetic.make_example(7, 12)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.image, synthetic.make_example(8, 11).image)


@pytest.mark.parametrize("index", range(40))
def test_captions_and_masks_agree(index):
    example = synthetic.make_example(3, index)
    assert example.image.shape == (64, 64, 3) and example.image.dtype == np.uint8
    assert 1 <= len(example.labels) <= 3
    # The semantic mask is the instance mask relabelled by each instance's category.
    lookup = np.asarray([synthetic.BACKGROUND_LABEL] + [label + 1 for label in example.labels])
    np.testing.assert_array_equal(example.segmentation, lookup[example.instances])
    # Every visible object is named in the caption by one of its category's synonyms, and no
    # absent category is named.
    visible = {example.labels[k - 1] for k in np.unique(example.instances) if k}
    caption = example.caption.lower()
    for label, category in enumerate(synthetic.CATEGORIES):
        named = any(s in caption for s in category.synonyms)
        assert named == (label in visible), (caption, category.name, visible)


def test_every_category_and_background_occurs():
    labels = set()
    materials = set()
    for i in range(200):
        example = synthetic.make_example(0, i)
        labels |= set(np.unique(example.segmentation))
        materials |= {
            name for name, (_, phrases) in synthetic.BACKGROUNDS.items() if any(p in example.caption for p in phrases)
        }
    assert labels == set(range(len(synthetic.CATEGORIES) + 1))
    assert materials == set(synthetic.BACKGROUNDS)
