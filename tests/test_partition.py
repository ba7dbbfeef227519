import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import derm
from derm import PartitionError, aggregation_matrix, partition

# A subset of the taxonomy with mock image counts, modelled on Esteva et al. 2017, Extended Data Fig. 1
# (partition with maxClassSize = 1,000; inference classes benign and malignant; training classes such as
# "amelanotic melanoma" and "blue nevus"; 7 training classes under benign whose probabilities
# 0.1 + 0.05 + 0.05 + 0.3 + 0.02 + 0.03 + 0.05 sum to P(benign) = 0.6). The counts are ours.
FIG1 = {
    "nodes": [
        {"id": "benign", "name": "Benign"},
        {"id": "benign_melanocytic", "name": "Benign melanocytic lesions", "parent": "benign"},
        {"id": "blue_nevus", "name": "Blue nevus", "parent": "benign_melanocytic"},
        {"id": "halo_nevus", "name": "Halo nevus", "parent": "benign_melanocytic"},
        {"id": "congenital_nevus", "name": "Congenital nevus", "parent": "benign_melanocytic"},
        {"id": "dysplastic_nevus", "name": "Dysplastic nevus", "parent": "benign_melanocytic"},
        {"id": "benign_epidermal", "name": "Benign epidermal", "parent": "benign"},
        {"id": "seborrheic_keratosis", "name": "Seborrheic keratosis", "parent": "benign_epidermal"},
        {"id": "solar_lentigo", "name": "Solar lentigo", "parent": "benign_epidermal"},
        {"id": "benign_dermal", "name": "Benign dermal", "parent": "benign"},
        {"id": "dermatofibroma", "name": "Dermatofibroma", "parent": "benign_dermal"},
        {"id": "lipoma", "name": "Lipoma", "parent": "benign_dermal"},
        {"id": "malignant", "name": "Malignant"},
        {"id": "melanoma", "name": "Melanoma", "parent": "malignant"},
        {"id": "amelanotic_melanoma", "name": "Amelanotic melanoma", "parent": "melanoma"},
        {"id": "lentigo_melanoma", "name": "Lentigo melanoma", "parent": "melanoma"},
        {"id": "acral_melanoma", "name": "Acral-lentiginous melanoma", "parent": "melanoma"},
        {"id": "malignant_epidermal", "name": "Malignant epidermal", "parent": "malignant"},
        {"id": "basal_cell_carcinoma", "name": "Basal cell carcinoma", "parent": "malignant_epidermal"},
        {"id": "squamous_cell_carcinoma", "name": "Squamous cell carcinoma", "parent": "malignant_epidermal"},
        {"id": "invasive_scc", "name": "Invasive SCC", "parent": "squamous_cell_carcinoma"},
        {"id": "bowens_disease", "name": "Bowen's disease", "parent": "squamous_cell_carcinoma"},
    ],
    "levels": {"roots": ["benign", "malignant"]},
    "tasks": [{"id": "melanoma_vs_nevus", "positive": ["melanoma"], "negative": ["benign_melanocytic"]}],
}
FIG1_COUNTS = {
    "blue_nevus": 300,
    "halo_nevus": 200,
    "congenital_nevus": 400,
    "dysplastic_nevus": 1800,
    "seborrheic_keratosis": 900,
    "solar_lentigo": 350,
    "dermatofibroma": 250,
    "lipoma": 100,
    "amelanotic_melanoma": 200,
    "lentigo_melanoma": 500,
    "acral_melanoma": 150,
    "basal_cell_carcinoma": 1500,
    "invasive_scc": 450,
    "bowens_disease": 150,
}


def test_extended_data_fig1_golden():
    tax = derm.Taxonomy.from_dict(FIG1)
    part = partition(tax, FIG1_COUNTS, max_class_size=1000)
    assert [(c.label, c.count) for c in part.classes] == [
        ("blue_nevus", 300),
        ("halo_nevus", 200),
        ("congenital_nevus", 400),
        ("dysplastic_nevus", 1800),  # a leaf larger than maxClassSize stays one class
        ("seborrheic_keratosis", 900),
        ("solar_lentigo", 350),
        ("benign_dermal", 350),  # 250 + 100 <= 1000: its children are "white" nodes inside it
        ("melanoma", 850),  # amelanotic, lentigo and acral melanoma are inside this class
        ("basal_cell_carcinoma", 1500),
        ("squamous_cell_carcinoma", 600),
    ]
    m = aggregation_matrix(part, "roots")
    probs = np.array([0.1, 0.05, 0.05, 0.3, 0.02, 0.03, 0.05, 0.25, 0.1, 0.05])
    np.testing.assert_allclose(probs @ m, [0.6, 0.4])
    assert part.class_of("amelanotic_melanoma") == 7
    assert part.class_of("melanoma") == 7
    assert part.class_of("benign") is None


def test_boundary_is_inclusive():
    tax = derm.Taxonomy.from_dict(FIG1)
    counts = {"amelanotic_melanoma": 500, "lentigo_melanoma": 500}
    assert [c.label for c in partition(tax, counts, 1000).classes] == ["malignant"]
    assert [c.label for c in partition(tax, counts, 999).classes] == ["amelanotic_melanoma", "lentigo_melanoma"]


def test_images_at_inner_nodes_get_their_own_class():
    tax = derm.Taxonomy.from_dict(FIG1)
    counts = {"melanoma": 30, "amelanotic_melanoma": 40, "acral_melanoma": 20}
    part = partition(tax, counts, max_class_size=50)
    assert [(c.label, c.count, c.own_only) for c in part.classes] == [
        ("melanoma:self", 30, True),
        ("amelanotic_melanoma", 40, False),
        ("acral_melanoma", 20, False),
    ]
    assert part.class_of("melanoma") == 0
    assert part.class_of("lentigo_melanoma") is None  # no images there, no class for it
    # A node whose images all sit at itself is a leaf as far as the data goes, so its descendants map onto it.
    part = partition(tax, {"melanoma": 80}, max_class_size=50)
    assert [(c.label, c.own_only) for c in part.classes] == [("melanoma", False)]
    assert part.class_of("amelanotic_melanoma") == 0


def test_within_forces_splits_and_reports_unassigned():
    tax = derm.Taxonomy.from_dict(FIG1)
    counts = {"benign": 7, "blue_nevus": 3, "seborrheic_keratosis": 4, "melanoma": 5}
    part = partition(tax, counts, max_class_size=10**6, within=["benign_melanocytic", "benign_epidermal", "melanoma"])
    assert [c.label for c in part.classes] == ["benign_melanocytic", "benign_epidermal", "melanoma"]
    assert part.unassigned == {"benign": 7}  # labelled above the inference level: cannot be assigned
    m = aggregation_matrix(part, ["benign_melanocytic", "benign_epidermal", "melanoma"])
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    # Without `within`, a huge maxClassSize gives the roots, which cannot aggregate to the finer level.
    coarse = partition(tax, counts, max_class_size=10**6)
    with pytest.raises(PartitionError, match=r"Training classes \['benign', 'malignant'\] lie under none"):
        aggregation_matrix(coarse, ["benign_melanocytic", "benign_epidermal", "melanoma"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_class_size": 0}, "max_class_size must be a positive integer, received 0"),
        ({"max_class_size": 2.5}, "received 2.5"),
        ({"max_class_size": True}, "received True"),
        ({"max_class_size": 5, "counts": {"blue_nevus": -1}}, "non-negative integers, received {'blue_nevus': -1}"),
        ({"max_class_size": 5, "counts": {"ghost": 3}}, "not in taxonomy"),
    ],
)
def test_bad_arguments(kwargs, message):
    tax = derm.Taxonomy.from_dict(FIG1)
    counts = kwargs.pop("counts", FIG1_COUNTS)
    with pytest.raises(PartitionError, match=message.replace("[", r"\[").replace("(", r"\(")):
        partition(tax, counts, **kwargs)


def test_roundtrip_and_taxonomy_guard(default_tax):
    tax = derm.Taxonomy.from_dict(FIG1)
    part = partition(tax, FIG1_COUNTS, 1000)
    again = derm.Partition.from_dict(part.to_dict(), tax)
    assert again.labels == part.labels and again.sha256 == part.sha256
    with pytest.raises(PartitionError, match="Load the taxonomy the run used"):
        derm.Partition.from_dict(part.to_dict(), default_tax)


def test_ham10000_partition(ham):
    part = partition(ham.taxonomy, ham.counts(), max_class_size=1000, within="nine")
    assert [(c.label, c.count) for c in part.classes] == [
        ("benign_dermal", 257),  # dermatofibroma 115 + vascular lesions 142
        ("benign_keratinocytic", 1099),  # HAM's bkl mixture, all labelled at this node
        ("melanocytic_nevus", 6705),
        ("malignant_epidermal", 841),  # akiec 327 (a mixture labelled here) + bcc 514
        ("malignant_melanoma", 1113),
    ]
    targets = part.targets(ham.nodes)
    assert min(targets) == 0 and np.bincount(targets).tolist() == [c.count for c in part.classes]


# ------------------------------------------------------------------------------------------- property tests
@st.composite
def trees(draw):
    n = draw(st.integers(1, 25))
    nodes = []
    for i in range(n):
        parent = draw(st.one_of(st.none(), st.integers(0, i - 1))) if i else None
        node = {"id": f"n{i}", "name": f"Node {i}"}
        if parent is not None:
            node["parent"] = f"n{parent}"
        nodes.append(node)
    tax = derm.Taxonomy.from_dict({"nodes": nodes})
    counts = {f"n{i}": draw(st.integers(0, 60)) for i in range(n) if draw(st.booleans())}
    return tax, counts


@settings(max_examples=300, deadline=None)
@given(trees(), st.integers(1, 150), st.booleans())
def test_partition_invariants(tree, max_size, by_depth1):
    tax, counts = tree
    within = None
    if by_depth1 and tax.level("depth:1"):
        within = "depth:1"
    part = partition(tax, counts, max_size, within=within)
    within_nodes = tax.level(within) if within else tax.roots

    # Deterministic.
    assert partition(tax, counts, max_size, within=within).labels == part.labels
    # Every image exactly once: in its class or reported unassigned.
    assert sum(c.count for c in part.classes) + sum(part.unassigned.values()) == sum(counts.values())
    per_class = [0] * len(part)
    for nid, n in counts.items():
        if n == 0:
            continue
        idx = part.class_of(nid)
        assert (idx is None) == (nid in part.unassigned)
        if idx is not None:
            per_class[idx] += n
            assert tax.is_under(nid, part.classes[idx].node)
    assert per_class == [c.count for c in part.classes]
    totals = tax.subtree_counts(counts)
    for c in part.classes:
        assert c.count > 0  # nodes with no images yield no class
        # Small enough, or indivisible (a leaf, or all images labelled at the node itself), or own images only.
        indivisible = not any(totals[k] for k in tax.children[c.node])
        assert c.count <= max_size or indivisible or c.own_only
        # Each training class lies under exactly one inference node.
        assert sum(tax.is_under(c.node, u) for u in within_nodes) == 1
    # Full classes never nest.
    full = [c.node for c in part.classes if not c.own_only]
    assert not any(a != b and tax.is_under(a, b) for a in full for b in full)
    # The aggregation to the inference nodes is a 0/1 matrix with one 1 per row.
    if len(part):
        m = aggregation_matrix(part, list(within_nodes))
        assert set(np.unique(m)) <= {0.0, 1.0}
        assert (m.sum(axis=1) == 1).all()
