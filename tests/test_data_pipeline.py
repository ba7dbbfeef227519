import numpy as np
import pytest

from derm.preprocess import preprocess
from derm.trainer.data import Stream, class_weights, image_dataset

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


def test_the_pydataset_of_other_backends_serves_the_same_stream(few):
    """Keras epoch e, batch j of the PyDataset (JAX, no TensorFlow) is batch e * steps + j of the tf.data stream:
    the same images, views, targets and weights, across the end of a pass (12 images, batches of 5)."""
    from derm.trainer.data import _sequence_class

    targets, weights = list(range(12)), [0.5 + i for i in range(12)]
    kw = dict(targets=targets, sample_weights=weights, augment=True, seed=3, batch_size=5, repeat=True)
    stream = iter(image_dataset(few, 75, **kw))
    seq = _sequence_class()(Stream(tuple(few), 75, np.array(targets), np.array(weights), True, 3, 5, False, True, 3, 2))
    assert len(seq) == 3
    for _epoch in range(2):
        for j in range(len(seq)):
            x, y, w = seq[j]
            tx, ty, tw = next(stream)
            assert (x == tx.numpy()).all() and (y == ty.numpy()).all() and np.allclose(w, tw.numpy())
        seq.on_epoch_end()


def test_the_pydataset_shuffles_each_pass_reproducibly(few):
    from derm.trainer.data import _sequence_class

    make = _sequence_class()
    a = make(Stream(tuple(few), 75, np.arange(12), None, False, 3, 12, True, True, None, 1))
    b = make(Stream(tuple(few), 75, np.arange(12), None, False, 3, 12, True, True, None, 1))
    (x1, y1), (z1, w1) = a[0], b[0]
    assert (x1 == z1).all() and (y1 == w1).all() and sorted(y1.tolist()) == list(range(12))
    a.on_epoch_end()
    assert sorted(a[0][1].tolist()) == list(range(12)) and a[0][1].tolist() != y1.tolist()
    plain = make(Stream(tuple(few), 75, batch_size=5, parallel=1))
    assert len(plain) == 3 and plain[2].shape == (2, 75, 75, 3)
    assert (plain[0][3] == preprocess(few[3], 75)).all()
