import numpy as np
import pytest

import derm
from derm import (
    PartitionError,
    aggregation_matrix,
    conditional_probability,
    inference_targets,
    partition,
    task_matrix,
    task_targets,
)


@pytest.fixture(scope="module")
def ham_part(ham):
    return partition(ham.taxonomy, ham.counts(), max_class_size=300, within="nine")


@pytest.mark.parametrize("level", ["three", "nine"])
def test_inference_probabilities_sum_to_one(ham_part, level):
    m = aggregation_matrix(ham_part, level)
    assert m.shape == (len(ham_part), len(ham_part.taxonomy.level(level)))
    assert (m.sum(axis=1) == 1).all()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, len(ham_part)))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose((probs @ m).sum(axis=1), 1.0, rtol=1e-6)


def test_three_way_is_consistent_with_nine_way(ham_part):
    tax = ham_part.taxonomy
    m3, m9 = aggregation_matrix(ham_part, "three"), aggregation_matrix(ham_part, "nine")
    # Summing the nine classes under each root gives the three-way matrix.
    nine_to_three = np.array([[tax.parent(u) == r for r in tax.levels["three"]] for u in tax.levels["nine"]], float)
    np.testing.assert_array_equal(m9 @ nine_to_three, m3)


def test_binary_tasks_on_ham(ham, ham_part):
    tax = ham.taxonomy
    mvn = task_matrix(ham_part, "melanoma_vs_nevus")
    pos = [ham_part.classes[i].node for i in np.nonzero(mvn[:, 1])[0]]
    neg = [ham_part.classes[i].node for i in np.nonzero(mvn[:, 0])[0]]
    assert all(tax.is_under(n, "malignant_melanoma") for n in pos)
    assert all(tax.is_under(n, "benign_melanocytic") for n in neg)
    # P(malignant | melanocytic) = P(melanoma) / (P(melanoma) + P(benign melanocytic)).
    probs = np.full((1, len(ham_part)), 1.0 / len(ham_part))
    expected = len(pos) / (len(pos) + len(neg))
    np.testing.assert_allclose(conditional_probability(probs, mvn), [expected])

    y = task_targets(tax, ham.nodes, "melanoma_vs_nevus")
    labels = np.array(ham.labels)
    assert (y[labels == "mel"] == 1).all() and (y[labels == "nv"] == 0).all()
    assert (y[~np.isin(labels, ["mel", "nv"])] == -1).all()
    # Carcinoma vs seborrheic keratosis: evaluated on BCC/SCC vs SK images only; HAM's bkl mixture is excluded.
    y2 = task_targets(tax, ham.nodes, "carcinoma_vs_seborrheic_keratosis")
    assert (y2[labels == "bcc"] == 1).all() and (y2[labels == "bkl"] == -1).all()


def test_task_without_data_on_one_side_raises():
    tax = derm.default_taxonomy()
    part = partition(tax, {"melanocytic_nevus": 10, "basal_cell_carcinoma": 5}, 100, within="nine")
    with pytest.raises(PartitionError, match="no training class lies under its positive nodes"):
        task_matrix(part, "melanoma_vs_nevus")


def test_inference_targets(ham, ham_part):
    t = inference_targets(ham.taxonomy, ham.nodes, "three")
    labels = np.array(ham.labels)
    assert (t[np.isin(labels, ["mel", "bcc", "akiec"])] == 1).all()
    assert (t[np.isin(labels, ["nv", "bkl", "df", "vasc"])] == 0).all()
    # Labelled above the level: no single inference class.
    assert inference_targets(ham.taxonomy, ["benign", "blue_nevus"], "nine").tolist() == [-1, 7]
