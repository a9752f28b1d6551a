"""Write a generated block into README.md between two markers (`scripts/matrix.py`, `scripts/claims.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def write_block(start: str, end: str, body: str, check: bool | None = None) -> int:
    """Replace what lies between `start` and `end` with `body`; with `check` (default: `--check` on the
    command line) only compare: 1 if the README is stale, else 0."""
    text = README.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    new = head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]
    if check if check is not None else "--check" in sys.argv:
        return int(new != text)
    README.write_text(new)
    return 0
