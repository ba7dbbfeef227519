"""The one way a benchmark writes its results: NAME.json (the numbers) and NAME.md (the table), each atomically, and
the table printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from derm._util import atomic_write


def write_results(folder: str | Path, name: str, report: Any, markdown: str) -> None:
    folder = Path(folder)
    with atomic_write(folder / f"{name}.json") as f:
        json.dump(report, f, indent=1)
    with atomic_write(folder / f"{name}.md") as f:
        f.write(markdown)
    print(markdown)
