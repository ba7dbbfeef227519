import base64
import re

import numpy as np
import pytest
from PIL import Image

from derm import metrics
from derm.trainer import report, report_html

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


def _check_png(path, min_side=100):
    data = path.read_bytes()
    assert data.startswith(report.PNG_SIGNATURE)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert im.format == "PNG"
    assert min_side <= w <= 6000 and min_side <= h <= 6000
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"
    return w, h


@pytest.fixture(scope="module")
def task_result():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.4).astype(int)
    prob = 1 / (1 + np.exp(-(rng.normal(size=300) + 1.2 * y)))
    return metrics.binary_task_metrics(y, prob, n_boot=100)


def test_plot_roc_with_readers(tmp_path, task_result):
    readers = [
        {"name": "d1", "sensitivity": 0.8, "specificity": 0.6},
        {"name": "d2", "sensitivity": 0.7, "specificity": 0.75},
    ]
    out = report.plot_roc(
        "Melanoma vs nevus", {"model": task_result, "other": task_result}, tmp_path / "a" / "roc.png", readers
    )
    assert out == tmp_path / "a" / "roc.png"
    _check_png(out)
    _check_png(report.plot_roc("t", {"m": task_result}, tmp_path / "roc2.png"))


def test_plot_roc_errors(tmp_path, task_result):
    with pytest.raises(ValueError, match="no curves"):
        report.plot_roc("t", {}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'bad' has no 'fpr'"):
        report.plot_roc("t", {"bad": {"auc": 0.5}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="reader point 0"):
        report.plot_roc("t", {"m": task_result}, tmp_path / "x.png", [{"name": "d"}])
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion(tmp_path, normalize):
    cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])  # a row without support
    out = report.plot_confusion(cm, ["a", "b", "c"], tmp_path / "cm.png", "title <x>", normalize=normalize)
    _check_png(out)
    with pytest.raises(ValueError, match=r"square with 2 rows.*\(3, 3\)"):
        report.plot_confusion(cm, ["a", "b"], tmp_path / "bad.png", "t")


def _clusters(n=40, d=64, seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    centers = np.zeros((2, d))
    centers[1, :] = 4.0
    return centers[y] + rng.normal(size=(n, d)), y


@pytest.fixture
def one_thread():
    # t-SNE's OpenMP threads crawl on a busy machine; one thread is fastest at these sizes.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def test_plot_tsne_separates_and_is_deterministic(tmp_path, one_thread):
    x, y = _clusters()
    c1 = report.plot_tsne(x, y, ["benign", "malignant"], tmp_path / "t1.png", seed=1)
    c2 = report.plot_tsne(x, y, ["benign", "malignant"], tmp_path / "t2.png", seed=1)
    assert c1.shape == (len(x), 2)
    np.testing.assert_allclose(c1, c2)
    _check_png(tmp_path / "t1.png")
    dist = np.linalg.norm(c1[:, None] - c1[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert (y[dist.argmin(axis=1)] == y).mean() >= 0.95


def test_plot_tsne_small_n_and_unlabelled(tmp_path, one_thread):
    x, y = _clusters(n=8, d=5)
    y = y.copy()
    y[0] = -1
    coords = report.plot_tsne(x, y, ["a", "b"], tmp_path / "small.png", perplexity=30)
    assert coords.shape == (8, 2) and np.isfinite(coords).all()
    _check_png(tmp_path / "small.png")
    with pytest.raises(ValueError, match="at least 4 points"):
        report.plot_tsne(x[:3], y[:3], ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="beyond the 1 labels"):
        report.plot_tsne(x, np.abs(y), ["a"], tmp_path / "x.png")


def test_plot_saliency(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(3)]
    sal = [rng.random((32, 32)), np.zeros((32, 32)), rng.random((16, 16)) * 100]
    out = report.plot_saliency(images, sal, ["mel -> mel", "nv -> nv", "bcc"], tmp_path / "s" / "sal.png")
    w, h = _check_png(out)
    assert h > w / 3  # two rows per image: image over saliency
    with pytest.raises(ValueError, match="differ in length"):
        report.plot_saliency(images, sal[:2], ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"images\[0\] must have shape \(h, w, 3\)"):
        report.plot_saliency([np.zeros((4, 4))], [np.zeros((4, 4))], ["a"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"saliency\[0\] must have shape \(h, w\)"):
        report.plot_saliency([images[0]], [np.zeros((4, 4, 3))], ["a"], tmp_path / "x.png")


# ----------------------------------------------------------------------------------------------------- readers


def test_read_reader_points_fractions_and_percent(tmp_path):
    frac = tmp_path / "frac.csv"
    frac.write_text(
        "Task,name,sensitivity,specificity,notes\n"
        "melanoma_vs_nevus,d1,0.8,0.6,x\n"
        "melanoma_vs_nevus,d2,0.7,0.75,\n"
        "\n"
        "carcinoma_vs_sk,d1,1,0.5,\n",
        encoding="utf-8",
    )
    pts = report_html.read_reader_points(frac)
    assert pts["melanoma_vs_nevus"] == [
        {"name": "d1", "sensitivity": 0.8, "specificity": 0.6},
        {"name": "d2", "sensitivity": 0.7, "specificity": 0.75},
    ]
    assert pts["carcinoma_vs_sk"] == [{"name": "d1", "sensitivity": 1.0, "specificity": 0.5}]

    pct = tmp_path / "pct.csv"
    pct.write_text("task,name,sensitivity,specificity\nt,a,80,60\nt,b,70%,0\n", encoding="utf-8")
    assert report_html.read_reader_points(pct)["t"] == [
        {"name": "a", "sensitivity": 0.8, "specificity": 0.6},
        {"name": "b", "sensitivity": 0.7, "specificity": 0.0},
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("task,name,sensitivity\nt,a,0.5\n", r"missing column\(s\) \['specificity'\]"),
        ("", "empty file"),
        ("task,name,sensitivity,specificity\nt,a,0.5,0.5\nt,b,abc,0.5\n", r"row 3: sensitivity 'abc' is not a number"),
        ("task,name,sensitivity,specificity\nt,a,0.5,120\n", r"row 2: specificity '120' is outside"),
        ("task,name,sensitivity,specificity\nt,a,-0.1,0.5\n", r"row 2: sensitivity '-0.1' is outside"),
        (
            "task,name,sensitivity,specificity\nt,a,80,60\nt,b,0.7,0.5\n",
            r"row 3: sensitivity '0.7' looks like a fraction",
        ),
        ("task,name,sensitivity,specificity\n,a,0.5,0.5\n", "row 2: empty task"),
    ],
)
def test_read_reader_points_errors(tmp_path, text, match):
    p = tmp_path / "readers.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as info:
        report_html.read_reader_points(p)
    assert str(p) in str(info.value)


# -------------------------------------------------------------------------------------------------------- HTML


def test_write_html_report_embeds_and_escapes(tmp_path, task_result):
    png = report.plot_roc("t", {"m": task_result}, tmp_path / "roc.png")
    out = report_html.write_html_report(
        tmp_path / "out" / "report.html",
        "Run <script>alert(1)</script>",
        [
            {"title": "Summary & <b>", "text": 'line 1\nAUC < 0.9 & "quoted"'},
            {
                "title": "Table",
                "table": [{"specificity": "0.9", "sensitivity": 0.123456789}, {"threshold": None, "x": "<i>"}],
                "images": [png],
            },
        ],
    )
    text = out.read_text(encoding="utf-8")
    assert "Research use only: not a diagnostic device." in text
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Summary &amp; &lt;b&gt;" in text and "AUC &lt; 0.9 &amp; &quot;quoted&quot;" in text
    assert "&lt;i&gt;" in text and "0.1235" in text
    assert "<th>specificity</th><th>sensitivity</th><th>threshold</th><th>x</th>" in text
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(uris) == 1 and base64.b64decode(uris[0]) == png.read_bytes()
    assert 'roc.png"' in text  # alt text only; no file reference needed to view
    assert not re.search(r'src="(?!data:)', text)


def test_write_html_report_errors(tmp_path):
    target = tmp_path / "r.html"
    with pytest.raises(ValueError, match="with a 'title'"):
        report_html.write_html_report(target, "t", [{"text": "no title"}])
    with pytest.raises(ValueError, match=r"unknown keys \['imgs'\]"):
        report_html.write_html_report(target, "t", [{"title": "a", "imgs": []}])
    with pytest.raises(ValueError, match="cannot read image"):
        report_html.write_html_report(target, "t", [{"title": "a", "images": [tmp_path / "missing.png"]}])
    not_png = tmp_path / "fake.png"
    not_png.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="is not a PNG"):
        report_html.write_html_report(target, "t", [{"title": "a", "images": [not_png]}])
    assert not target.exists()
