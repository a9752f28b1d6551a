"""Write the method x model matrix into README.md, from the parameter lists of tests/test_matrix.py
(which trains every cell, or checks its refusal), between the markers
`<!-- matrix: python scripts/matrix.py -->` and `<!-- /matrix -->`.

    python scripts/matrix.py            # rewrite the README's matrix
    python scripts/matrix.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- matrix: python scripts/matrix.py -->", "<!-- /matrix -->"


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from readme_block import write_block
    from test_matrix import matrix_markdown

    return write_block(START, END, matrix_markdown())


if __name__ == "__main__":
    sys.exit(main())
