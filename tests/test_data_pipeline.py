import numpy as np
import pytest

from derm.preprocess import preprocess
from derm.trainer.data import class_weights, image_dataset

tf = pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def few(ham):
    return [str(p) for p in ham.paths[:12]]


def test_plain_views_equal_the_sdk_preprocessing(few):
    ds = image_dataset(few, 75, batch_size=5)
    batches = list(ds.as_numpy_iterator())
    assert [b.shape for b in batches] == [(5, 75, 75, 3), (5, 75, 75, 3), (2, 75, 75, 3)]
    images = np.concatenate(batches)
    for k in (0, 7, 11):
        assert (images[k] == preprocess(few[k], 75)).all()


def test_augmented_epochs_are_reproducible_and_differ(few):
    targets = list(range(12))
    ds = image_dataset(few, 75, targets=targets, augment=True, seed=3, batch_size=12, shuffle=True, repeat=True)
    it = iter(ds)
    (x1, y1), (x2, y2) = next(it), next(it)
    again = iter(
        image_dataset(few, 75, targets=targets, augment=True, seed=3, batch_size=12, shuffle=True, repeat=True)
    )
    (z1, w1) = next(again)
    assert (x1.numpy() == z1.numpy()).all() and (y1.numpy() == w1.numpy()).all()
    assert sorted(y1.numpy().tolist()) == targets and sorted(y2.numpy().tolist()) == targets
    assert not (x1.numpy() == x2.numpy()).all()


def test_class_weights():
    w = class_weights([0, 0, 0, 1, 3], 4)
    assert w[2] == 0.0
    assert w[0] == pytest.approx(5 / (3 * 3)) and w[1] == pytest.approx(5 / 3)


def test_bad_inputs(few):
    with pytest.raises(ValueError, match="2 targets for 12 images"):
        image_dataset(few, 75, targets=[0, 1])
    with pytest.raises(ValueError, match="at least one"):
        image_dataset([], 75)
