import shutil
import warnings

import pytest

import derm
from derm import DatasetError, read_dataset


def test_ham10000(ham):
    assert len(ham) == 10015
    assert ham.group_column == "lesion_id"
    assert len(set(ham.groups)) == 7470
    assert ham.label_counts() == {
        "nv": 6705,
        "mel": 1113,
        "bkl": 1099,
        "bcc": 514,
        "akiec": 327,
        "vasc": 142,
        "df": 115,
    }
    assert all(p.is_absolute() and p.is_file() for p in ham.paths[:50])
    assert set(ham.extras) == {"image_id", "dx_type", "age", "sex", "localization"}
    desc = ham.describe()
    assert desc["images"] == 10015 and desc["groups"] == 7470 and len(desc["csv_sha256"]) == 64


def test_pad_groups_by_patient(pad_csv):
    pad = read_dataset(pad_csv)
    assert pad.group_column == "patient_id"  # a patient holds several lesions: the coarser grouping wins
    assert len(pad) == 360
    assert pad.counts()["squamous_cell_carcinoma"] == 13


def test_isic2017(isic2017_csv):
    ds = read_dataset(isic2017_csv, group_column=None)
    assert ds.groups is None
    assert ds.counts() == {"melanocytic_nevus": 1450, "malignant_melanoma": 404, "seborrheic_keratosis": 296}
    sub = ds.subset([e == "val" for e in ds.extras["split"]])
    assert len(sub) == 150


@pytest.fixture()
def messy(tmp_path, ham_csv):
    src = ham_csv.parent / "images"
    (tmp_path / "images").mkdir()
    good = sorted(src.iterdir())[:3]
    for p in good:
        shutil.copy(p, tmp_path / "images" / p.name)
    (tmp_path / "images" / "notes.jpg").write_text("this is not an image")
    truncated = tmp_path / "images" / "cut.jpg"
    truncated.write_bytes(good[0].read_bytes()[:2000])
    rows = [
        "image,label,lesion_id",
        f"images/{good[0].name},mel,L1",
        f"images/{good[1].name},nv,L1",
        f"images/{good[2].name},NOT_A_DISEASE,L2",
        "images/missing.jpg,bcc,L3",
        "images/notes.jpg,bcc,L4",
        f"images/{good[2].name},,L5",
        "images/cut.jpg,bkl,L6",
    ]
    csv = tmp_path / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_every_problem_is_reported_at_once(messy):
    with pytest.raises(DatasetError) as info:
        read_dataset(messy)
    msg = str(info.value)
    assert "4 of 7 rows have problems" in msg
    assert "unknown label 'NOT_A_DISEASE'" in msg
    assert "row 5: images/missing.jpg: file not found" in msg
    assert "row 6: images/notes.jpg: unreadable image" in msg
    assert "empty label" in msg
    assert "--skip-bad" in msg and "add them to a node's aliases" in msg
    assert len(info.value.problems) == 4


def test_truncated_images_are_caught_when_decoding(messy):
    with pytest.raises(DatasetError) as info:
        read_dataset(messy, check_images="decode")
    assert any(p[1] == "images/cut.jpg" for p in info.value.problems)


def test_skip_keeps_the_good_rows_with_a_warning(messy):
    with pytest.warns(UserWarning, match="skipping 4 of 7 rows"):
        ds = read_dataset(messy, on_error="skip")
    assert ds.labels == ["mel", "nv", "bkl"]
    assert ds.groups == ["L1", "L1", "L6"]
    assert len(ds.skipped) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"label_column": "dx"}, "has no column 'dx' (label_column); its columns are ['image', 'label', 'lesion_id']"),
        ({"group_column": "patient"}, "has no group column 'patient'"),
        ({"on_error": "ignore"}, "on_error must be 'raise' or 'skip', received 'ignore'"),
        ({"check_images": "all"}, "received 'all'"),
    ],
)
def test_argument_errors_echo_the_value(messy, kwargs, message):
    with pytest.raises((DatasetError, ValueError)) as info:
        read_dataset(messy, **kwargs)
    assert message in str(info.value)


def test_missing_csv_and_empty_csv(tmp_path):
    with pytest.raises(DatasetError, match="Dataset CSV not found"):
        read_dataset(tmp_path / "nope.csv")
    empty = tmp_path / "e.csv"
    empty.write_text("image,label\n")
    with pytest.raises(DatasetError, match="no rows"):
        read_dataset(empty)


def test_custom_taxonomy(tmp_path, messy):
    tax = derm.Taxonomy.from_dict(
        {"nodes": [{"id": "lesion", "name": "Lesion", "aliases": ["mel", "nv", "bcc", "bkl", "not a disease"]}]}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(messy, tax, on_error="skip")
    assert set(ds.nodes) == {"lesion"}
    assert len(ds) == 4  # NOT_A_DISEASE now resolves; the missing, non-image and unlabelled rows still drop


def test_a_csv_that_is_not_utf8_is_named_with_what_to_do(tmp_path):
    import pytest

    from derm.datasets import DatasetError, read_dataset

    path = tmp_path / "latin1.csv"
    path.write_bytes("image,label\nl\xe9sion.jpg,nevus\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.csv' is not UTF-8 text .* at byte 13.*save it as UTF-8"):
        read_dataset(path)
