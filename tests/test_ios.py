"""The iOS app (ios-demo/), checked as far as a machine without Swift or Core ML allows: every Swift file parses
(tree-sitter's Swift grammar: a syntax check, not a compile), the app has no networking code, and the names it
relies on are the exporter's. The Core ML contract itself (an RGB image input of the manifest's size, the output
names and sizes, the manifest in the metadata) is checked on real exported packages in test_export_onnx_coreml.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

IOS = REPO / "ios-demo"
SWIFT = sorted(IOS.rglob("*.swift"))


def _parser():
    ts = pytest.importorskip("tree_sitter", reason="needs tree-sitter (the [dev] extra)")
    swift = pytest.importorskip("tree_sitter_swift", reason="needs tree-sitter-swift (the [dev] extra)")
    return ts.Parser(ts.Language(swift.language()))


def _problems(tree) -> list[str]:
    """Where the grammar found an error or had to assume a missing token, as line:column."""
    found, stack = [], [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            row, col = node.start_point
            found.append(f"{row + 1}:{col + 1} {'missing ' + node.type if node.is_missing else 'syntax error'}")
        stack.extend(node.children)
    return sorted(found)


def test_every_swift_file_parses():
    parser = _parser()
    assert len(SWIFT) >= 10, SWIFT  # the app and the DermCore package with its tests
    bad = {str(p.relative_to(REPO)): _problems(parser.parse(p.read_bytes())) for p in SWIFT}
    assert {k: v for k, v in bad.items() if v} == {}
    # the check can fail: a missing brace and a stray keyword are found
    assert _problems(parser.parse(b"struct A {\n    func f() -> Int { return 1 \n}\n"))
    assert _problems(parser.parse(b"let x = = 3\n"))


def test_the_app_sends_nothing_anywhere():
    """No networking API in any Swift file: images and results stay on the phone."""
    network = re.compile(r"\b(URLSession|URLRequest|NWConnection|NWPathMonitor|CFSocket|WKWebView)\b|https?://")
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in SWIFT
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if network.search(line)
    ]
    assert hits == []


def test_the_app_reads_the_manifest_key_and_format_the_exporter_writes():
    from derm.manifest import MANIFEST_KEY, SUPPORTED_FORMATS

    runner = (IOS / "DermDemo.swiftpm" / "Sources" / "ModelRunner.swift").read_text()
    assert f'let manifestKey = "{MANIFEST_KEY}"' in runner
    core = "".join(p.read_text() for p in (IOS / "DermCore" / "Sources").rglob("*.swift"))
    formats = set(re.findall(r'"(derm-manifest/\d+)"', core))
    assert formats and formats <= set(SUPPORTED_FORMATS)


def test_the_model_is_not_in_git_and_the_app_says_where_it_goes():
    ignored = (REPO / ".gitignore").read_text()
    assert "DermClassifier.mlpackage" in ignored
    readme = (IOS / "README.md").read_text()
    assert "--target coreml" in readme and "DermClassifier.mlpackage" in readme
    assert "not a diagnostic device" in readme
    assert Path(IOS / "DermDemo.swiftpm" / "Package.swift").is_file()
