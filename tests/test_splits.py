import io

import numpy as np
import pytest
from PIL import Image

from derm.splits import (
    Fingerprints,
    group_components,
    image_fingerprints,
    kfold,
    near_duplicate_pairs,
    perceptual_hash,
    thumbnail_vector,
    train_val_split,
)


@pytest.fixture(scope="module")
def ham_folds(ham):
    fps = image_fingerprints(ham.paths)
    comps = group_components(len(ham), ham.groups, fps)
    return fps, comps, kfold(ham.nodes, comps, k=9, seed=0)


def test_no_lesion_in_two_folds(ham, ham_folds):
    _, comps, folds = ham_folds
    assert sorted(set(folds.tolist())) == list(range(9))
    by_lesion: dict[str, set[int]] = {}
    for g, f in zip(ham.groups, folds, strict=True):
        by_lesion.setdefault(g, set()).add(int(f))
    assert len(by_lesion) == 7470
    assert all(len(fs) == 1 for fs in by_lesion.values())
    # Components contain whole lesions, and near-duplicates joined a few more.
    assert comps.max() + 1 <= 7470


def test_folds_are_balanced_and_stratified(ham, ham_folds):
    _, _, folds = ham_folds
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 0.05 * len(ham) / 9 + 5
    labels = np.array(ham.labels)
    for label in np.unique(labels):
        share = np.bincount(folds[labels == label], minlength=9) / (labels == label).sum()
        assert np.abs(share - 1 / 9).max() < 0.03, (label, share)


def test_near_duplicates_of_real_images_are_joined(ham):
    rng = np.random.default_rng(0)
    picks = rng.choice(len(ham), 40, replace=False)
    originals = [Image.open(ham.paths[i]).convert("RGB") for i in picks]
    copies = []
    for im in originals:
        small = im.resize((im.width * 3 // 4, im.height * 3 // 4), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        small.save(buf, "JPEG", quality=70)
        copies.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    ims = originals + copies
    fps = Fingerprints(
        np.array([perceptual_hash(i) for i in ims], dtype=np.uint64), np.stack([thumbnail_vector(i) for i in ims])
    )
    pairs = {tuple(p) for p in near_duplicate_pairs(fps).tolist()}
    for k in range(len(originals)):
        assert (k, k + len(originals)) in pairs  # every resized, re-encoded copy found
    assert not any(j < len(originals) for _, j in pairs)  # no two of the 40 different images joined
    comps = group_components(len(ims), None, fps)
    assert comps[: len(originals)].tolist() == comps[len(originals) :].tolist()


def test_fingerprints_match_in_memory_hashing(ham):
    fps = image_fingerprints(ham.paths[:5])
    with Image.open(ham.paths[0]) as im:
        assert np.bitwise_count(np.uint64(perceptual_hash(im)) ^ fps.hashes[0]) <= 4  # reduced-scale decode


def test_groups_join_components():
    comps = group_components(6, ["a", "b", "a", "", None, "b"])
    assert comps.tolist() == [0, 1, 0, 2, 3, 1]


def test_kfold_is_deterministic_given_a_seed():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 500)
    comps = np.repeat(np.arange(250), 2)
    a, b = kfold(labels, comps, k=5, seed=3), kfold(labels, comps, k=5, seed=3)
    assert (a == b).all()
    assert (kfold(labels, comps, k=5, seed=4) != a).any()
    for c in range(250):
        assert len(set(a[comps == c])) == 1


def test_train_val_split():
    labels = np.array(["x", "y"] * 100)
    comps = np.arange(200)
    val = train_val_split(labels, comps, val_fraction=0.2, seed=0)
    assert val.dtype == bool and 35 <= val.sum() <= 45


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kfold(["a"] * 4, [0, 1, 2, 3], k=1), "k must be an integer of at least 2, received 1"),
        (lambda: kfold(["a"] * 4, [0, 0, 1, 1], k=3), "cannot make 3 folds"),
        (lambda: kfold(["a"] * 3, [0, 1], k=2), "3 labels but 2 component ids"),
        (lambda: train_val_split(["a"], [0], val_fraction=1.5), "received 1.5"),
        (lambda: group_components(3, ["a"]), "groups has 1 entries for 3 images"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_text("nope")
    from derm.preprocess import ImageError

    with pytest.raises(ImageError, match=r"Cannot read image .*x\.jpg"):
        image_fingerprints([bad])
