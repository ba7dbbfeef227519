"""Shared fixtures. Real data comes from ../shared (or $DERM_SHARED); tests that need it skip with the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """The one setting for real data: $DERM_SHARED, else ../shared beside the repository."""
    return Path(os.environ.get("DERM_SHARED") or REPO.parent / "shared")


def _need(rel: str) -> Path:
    path = shared_dir() / rel
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set DERM_SHARED to the folder holding data/ and weights/)")
    return path


@pytest.fixture(scope="session")
def ham_csv() -> Path:
    return _need("data/ham10000/labels.csv")


@pytest.fixture(scope="session")
def isic2017_csv() -> Path:
    return _need("data/isic2017_trainval/labels.csv")


@pytest.fixture(scope="session")
def pad_csv() -> Path:
    return _need("data/pad_ufes20/labels.csv")


@pytest.fixture(scope="session")
def ham(ham_csv):
    import derm

    return derm.read_dataset(ham_csv)


@pytest.fixture(scope="session")
def default_tax():
    import derm

    return derm.default_taxonomy()
