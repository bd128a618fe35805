"""Where a benchmark's results go: OUT/NAME.json (the figures) and OUT/NAME.md (the table)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(out: str | Path, name: str, report: dict, markdown: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / f"{name}.md").write_text(markdown)
    print(markdown)
