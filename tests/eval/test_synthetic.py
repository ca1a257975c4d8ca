"""The synthetic scene generator behind the trained tiny model and its accuracy checks."""

from __future__ import annotations

import numpy as np
import pytest

from gsnet_deploy.eval.synthetic import CLASS_NAMES, HELD_OUT_SEED, TRAIN_SEED, synthetic_scenes


def test_scenes_are_deterministic_and_seeds_differ() -> None:
    # catches: an unseeded draw (the committed model's held-out numbers would not reproduce)
    a, b = synthetic_scenes(2, seed=HELD_OUT_SEED), synthetic_scenes(2, seed=HELD_OUT_SEED)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    other = synthetic_scenes(2, seed=TRAIN_SEED)
    assert not np.array_equal(a.labels, other.labels)
    assert a.images.shape == (2, 3, 384, 384) and a.images.dtype == np.float32
    assert a.labels.shape == (2, 384, 384) and 0.0 <= a.images.min() and a.images.max() <= 255.0


def test_labels_index_the_given_vocabulary() -> None:
    # catches: labels indexing CLASS_NAMES instead of the vocabulary the scenes were drawn for
    names = ("rings", "plain")
    scenes = synthetic_scenes(3, seed=5, class_names=names)
    assert scenes.class_names == names and set(np.unique(scenes.labels)) <= {0, 1}
    for image, label in zip(scenes.images, scenes.labels):
        # "plain" regions are flat (sensor noise only), "rings" regions alternate two colours
        if (label == 1).sum() > 1000 and (label == 0).sum() > 1000:
            assert image[:, label == 1].std(axis=1).max() < image[:, label == 0].std(axis=1).max()
    with pytest.raises(ValueError, match="unknown synthetic classes"):
        synthetic_scenes(1, class_names=("stripes", "lava"))


def test_every_class_appears_in_the_held_out_set() -> None:
    # catches: a class the model is never scored on (mIoU over fewer classes than the vocabulary)
    scenes = synthetic_scenes(4, seed=HELD_OUT_SEED)
    assert set(np.unique(scenes.labels)) == set(range(len(CLASS_NAMES)))
