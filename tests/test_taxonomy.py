import copy
import json
from importlib import resources

import pytest
import yaml

import derm
from derm import TaxonomyError, load_taxonomy
from derm._util import normalize_label
from derm.taxonomy import format_tree

NINE = {
    "cutaneous_lymphoma": "malignant",
    "benign_dermal": "benign",
    "malignant_dermal": "malignant",
    "benign_epidermal": "benign",
    "malignant_epidermal": "malignant",
    "genodermatoses": "non_neoplastic",
    "inflammatory": "non_neoplastic",
    "benign_melanocytic": "benign",
    "malignant_melanoma": "malignant",
}

# Every diagnosis code of the public datasets the project targets, and the node it must land on.
DATASET_LABELS = {
    # HAM10000 (mixtures map to the lowest node holding all of them)
    "akiec": "malignant_epidermal",
    "bcc": "basal_cell_carcinoma",
    "bkl": "benign_keratinocytic",
    "df": "dermatofibroma",
    "mel": "malignant_melanoma",
    "nv": "melanocytic_nevus",
    "vasc": "vascular_lesions",
    # ISIC 2017
    "melanoma": "malignant_melanoma",
    "seborrheic_keratosis": "seborrheic_keratosis",
    "nevus": "melanocytic_nevus",
    # ISIC 2019 (MEL, NV, BCC, BKL, DF, VASC normalise to HAM's codes)
    "AK": "actinic_keratosis",
    "SCC": "squamous_cell_carcinoma",
    "BKL": "benign_keratinocytic",
    # ISIC 2020
    "lentigo NOS": "benign",
    "lichenoid keratosis": "lichen_planus_like_keratosis",
    "solar lentigo": "solar_lentigo",
    "cafe-au-lait macule": "cafe_au_lait_macule",
    # PAD-UFES-20
    "ACK": "actinic_keratosis",
    "NEV": "melanocytic_nevus",
    "SEK": "seborrheic_keratosis",
    # derm7pt
    "reed or spitz nevus": "spitz_nevus",
    "melanoma (in situ)": "melanoma_in_situ",
    "blue nevus": "blue_nevus",
}


def test_default_taxonomy_shape(default_tax):
    assert default_tax.roots == ("benign", "malignant", "non_neoplastic")
    assert default_tax.levels["three"] == default_tax.roots
    assert set(default_tax.levels["nine"]) == set(NINE)
    for nid, root in NINE.items():
        assert default_tax.parent(nid) == root, nid
    assert len(default_tax) > 100
    # Every disease sits below one of the nine classes.
    for nid, depth in default_tax.walk():
        if depth >= 2:
            assert default_tax.path(nid)[1] in NINE


@pytest.mark.parametrize(("label", "node"), DATASET_LABELS.items())
def test_dataset_labels_resolve(default_tax, label, node):
    assert default_tax.resolve(label) == node


def test_every_documented_dataset_label_resolves(default_tax):
    for name, spec in default_tax.datasets.items():
        for label in spec["labels"]:
            assert default_tax.try_resolve(label) is not None, (name, label)
    assert {"ham10000", "isic2017", "isic2019", "isic2020", "pad_ufes20", "derm7pt"} <= set(default_tax.datasets)


def test_mixture_labels_carry_a_note(default_tax):
    for nid in ("malignant_epidermal", "benign_keratinocytic", "vascular_lesions", "benign"):
        assert default_tax[nid].note, f"{nid} maps a mixture label and must say so"


def test_default_file_matches_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    data_dir = resources.files("derm").joinpath("data")
    schema = json.loads(data_dir.joinpath("taxonomy.schema.json").read_text())
    doc = yaml.safe_load(data_dir.joinpath("default_taxonomy.yaml").read_text())
    jsonschema.validate(doc, schema)


def test_resolve_normalises_and_reports_unknown(default_tax):
    assert default_tax.resolve("  Seborrheic-Keratosis ") == "seborrheic_keratosis"
    assert default_tax.resolve("basal_cell_carcinoma") == "basal_cell_carcinoma"  # node ids work as labels
    with pytest.raises(KeyError, match="'not-a-disease'"):
        default_tax.resolve("not-a-disease")
    assert normalize_label("Melanoma (0.76 to 1.5 mm)") == "melanoma_0_76_to_1_5_mm"


def test_tree_queries(default_tax):
    t = default_tax
    assert t.ancestors("bowens_disease")[:2] == ["squamous_cell_carcinoma", "malignant_epidermal"]
    assert t.depth("malignant") == 0
    assert t.is_under("bowens_disease", "malignant")
    assert not t.is_under("malignant", "bowens_disease")
    assert t.descendants("squamous_cell_carcinoma")[0] == "squamous_cell_carcinoma"
    assert "bowens_disease" in t.descendants("squamous_cell_carcinoma")
    assert set(t.leaves()).isdisjoint(NINE)
    assert set(t.level("depth:1")) == set(t.levels["nine"])
    with pytest.raises(KeyError, match="Unknown inference level 'ten'"):
        t.level("ten")


def test_format_tree_with_counts(default_tax):
    text = format_tree(
        default_tax, {"melanocytic_nevus": 5, "blue_nevus": 2, "basal_cell_carcinoma": 1}, hide_empty=True
    )
    lines = text.splitlines()
    assert lines[0].startswith("Benign [benign]  7")
    assert any("Melanocytic nevus" in line and "7 (5 labelled here)" in line for line in lines)
    assert not any("inflammatory" in line for line in lines)


def test_roundtrip_json_and_yaml_keep_the_hash(default_tax, tmp_path):
    for suffix, dump in ((".json", json.dumps), (".yaml", yaml.safe_dump)):
        path = tmp_path / f"t{suffix}"
        path.write_text(dump(default_tax.to_dict()))
        again = load_taxonomy(path)
        assert again.sha256 == default_tax.sha256
        assert list(again.nodes) == list(default_tax.nodes)


def test_hash_ignores_names_but_not_structure(default_tax):
    d = default_tax.to_dict()
    renamed = copy.deepcopy(d)
    renamed["nodes"][5]["name"] = "Something else"
    renamed["nodes"][5]["note"] = "a note"
    assert derm.Taxonomy.from_dict(renamed).sha256 == default_tax.sha256
    moved = copy.deepcopy(d)
    node = next(n for n in moved["nodes"] if n["id"] == "blue_nevus")
    node["parent"] = "benign_melanocytic"
    assert derm.Taxonomy.from_dict(moved).sha256 != default_tax.sha256


def _tiny(**over):
    doc = {
        "schema_version": 1,
        "name": "tiny",
        "nodes": [
            {"id": "a", "name": "A"},
            {"id": "b", "name": "B", "parent": "a", "aliases": ["bee"]},
            {"id": "c", "name": "C", "parent": "a", "aliases": ["sea"]},
            {"id": "z", "name": "Z"},
        ],
    }
    doc.update(over)
    return doc


def _nodes(*changes):
    nodes = _tiny()["nodes"]
    for i, patch in changes:
        nodes[i] = {**nodes[i], **patch}
    return nodes


BAD = [
    ("duplicate id", {"nodes": _nodes((2, {"id": "b"}))}, "node 'b': duplicate id"),
    ("orphan", {"nodes": _nodes((1, {"parent": "nope"}))}, "node 'b': parent 'nope' does not exist"),
    ("self parent", {"nodes": _nodes((0, {"parent": "a"}))}, "node 'a': is its own parent"),
    ("cycle", {"nodes": _nodes((0, {"parent": "c"}), (3, {"parent": "b"}))}, "['a', 'c'] form a cycle"),
    (
        "duplicate alias",
        {"nodes": _nodes((2, {"aliases": ["BEE"]}))},
        "alias 'BEE' (normalised 'bee') is also on node 'b'",
    ),
    ("alias is another id", {"nodes": _nodes((2, {"aliases": ["b"]}))}, "alias 'b' is the id of node 'b'"),
    ("typo key", {"nodes": _nodes((1, {"parnet": "a"}))}, "node 'b': unknown keys ['parnet']"),
    ("bad id", {"nodes": _nodes((1, {"id": "b c"}))}, "received 'b c'"),
    ("empty name", {"nodes": _nodes((1, {"name": ""}))}, "node 'b': name must be a non-empty string"),
    ("aliases not list", {"nodes": _nodes((1, {"aliases": "bee"}))}, "node 'b' aliases: expected a list"),
    ("nested level", {"levels": {"x": ["a", "b"]}}, "level 'x': 'b' lies under 'a'"),
    ("unknown level node", {"levels": {"x": ["q"]}}, "level 'x': unknown node ids ['q']"),
    (
        "task unknown node",
        {"tasks": [{"id": "t", "positive": ["b"], "negative": ["q"]}]},
        "negative names unknown nodes",
    ),
    ("task overlap", {"tasks": [{"id": "t", "positive": ["b"], "negative": ["a"]}]}, "subtrees overlap"),
    ("dataset label", {"datasets": {"ds": {"labels": ["bee", "wasp"]}}}, "labels ['wasp'] match no node"),
    ("unknown top key", {"nodez": []}, "unknown top-level keys ['nodez']"),
]


@pytest.mark.parametrize(("case", "over", "message"), BAD, ids=[b[0] for b in BAD])
def test_invalid_taxonomies_name_the_offender(case, over, message):
    with pytest.raises(TaxonomyError) as info:
        derm.Taxonomy.from_dict(_tiny(**over), source="tiny.yaml")
    assert message in str(info.value)
    assert "tiny.yaml" in str(info.value)


def test_all_problems_reported_at_once():
    doc = _tiny(nodes=_nodes((1, {"parnet": "a"}), (2, {"parent": "ghost"})))
    with pytest.raises(TaxonomyError, match=r"\(2 problems\)"):
        derm.Taxonomy.from_dict(doc)


def test_unmapped_dataset_labels_are_allowed():
    tax = derm.Taxonomy.from_dict(_tiny(datasets={"ds": {"labels": ["bee", "wasp"], "unmapped": {"wasp": "no node"}}}))
    assert tax.datasets["ds"]["unmapped"] == {"wasp": "no node"}


def test_schema_version_and_file_errors(tmp_path):
    with pytest.raises(TaxonomyError, match="unsupported schema_version 2"):
        derm.Taxonomy.from_dict(_tiny(schema_version=2))
    with pytest.raises(TaxonomyError, match="not found"):
        load_taxonomy(tmp_path / "missing.yaml")
    bad = tmp_path / "t.txt"
    bad.write_text("{}")
    with pytest.raises(TaxonomyError, match=r"suffix '\.txt'"):
        load_taxonomy(bad)
    broken = tmp_path / "t.yaml"
    broken.write_text("nodes: [\n")
    with pytest.raises(TaxonomyError, match="Cannot parse"):
        load_taxonomy(broken)
